import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetWriter } from '../dialect.js';

// Placeholder until the virtualbox target lands.
export const virtualboxTarget: TargetWriter = {
  profile: {
    target: 'virtualbox',
    firmware: ['bios', 'uefi'],
    diskBuses: [],
    scsiModels: [],
    nicModels: [],
    diskFormat: 'vdi',
    diskOptions: {},
    diskExtension: 'vdi',
  },
  write: async (_model, _disks, outDir) => {
    throw new UnsupportedFeatureError('writing virtualbox descriptors is not implemented yet', outDir);
  },
};
