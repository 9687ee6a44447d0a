import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { VmReader } from '../dialect.js';

// Placeholder until the ovf reader lands: recognises nothing.
export const ovfReader: VmReader = {
  platform: 'ovf',
  detect: () => 0,
  read: async (path) => {
    throw new UnsupportedFeatureError('reading ovf descriptors is not implemented yet', path);
  },
};
