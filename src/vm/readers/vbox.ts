import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { VmReader } from '../dialect.js';

// Placeholder until the virtualbox reader lands: recognises nothing.
export const vboxReader: VmReader = {
  platform: 'virtualbox',
  detect: () => 0,
  read: async (path) => {
    throw new UnsupportedFeatureError('reading virtualbox descriptors is not implemented yet', path);
  },
};
