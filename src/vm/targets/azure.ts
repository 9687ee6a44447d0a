import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetWriter } from '../dialect.js';

// Placeholder until the azure target lands.
export const azureTarget: TargetWriter = {
  profile: {
    target: 'azure',
    firmware: ['bios', 'uefi'],
    diskBuses: [],
    scsiModels: [],
    nicModels: [],
    diskFormat: 'vpc',
    diskOptions: {},
    diskExtension: 'vhd',
  },
  write: async (_model, _disks, outDir) => {
    throw new UnsupportedFeatureError('writing azure descriptors is not implemented yet', outDir);
  },
};
