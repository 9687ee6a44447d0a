import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { FormatDriver } from '../../disk/types.js';

// Placeholder until the vpc driver lands: recognises nothing, opens nothing.
export const vpcDriver: FormatDriver = {
  name: 'vpc',
  aliases: ['vhd'],
  probe: () => 0,
  open: async (path) => {
    throw new UnsupportedFeatureError('the vpc format is not implemented yet', path);
  },
};
