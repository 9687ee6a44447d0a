import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetWriter } from '../dialect.js';

// Placeholder until the libvirt target lands.
export const libvirtTarget: TargetWriter = {
  profile: {
    target: 'libvirt',
    firmware: ['bios', 'uefi'],
    diskBuses: [],
    scsiModels: [],
    nicModels: [],
    diskFormat: 'qcow2',
    diskOptions: {},
    diskExtension: 'qcow2',
  },
  write: async (_model, _disks, outDir) => {
    throw new UnsupportedFeatureError('writing libvirt descriptors is not implemented yet', outDir);
  },
};
