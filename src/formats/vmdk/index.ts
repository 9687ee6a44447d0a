import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { FormatDriver } from '../../disk/types.js';

// Placeholder until the vmdk driver lands: recognises nothing, opens nothing.
export const vmdkDriver: FormatDriver = {
  name: 'vmdk',
  probe: () => 0,
  open: async (path) => {
    throw new UnsupportedFeatureError('the vmdk format is not implemented yet', path);
  },
};
