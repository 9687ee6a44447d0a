/**
 * VHD (qemu: vpc) on-disk structures: the 512-byte footer, the 1024-byte dynamic disk header,
 * parent locators and the block allocation table. All fields are big-endian.
 * Field meanings follow Microsoft's "Virtual Hard Disk Image Format Specification".
 */

import { randomBytes } from '../../disk/builtins.js';
import { CorruptImageError, UnsupportedFeatureError } from '../../disk/errors.js';

export const SECTOR = 512;
export const FOOTER_SIZE = 512;
export const DYN_HEADER_SIZE = 1024;
export const FOOTER_COOKIE = 'conectix';
export const DYN_COOKIE = 'cxsparse';
/** Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC). */
export const VHD_EPOCH = 946684800;
export const BAT_UNUSED = 0xffffffff;

export const DISK_FIXED = 2;
export const DISK_DYNAMIC = 3;
export const DISK_DIFFERENCING = 4;
export const DISK_TYPE_NAMES: Record<number, string> = { 2: 'fixed', 3: 'dynamic', 4: 'differencing' };

/** The largest CHS geometry (65535 cylinders, 16 heads, 255 sectors per track). */
export const MAX_CHS_SECTORS = 65535 * 16 * 255;
/** The largest disk qemu and Hyper-V accept in a VHD: 0xff000000 sectors (2040 GiB). */
export const MAX_VHD_SECTORS = 0xff000000;
export const MAX_VHD_SIZE = MAX_VHD_SECTORS * SECTOR;
export const DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024;
/** Largest block size we accept from a header (the spec's default is 2 MiB; Hyper-V also uses 512 KiB). */
export const MAX_BLOCK_SIZE = 256 * 1024 * 1024;

/** Creator applications whose images mean footer current_size, not the CHS geometry. */
export const CURRENT_SIZE_CREATORS = ['win ', 'qem2', 'd2v ', 'CTXS', 'tap\0', 'wa\0\0', 'vmfy'];
/** What vmferry writes as creator application. */
export const VMFERRY_CREATOR = 'vmfy';

export interface VhdFooter {
  features: number;
  formatVersion: number;
  /** Offset of the dynamic header; null for a fixed disk (all ones). */
  dataOffset: number | null;
  timestamp: number;
  creatorApp: string;
  creatorVersion: number;
  creatorHostOs: string;
  originalSize: number;
  currentSize: number;
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
  diskType: number;
  checksum: number;
  uniqueId: Buffer;
  savedState: number;
}

export interface ParentLocator {
  platformCode: string;
  dataSpace: number;
  dataLength: number;
  dataOffset: number;
}

export interface DynHeader {
  tableOffset: number;
  headerVersion: number;
  maxTableEntries: number;
  blockSize: number;
  checksum: number;
  parentUniqueId: Buffer;
  parentTimestamp: number;
  parentName: string;
  locators: ParentLocator[];
}

/** One's complement of the byte sum, the checksum field itself counted as zero. */
export function vhdChecksum(buf: Buffer, checksumAt: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) {
    if (i >= checksumAt && i < checksumAt + 4) continue;
    sum = (sum + buf[i]!) >>> 0;
  }
  return ~sum >>> 0;
}

function u64(buf: Buffer, at: number): bigint {
  return buf.readBigUInt64BE(at);
}

/** A 64-bit field that must fit a JS number (offsets, sizes); `null` for all ones. */
function safeU64(buf: Buffer, at: number, what: string, file: string, allOnesAsNull = false): number | null {
  const v = u64(buf, at);
  if (v === 0xffffffffffffffffn && allOnesAsNull) return null;
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new CorruptImageError(`VHD ${what} ${v} is out of range`, file);
  }
  return Number(v);
}

function ascii4(buf: Buffer, at: number): string {
  return buf.toString('latin1', at, at + 4);
}

export function isFooterCookie(buf: Buffer, at = 0): boolean {
  return buf.length >= at + 8 && buf.toString('latin1', at, at + 8) === FOOTER_COOKIE;
}

/**
 * Decodes a footer (512 bytes, or the 511 of old writers padded with a zero byte) and
 * verifies its checksum and fields.
 */
export function decodeFooter(buf: Buffer, file: string): VhdFooter {
  if (buf.length < FOOTER_SIZE) throw new CorruptImageError('VHD footer is truncated', file);
  if (!isFooterCookie(buf)) throw new CorruptImageError("VHD footer has no 'conectix' cookie", file);
  const checksum = buf.readUInt32BE(64);
  const computed = vhdChecksum(buf.subarray(0, FOOTER_SIZE), 64);
  if (checksum !== computed) {
    throw new CorruptImageError(
      `VHD footer checksum mismatch (stored 0x${checksum.toString(16)}, computed 0x${computed.toString(16)})`,
      file,
    );
  }
  const formatVersion = buf.readUInt32BE(12);
  if (formatVersion >>> 16 !== 1) {
    throw new UnsupportedFeatureError(`VHD format version 0x${formatVersion.toString(16)} is not 1.x`, file);
  }
  const diskType = buf.readUInt32BE(60);
  if (!(diskType in DISK_TYPE_NAMES)) {
    throw new UnsupportedFeatureError(`VHD disk type ${diskType} is not fixed (2), dynamic (3) or differencing (4)`, file);
  }
  const currentSize = safeU64(buf, 48, 'current size', file)!;
  const originalSize = Number(u64(buf, 40) & 0xfffffffffffffn);
  return {
    features: buf.readUInt32BE(8),
    formatVersion,
    dataOffset: safeU64(buf, 16, 'data offset', file, true),
    timestamp: buf.readUInt32BE(24),
    creatorApp: ascii4(buf, 28),
    creatorVersion: buf.readUInt32BE(32),
    creatorHostOs: ascii4(buf, 36),
    originalSize,
    currentSize,
    cylinders: buf.readUInt16BE(56),
    heads: buf.readUInt8(58),
    sectorsPerTrack: buf.readUInt8(59),
    diskType,
    checksum,
    uniqueId: Buffer.from(buf.subarray(68, 84)),
    savedState: buf.readUInt8(84),
  };
}

export function encodeFooter(f: VhdFooter): Buffer {
  const buf = Buffer.alloc(FOOTER_SIZE);
  buf.write(FOOTER_COOKIE, 0, 'latin1');
  buf.writeUInt32BE(f.features, 8);
  buf.writeUInt32BE(f.formatVersion, 12);
  buf.writeBigUInt64BE(f.dataOffset === null ? 0xffffffffffffffffn : BigInt(f.dataOffset), 16);
  buf.writeUInt32BE(f.timestamp >>> 0, 24);
  buf.write(f.creatorApp.padEnd(4, '\0').slice(0, 4), 28, 'latin1');
  buf.writeUInt32BE(f.creatorVersion, 32);
  buf.write(f.creatorHostOs.padEnd(4, '\0').slice(0, 4), 36, 'latin1');
  buf.writeBigUInt64BE(BigInt(f.originalSize), 40);
  buf.writeBigUInt64BE(BigInt(f.currentSize), 48);
  buf.writeUInt16BE(f.cylinders, 56);
  buf.writeUInt8(f.heads, 58);
  buf.writeUInt8(f.sectorsPerTrack, 59);
  buf.writeUInt32BE(f.diskType, 60);
  f.uniqueId.copy(buf, 68, 0, 16);
  buf.writeUInt8(f.savedState, 84);
  buf.writeUInt32BE(vhdChecksum(buf, 64), 64);
  return buf;
}

/**
 * The guest-visible size, as the products that wrote the image mean it: Virtual PC and old
 * qemu (creator "vpc ", "qemu", unknown) mean the CHS geometry; Hyper-V, Azure, disk2vhd,
 * XenServer, qemu with force_size ("qem2") and vmferry mean current_size. A maximal geometry
 * always means current_size (it cannot describe larger disks). qemu 7.2 does the same except
 * that it does not know Azure's "wa\0\0" yet.
 */
export function footerVirtualSize(f: VhdFooter): { size: number; rule: 'current_size' | 'chs' } {
  const chs = f.cylinders * f.heads * f.sectorsPerTrack;
  const currentSectors = Math.floor(f.currentSize / SECTOR);
  if (CURRENT_SIZE_CREATORS.includes(f.creatorApp) || chs === MAX_CHS_SECTORS) {
    return { size: currentSectors * SECTOR, rule: 'current_size' };
  }
  return { size: chs * SECTOR, rule: 'chs' };
}

/** CHS geometry for a sector count, by the VHD specification's algorithm. */
export function chsGeometry(totalSectors: number): { cylinders: number; heads: number; sectorsPerTrack: number } {
  const sectors = Math.min(totalSectors, MAX_CHS_SECTORS);
  let spt: number;
  let heads: number;
  let cylTimesHeads: number;
  if (sectors >= 65535 * 16 * 63) {
    spt = 255;
    heads = 16;
    cylTimesHeads = Math.floor(sectors / spt);
  } else {
    spt = 17;
    cylTimesHeads = Math.floor(sectors / spt);
    heads = Math.floor((cylTimesHeads + 1023) / 1024);
    if (heads < 4) heads = 4;
    if (cylTimesHeads >= heads * 1024 || heads > 16) {
      spt = 31;
      heads = 16;
      cylTimesHeads = Math.floor(sectors / spt);
    }
    if (cylTimesHeads >= heads * 1024) {
      spt = 63;
      heads = 16;
      cylTimesHeads = Math.floor(sectors / spt);
    }
  }
  return { cylinders: Math.floor(cylTimesHeads / heads), heads, sectorsPerTrack: spt };
}

/**
 * The size and geometry a new image gets, as qemu-img computes them: without force_size the
 * geometry is the smallest that holds the requested size (the disk grows to it, never shrinks);
 * with force_size the geometry is the maximal one and current_size is the size asked for.
 */
export function newImageGeometry(
  requested: number,
  forceSize: boolean,
): { size: number; cylinders: number; heads: number; sectorsPerTrack: number } {
  const wanted = Math.ceil(requested / SECTOR);
  if (!forceSize) {
    const capped = Math.min(wanted, MAX_CHS_SECTORS);
    let g = { cylinders: 0, heads: 0, sectorsPerTrack: 0 };
    for (let i = 0; capped > g.cylinders * g.heads * g.sectorsPerTrack; i++) {
      g = chsGeometry(capped + i);
    }
    const chs = g.cylinders * g.heads * g.sectorsPerTrack;
    if (chs !== MAX_CHS_SECTORS) return { size: chs * SECTOR, ...g };
  }
  return { size: wanted * SECTOR, cylinders: 65535, heads: 16, sectorsPerTrack: 255 };
}

export function decodeDynHeader(buf: Buffer, file: string): DynHeader {
  if (buf.length < DYN_HEADER_SIZE || buf.toString('latin1', 0, 8) !== DYN_COOKIE) {
    throw new CorruptImageError("VHD dynamic header has no 'cxsparse' cookie", file);
  }
  const checksum = buf.readUInt32BE(36);
  const computed = vhdChecksum(buf.subarray(0, DYN_HEADER_SIZE), 36);
  if (checksum !== computed) {
    throw new CorruptImageError(
      `VHD dynamic header checksum mismatch (stored 0x${checksum.toString(16)}, computed 0x${computed.toString(16)})`,
      file,
    );
  }
  const headerVersion = buf.readUInt32BE(24);
  if (headerVersion >>> 16 !== 1) {
    throw new UnsupportedFeatureError(`VHD dynamic header version 0x${headerVersion.toString(16)} is not 1.x`, file);
  }
  const blockSize = buf.readUInt32BE(32);
  if (blockSize < SECTOR || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new CorruptImageError(`VHD block size ${blockSize} is not a power of two between 512 bytes and 256 MiB`, file);
  }
  const locators: ParentLocator[] = [];
  for (let i = 0; i < 8; i++) {
    const at = 576 + i * 24;
    const code = buf.readUInt32BE(at);
    if (code === 0) continue;
    locators.push({
      platformCode: ascii4(buf, at),
      dataSpace: buf.readUInt32BE(at + 4),
      dataLength: buf.readUInt32BE(at + 8),
      dataOffset: safeU64(buf, at + 16, `parent locator ${i} offset`, file)!,
    });
  }
  return {
    tableOffset: safeU64(buf, 16, 'BAT offset', file)!,
    headerVersion,
    maxTableEntries: buf.readUInt32BE(28),
    blockSize,
    checksum,
    parentUniqueId: Buffer.from(buf.subarray(40, 56)),
    parentTimestamp: buf.readUInt32BE(56),
    parentName: decodeUtf16BE(buf.subarray(64, 576)),
    locators,
  };
}

export function encodeDynHeader(h: Omit<DynHeader, 'checksum' | 'headerVersion'>): Buffer {
  const buf = Buffer.alloc(DYN_HEADER_SIZE);
  buf.write(DYN_COOKIE, 0, 'latin1');
  buf.writeBigUInt64BE(0xffffffffffffffffn, 8);
  buf.writeBigUInt64BE(BigInt(h.tableOffset), 16);
  buf.writeUInt32BE(0x00010000, 24);
  buf.writeUInt32BE(h.maxTableEntries, 28);
  buf.writeUInt32BE(h.blockSize, 32);
  h.parentUniqueId.copy(buf, 40, 0, 16);
  buf.writeUInt32BE(h.parentTimestamp >>> 0, 56);
  encodeUtf16BE(h.parentName).copy(buf, 64, 0, 512);
  h.locators.slice(0, 8).forEach((l, i) => {
    const at = 576 + i * 24;
    buf.write(l.platformCode, at, 'latin1');
    buf.writeUInt32BE(l.dataSpace, at + 4);
    buf.writeUInt32BE(l.dataLength, at + 8);
    buf.writeBigUInt64BE(BigInt(l.dataOffset), at + 16);
  });
  buf.writeUInt32BE(vhdChecksum(buf, 36), 36);
  return buf;
}

export function decodeUtf16BE(buf: Buffer): string {
  const even = buf.subarray(0, buf.length - (buf.length % 2));
  const swapped = Buffer.from(even).swap16();
  const text = swapped.toString('utf16le');
  const nul = text.indexOf('\0');
  return nul >= 0 ? text.slice(0, nul) : text;
}

export function encodeUtf16BE(text: string): Buffer {
  return Buffer.from(text, 'utf16le').swap16();
}

/** Decodes a parent locator's bytes to a path as stored (no resolution). */
export function decodeLocatorPath(platformCode: string, data: Buffer): string | null {
  const stripNul = (s: string) => {
    const nul = s.indexOf('\0');
    return nul >= 0 ? s.slice(0, nul) : s;
  };
  switch (platformCode) {
    case 'W2ru':
    case 'W2ku':
      return stripNul(data.subarray(0, data.length - (data.length % 2)).toString('utf16le'));
    case 'Wi2r':
    case 'Wi2k':
      return stripNul(data.toString('latin1'));
    case 'MacX': {
      const url = stripNul(data.toString('utf8'));
      const m = /^file:\/\/(?:localhost)?(\/.*)$/i.exec(url);
      if (!m) return url;
      try {
        return decodeURIComponent(m[1]!);
      } catch {
        return m[1]!;
      }
    }
    default:
      return null;
  }
}

/** Bytes of the sector bitmap that precedes each block's data (a whole number of sectors). */
export function bitmapSize(blockSize: number): number {
  return Math.ceil(blockSize / SECTOR / 8 / SECTOR) * SECTOR;
}

export function newUniqueId(): Buffer {
  const id = randomBytes(16);
  id[6] = (id[6]! & 0x0f) | 0x40;
  id[8] = (id[8]! & 0x3f) | 0x80;
  return id;
}

export function formatUuid(id: Buffer): string {
  const h = id.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

export function vhdTimestamp(unixMs = Date.now()): number {
  return Math.max(0, Math.floor(unixMs / 1000) - VHD_EPOCH) >>> 0;
}

/** Options create() accepts (-o), as qemu-img names them. */
export const VPC_CREATE_OPTIONS = ['subformat', 'force_size', 'preallocation', 'backing_file', 'backing_fmt'] as const;
