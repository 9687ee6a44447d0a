import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { FormatDriver } from '../../disk/types.js';

// Placeholder until the vdi driver lands: recognises nothing, opens nothing.
export const vdiDriver: FormatDriver = {
  name: 'vdi',
  probe: () => 0,
  open: async (path) => {
    throw new UnsupportedFeatureError('the vdi format is not implemented yet', path);
  },
};
