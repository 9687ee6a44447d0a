import type { FormatDriver } from '../../disk/types.js';
import { hasFileSignature, VHDX_CREATE_OPTIONS } from './layout.js';

// Reader, writer and check load when first used (probing needs only the layout).
const writer = () => import('./writer.js');

export const vhdxDriver: FormatDriver = {
  name: 'vhdx',
  probe: (head) => (hasFileSignature(head) ? 100 : 0),
  open: async (path, options) => (await import('./reader.js')).VhdxReader.open(path, options),
  create: async (path, size, options) => (await writer()).VhdxWriter.create(path, size, options),
  resume: async (path, size, options, state) => (await writer()).VhdxWriter.resume(path, size, options, state),
  createOptions: VHDX_CREATE_OPTIONS,
  check: async (path, options) => (await import('./check.js')).checkVhdx(path, options),
  measure: async (source, virtualSize, options) => (await writer()).measureVhdx(source, virtualSize, options),
};
