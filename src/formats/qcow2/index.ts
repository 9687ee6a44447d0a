import type { FormatDriver } from '../../disk/types.js';
import { checkQcow2 } from './check.js';
import { QCOW2_MAGIC } from './layout.js';
import { measureQcow2 } from './measure.js';
import { Qcow2Reader } from './reader.js';
import { QCOW2_CREATE_OPTIONS, Qcow2Writer } from './writer.js';

export const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  probe: (head) => (head.length >= 8 && head.readUInt32BE(0) === QCOW2_MAGIC && [2, 3].includes(head.readUInt32BE(4)) ? 100 : 0),
  open: (path, options) => Qcow2Reader.open(path, options),
  create: (path, size, options) => Qcow2Writer.create(path, size, options),
  resume: (path, size, options, state) => Qcow2Writer.resume(path, size, options, state),
  createOptions: QCOW2_CREATE_OPTIONS,
  check: (path, options) => checkQcow2(path, options),
  measure: (source, size, options) => measureQcow2(source, size, options),
};
