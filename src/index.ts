/** vmferry's library API: everything the CLI does, as typed functions. */
import './formats/index.js';
import './transfer/nbd/index.js';

export { copyDisk } from './convert/pipeline.js';
export { collectExtents, type FlatExtent, flatExtents } from './disk/chain.js';
export * from './disk/errors.js';
export { parseOptionString, parseSize } from './disk/options.js';
export { formatNames, getDriver, openImage, probeFile, registerFormat } from './disk/registry.js';
export * from './disk/types.js';
