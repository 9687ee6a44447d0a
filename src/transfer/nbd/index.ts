/** NBD exports as vmferry sources; importing this module also registers the NBD names (register.ts). */
import './register.js';

export { type BlockStatusDescriptor, NbdConnection } from './client.js';
export { BASE_ALLOCATION, NbdDiskReader, type NbdOpenOptions } from './reader.js';
export { isNbdUri, type NbdAddress, parseNbdUri } from './uri.js';
