/** vmferry's library API: everything the CLI does, as typed functions. */
import './formats/index.js';
import './transfer/nbd/index.js';

export { copyDisk } from './convert/pipeline.js';
export { collectExtents, type FlatExtent, flatExtents } from './disk/chain.js';
export * from './disk/errors.js';
export { parseOptionString, parseSize } from './disk/options.js';
export { formatNames, getDriver, openImage, probeFile, registerFormat } from './disk/registry.js';
export * from './disk/types.js';
export * from './migrate/index.js';
export { checkImage } from './ops/check.js';
export { compareImages } from './ops/compare.js';
export { type ConvertRequest, type ConvertResult, convertImage } from './ops/convert.js';
export { createImage } from './ops/create.js';
export { describeImage, imageInfo, imageInfoChain } from './ops/info.js';
export { mapImage } from './ops/map.js';
export { measureImage } from './ops/measure.js';
export type * from './vm/model.js';
