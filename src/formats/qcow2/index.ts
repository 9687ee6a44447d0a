import type { FormatDriver } from '../../disk/types.js';
import { QCOW2_CREATE_OPTIONS, QCOW2_MAGIC } from './layout.js';

// Reader, writer, check and measure load when first used: a command pays for the formats it
// touches, not for all of them (probing needs only the layout).
const reader = () => import('./reader.js');
const writer = () => import('./writer.js');

export const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  // Any version from 2 up is claimed, as qemu does: one this reader does not know (a damaged header,
  // say) is then refused by name instead of being copied as raw bytes.
  probe: (head) => (head.length >= 8 && head.readUInt32BE(0) === QCOW2_MAGIC && head.readUInt32BE(4) >= 2 ? 100 : 0),
  open: async (path, options) => (await reader()).Qcow2Reader.open(path, options),
  create: async (path, size, options) => (await writer()).Qcow2Writer.create(path, size, options),
  resume: async (path, size, options, state) => (await writer()).Qcow2Writer.resume(path, size, options, state),
  createOptions: QCOW2_CREATE_OPTIONS,
  check: async (path, options) => (await import('./check.js')).checkQcow2(path, options),
  measure: async (source, size, options) => (await import('./measure.js')).measureQcow2(source, size, options),
};
