import { registerFormat } from '../disk/registry.js';
import { qcow2Driver } from './qcow2/index.js';
import { rawDriver } from './raw/index.js';
import { vdiDriver } from './vdi/index.js';
import { vhdxDriver } from './vhdx/index.js';
import { vmdkDriver } from './vmdk/index.js';
import { vpcDriver } from './vpc/index.js';

/** Every format vmferry knows, registered once on import. */
export const allDrivers = [rawDriver, qcow2Driver, vmdkDriver, vpcDriver, vhdxDriver, vdiDriver];
for (const driver of allDrivers) registerFormat(driver);
