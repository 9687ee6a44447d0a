import type { FormatDriver } from '../../disk/types.js';
import { checkVhdx } from './check.js';
import { hasFileSignature } from './layout.js';
import { VhdxReader } from './reader.js';
import { measureVhdx, VHDX_CREATE_OPTIONS, VhdxWriter } from './writer.js';

export const vhdxDriver: FormatDriver = {
  name: 'vhdx',
  probe: (head) => (hasFileSignature(head) ? 100 : 0),
  open: (path, options) => VhdxReader.open(path, options),
  create: (path, size, options) => VhdxWriter.create(path, size, options),
  resume: (path, size, options, state) => VhdxWriter.resume(path, size, options, state),
  createOptions: VHDX_CREATE_OPTIONS,
  check: (path, options) => checkVhdx(path, options),
  measure: (source, virtualSize, options) => measureVhdx(source, virtualSize, options),
};
