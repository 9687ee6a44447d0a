import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetWriter } from '../dialect.js';

// Placeholder until the proxmox target lands.
export const proxmoxTarget: TargetWriter = {
  profile: {
    target: 'proxmox',
    firmware: ['bios', 'uefi'],
    diskBuses: [],
    scsiModels: [],
    nicModels: [],
    diskFormat: 'qcow2',
    diskOptions: {},
    diskExtension: 'qcow2',
  },
  write: async (_model, _disks, outDir) => {
    throw new UnsupportedFeatureError('writing proxmox descriptors is not implemented yet', outDir);
  },
};
