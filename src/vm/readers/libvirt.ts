import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { VmReader } from '../dialect.js';

// Placeholder until the libvirt reader lands: recognises nothing.
export const libvirtReader: VmReader = {
  platform: 'libvirt',
  detect: () => 0,
  read: async (path) => {
    throw new UnsupportedFeatureError('reading libvirt descriptors is not implemented yet', path);
  },
};
