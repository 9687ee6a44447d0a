/**
 * VDI (VirtualBox) on-disk structures, little-endian: a 72-byte pre-header (text, signature,
 * version), the version 1.1 header (VirtualBox's VDIHEADER1PLUS; qemu writes the shorter
 * VDIHEADER1 without the LCHS geometry), the block map and the blocks.
 */

import { randomBytes } from '../../disk/builtins.js';
import { CorruptImageError, UnsupportedFeatureError } from '../../disk/errors.js';

export const VDI_SIGNATURE = 0xbeda107f;
export const VDI_VERSION_1_1 = 0x00010001;
export const VDI_TEXT = '<<< Oracle VM VirtualBox Disk Image >>>\n';
export const HEADER_AREA = 512;
/** sizeof(VDIHEADER1) and sizeof(VDIHEADER1PLUS). */
export const HEADER1_SIZE = 0x180;
export const HEADER1PLUS_SIZE = 0x190;
export const PRE_HEADER_SIZE = 72;

export const VDI_TYPE_NORMAL = 1;
export const VDI_TYPE_FIXED = 2;
export const VDI_TYPE_UNDO = 3;
export const VDI_TYPE_DIFF = 4;
export const VDI_TYPE_NAMES: Record<number, string> = { 1: 'dynamic', 2: 'static', 3: 'undo', 4: 'differencing' };

export const BLOCK_FREE = 0xffffffff;
export const BLOCK_ZERO = 0xfffffffe;
/** Block indices must stay below the two markers. */
export const MAX_BLOCK_INDEX = 0xfffffffd;
export const DEFAULT_BLOCK_SIZE = 1024 * 1024;
export const MAX_BLOCK_SIZE = 256 * 1024 * 1024;
/** VirtualBox aligns the start of the blocks to 1 MiB. */
export const DATA_ALIGN = 1024 * 1024;
/** qemu's limit on blocks in an image (VDI_BLOCKS_IN_IMAGE_MAX). */
export const MAX_BLOCKS = 0x3fffffff;

export interface VdiHeader {
  version: number;
  headerSize: number;
  imageType: number;
  flags: number;
  comment: string;
  offBlocks: number;
  offData: number;
  cylinders: number;
  heads: number;
  sectors: number;
  sectorSize: number;
  diskSize: number;
  blockSize: number;
  blockExtra: number;
  blocks: number;
  blocksAllocated: number;
  uuidCreate: Buffer;
  uuidModify: Buffer;
  uuidLinkage: Buffer;
  uuidParentModify: Buffer;
}

export function isVdi(head: Buffer): boolean {
  return head.length >= PRE_HEADER_SIZE && head.readUInt32LE(64) === VDI_SIGNATURE;
}

/** Decodes and validates the header against the spec's bounds and the file's size. */
export function decodeHeader(buf: Buffer, fileSize: number, file: string): VdiHeader {
  if (!isVdi(buf) || buf.length < HEADER_AREA) throw new CorruptImageError('not a VDI image (bad signature)', file);
  const version = buf.readUInt32LE(68);
  if (version >>> 16 !== 1) {
    throw new UnsupportedFeatureError(
      `VDI header version ${version >>> 16}.${version & 0xffff} is not supported (only 1.x)`,
      file,
    );
  }
  const headerSize = buf.readUInt32LE(72);
  if (headerSize < HEADER1_SIZE || headerSize > HEADER_AREA - PRE_HEADER_SIZE) {
    throw new CorruptImageError(`VDI header size ${headerSize} is out of range`, file);
  }
  const u64 = buf.readBigUInt64LE(368);
  if (u64 > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(`VDI disk size ${u64} is out of range`, file);
  const h: VdiHeader = {
    version,
    headerSize,
    imageType: buf.readUInt32LE(76),
    flags: buf.readUInt32LE(80),
    comment: cString(buf.subarray(84, 340)),
    offBlocks: buf.readUInt32LE(340),
    offData: buf.readUInt32LE(344),
    cylinders: buf.readUInt32LE(348),
    heads: buf.readUInt32LE(352),
    sectors: buf.readUInt32LE(356),
    sectorSize: buf.readUInt32LE(360),
    diskSize: Number(u64),
    blockSize: buf.readUInt32LE(376),
    blockExtra: buf.readUInt32LE(380),
    blocks: buf.readUInt32LE(384),
    blocksAllocated: buf.readUInt32LE(388),
    uuidCreate: Buffer.from(buf.subarray(392, 408)),
    uuidModify: Buffer.from(buf.subarray(408, 424)),
    uuidLinkage: Buffer.from(buf.subarray(424, 440)),
    uuidParentModify: Buffer.from(buf.subarray(440, 456)),
  };
  const bad = (why: string) => new CorruptImageError(`VDI ${why}`, file);
  if (!(h.imageType in VDI_TYPE_NAMES)) throw bad(`image type ${h.imageType} is unknown`);
  if (h.sectorSize !== 512) throw new UnsupportedFeatureError(`VDI sector size ${h.sectorSize} is not 512`, file);
  if (h.blockSize < 512 || h.blockSize > MAX_BLOCK_SIZE || (h.blockSize & (h.blockSize - 1)) !== 0) {
    throw bad(`block size ${h.blockSize} is not a power of two between 512 bytes and 256 MiB`);
  }
  if (h.blockExtra % 512 !== 0 || h.blockExtra > h.blockSize) throw bad(`block extra size ${h.blockExtra} is out of range`);
  if (h.blocks > MAX_BLOCKS) throw bad(`block count ${h.blocks} exceeds the format's limit ${MAX_BLOCKS}`);
  if (h.diskSize > h.blocks * h.blockSize) {
    throw bad(`disk size ${h.diskSize} needs more than its ${h.blocks} blocks of ${h.blockSize} bytes`);
  }
  if (h.blocksAllocated > h.blocks) throw bad(`claims ${h.blocksAllocated} allocated blocks of only ${h.blocks}`);
  if (h.offBlocks < PRE_HEADER_SIZE + h.headerSize || h.offBlocks % 512 !== 0) {
    throw bad(`block map offset ${h.offBlocks} is out of range`);
  }
  if (h.offBlocks + h.blocks * 4 > fileSize) {
    throw bad(
      `block map (${h.blocks} entries at ${h.offBlocks}) lies beyond the end of the file (${fileSize} bytes); the block count is absurd or the file is truncated`,
    );
  }
  if (h.offData % 512 !== 0 || h.offData < h.offBlocks + h.blocks * 4) {
    throw bad(`data offset ${h.offData} overlaps the block map or is not sector-aligned`);
  }
  return h;
}

function cString(buf: Buffer): string {
  const nul = buf.indexOf(0);
  return buf.toString('utf8', 0, nul >= 0 ? nul : buf.length);
}

/** The first 512 bytes of a VDI: pre-header, header 1.1 (the PLUS variant, as VirtualBox writes). */
export function encodeHeader(h: Omit<VdiHeader, 'version' | 'headerSize'>): Buffer {
  const buf = Buffer.alloc(HEADER_AREA);
  buf.write(VDI_TEXT, 0, 'latin1');
  buf.writeUInt32LE(VDI_SIGNATURE, 64);
  buf.writeUInt32LE(VDI_VERSION_1_1, 68);
  buf.writeUInt32LE(HEADER1PLUS_SIZE, 72);
  buf.writeUInt32LE(h.imageType, 76);
  buf.writeUInt32LE(h.flags, 80);
  buf.write(h.comment.slice(0, 255), 84, 'utf8');
  buf.writeUInt32LE(h.offBlocks, 340);
  buf.writeUInt32LE(h.offData, 344);
  buf.writeUInt32LE(h.cylinders, 348);
  buf.writeUInt32LE(h.heads, 352);
  buf.writeUInt32LE(h.sectors, 356);
  buf.writeUInt32LE(h.sectorSize, 360);
  buf.writeBigUInt64LE(BigInt(h.diskSize), 368);
  buf.writeUInt32LE(h.blockSize, 376);
  buf.writeUInt32LE(h.blockExtra, 380);
  buf.writeUInt32LE(h.blocks, 384);
  buf.writeUInt32LE(h.blocksAllocated, 388);
  h.uuidCreate.copy(buf, 392);
  h.uuidModify.copy(buf, 408);
  h.uuidLinkage.copy(buf, 424);
  h.uuidParentModify.copy(buf, 440);
  return buf;
}

/** A random (version 4) UUID in VirtualBox's byte order (RTUUID: first three fields little-endian). */
export function newUuid(): Buffer {
  const id = randomBytes(16);
  id[7] = (id[7]! & 0x0f) | 0x40;
  id[8] = (id[8]! & 0x3f) | 0x80;
  return id;
}

/** RTUUID as text: the first three fields are stored little-endian. */
export function formatUuid(id: Buffer): string {
  const h = (a: number, b: number, le: boolean) => {
    const part = id.subarray(a, b);
    return (le ? Buffer.from(part).reverse() : part).toString('hex');
  };
  return `${h(0, 4, true)}-${h(4, 6, true)}-${h(6, 8, true)}-${h(8, 10, false)}-${h(10, 16, false)}`;
}

export function isNullUuid(id: Buffer): boolean {
  return id.every((b) => b === 0);
}

/** Options create() accepts (-o), as qemu-img names them. */
export const VDI_CREATE_OPTIONS = ['static', 'preallocation'] as const;
