import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { FormatDriver } from '../../disk/types.js';

// Placeholder until the vhdx driver lands: recognises nothing, opens nothing.
export const vhdxDriver: FormatDriver = {
  name: 'vhdx',
  probe: () => 0,
  open: async (path) => {
    throw new UnsupportedFeatureError('the vhdx format is not implemented yet', path);
  },
};
