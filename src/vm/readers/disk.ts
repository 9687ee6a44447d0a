import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { VmReader } from '../dialect.js';

// Placeholder until the disk reader lands: recognises nothing.
export const diskReader: VmReader = {
  platform: 'disk',
  detect: () => 0,
  read: async (path) => {
    throw new UnsupportedFeatureError('reading disk descriptors is not implemented yet', path);
  },
};
