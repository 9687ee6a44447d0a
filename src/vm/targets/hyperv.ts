import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetWriter } from '../dialect.js';

// Placeholder until the hyperv target lands.
export const hypervTarget: TargetWriter = {
  profile: {
    target: 'hyperv',
    firmware: ['bios', 'uefi'],
    diskBuses: [],
    scsiModels: [],
    nicModels: [],
    diskFormat: 'vhdx',
    diskOptions: {},
    diskExtension: 'vhdx',
  },
  write: async (_model, _disks, outDir) => {
    throw new UnsupportedFeatureError('writing hyperv descriptors is not implemented yet', outDir);
  },
};
