import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetWriter } from '../dialect.js';

// Placeholder until the ova target lands.
export const ovaTarget: TargetWriter = {
  profile: {
    target: 'ova',
    firmware: ['bios', 'uefi'],
    diskBuses: [],
    scsiModels: [],
    nicModels: [],
    diskFormat: 'vmdk',
    diskOptions: {},
    diskExtension: 'vmdk',
  },
  write: async (_model, _disks, outDir) => {
    throw new UnsupportedFeatureError('writing ova descriptors is not implemented yet', outDir);
  },
};
