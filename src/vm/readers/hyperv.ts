import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { VmReader } from '../dialect.js';

// Placeholder until the hyperv reader lands: recognises nothing.
export const hypervReader: VmReader = {
  platform: 'hyperv',
  detect: () => 0,
  read: async (path) => {
    throw new UnsupportedFeatureError('reading hyperv descriptors is not implemented yet', path);
  },
};
