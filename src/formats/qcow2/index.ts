import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { FormatDriver } from '../../disk/types.js';

// Placeholder until the qcow2 driver lands: recognises nothing, opens nothing.
export const qcow2Driver: FormatDriver = {
  name: 'qcow2',
  probe: () => 0,
  open: async (path) => {
    throw new UnsupportedFeatureError('the qcow2 format is not implemented yet', path);
  },
};
