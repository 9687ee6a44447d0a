import type { FormatDriver } from '../../disk/types.js';
import { looksLikeDescriptor, MAX_DESCRIPTOR_BYTES } from './layout.js';
import { extentMagic, VmdkReader } from './reader.js';

export const vmdkDriver: FormatDriver = {
  name: 'vmdk',
  probe(head, _tail, size) {
    if (extentMagic(head) !== 'other') return 100;
    return size <= MAX_DESCRIPTOR_BYTES && looksLikeDescriptor(head) ? 100 : 0;
  },
  open: (path, options) => VmdkReader.open(path, options),
};
