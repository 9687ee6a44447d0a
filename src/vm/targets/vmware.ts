import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetWriter } from '../dialect.js';

// Placeholder until the vmware target lands.
export const vmwareTarget: TargetWriter = {
  profile: {
    target: 'vmware',
    firmware: ['bios', 'uefi'],
    diskBuses: [],
    scsiModels: [],
    nicModels: [],
    diskFormat: 'vmdk',
    diskOptions: {},
    diskExtension: 'vmdk',
  },
  write: async (_model, _disks, outDir) => {
    throw new UnsupportedFeatureError('writing vmware descriptors is not implemented yet', outDir);
  },
};
