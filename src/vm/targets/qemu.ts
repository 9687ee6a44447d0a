import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetWriter } from '../dialect.js';

// Placeholder until the qemu target lands.
export const qemuTarget: TargetWriter = {
  profile: {
    target: 'qemu',
    firmware: ['bios', 'uefi'],
    diskBuses: [],
    scsiModels: [],
    nicModels: [],
    diskFormat: 'qcow2',
    diskOptions: {},
    diskExtension: 'qcow2',
  },
  write: async (_model, _disks, outDir) => {
    throw new UnsupportedFeatureError('writing qemu descriptors is not implemented yet', outDir);
  },
};
