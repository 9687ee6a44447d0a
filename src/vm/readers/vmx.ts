import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { VmReader } from '../dialect.js';

// Placeholder until the vmware reader lands: recognises nothing.
export const vmxReader: VmReader = {
  platform: 'vmware',
  detect: () => 0,
  read: async (path) => {
    throw new UnsupportedFeatureError('reading vmware descriptors is not implemented yet', path);
  },
};
