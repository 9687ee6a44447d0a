import type { FormatDriver } from '../../disk/types.js';
import { extentMagic, looksLikeDescriptor, MAX_DESCRIPTOR_BYTES, VMDK_CREATE_OPTIONS } from './layout.js';

// Reader, writer, check and measure load when first used (probing needs only the layout).
const writer = () => import('./writer.js');

export const vmdkDriver: FormatDriver = {
  name: 'vmdk',
  probe(head, _tail, size) {
    if (extentMagic(head) !== 'other') return 100;
    return size <= MAX_DESCRIPTOR_BYTES && looksLikeDescriptor(head) ? 100 : 0;
  },
  open: async (path, options) => (await import('./reader.js')).VmdkReader.open(path, options),
  create: async (path, size, options) => (await writer()).createVmdk(path, size, options),
  resume: async (path, size, options, state) => (await writer()).resumeVmdk(path, size, options, state),
  createOptions: VMDK_CREATE_OPTIONS,
  check: async (path, options) => (await import('./check.js')).checkVmdk(path, options),
  measure: async (source, virtualSize, options) => (await import('./measure.js')).measureVmdk(source, virtualSize, options),
};
