/**
 * VHDX on-disk structures ([MS-VHDX]): file identifier, headers, region table, metadata table
 * and items, BAT entries, parent locator, log entries. All little-endian. Every field is checked
 * against the specification's bounds and the file's size before it sizes anything.
 */

import { randomBytes } from '../../disk/builtins.js';
import { CorruptImageError, UnsupportedFeatureError } from '../../disk/errors.js';
import { crc32cWithZeroField, stampCrc32c } from './crc32c.js';

export const KiB = 1024;
export const MiB = 1024 * 1024;

export const FILE_SIGNATURE = 'vhdxfile';
export const HEADER_OFFSETS = [64 * KiB, 128 * KiB] as const;
export const HEADER_SIZE = 4 * KiB;
export const REGION_TABLE_OFFSETS = [192 * KiB, 256 * KiB] as const;
export const REGION_TABLE_SIZE = 64 * KiB;
/** The header section: file identifier, two headers, two region tables, reserved. */
export const HEADER_SECTION_SIZE = MiB;
export const MAX_REGION_ENTRIES = 2047;
export const MAX_METADATA_ENTRIES = 2047;
export const METADATA_TABLE_SIZE = 64 * KiB;
export const MAX_METADATA_ITEM = MiB;
export const MIN_BLOCK_SIZE = MiB;
export const MAX_BLOCK_SIZE = 256 * MiB;
/** [MS-VHDX]: the virtual disk is at most 64 TiB. */
export const MAX_VIRTUAL_SIZE = 64 * 1024 * 1024 * MiB;
/** Sectors described by one sector bitmap block (1 MiB of bits). */
export const SECTORS_PER_BITMAP = 2 ** 23;
export const BITMAP_BLOCK_SIZE = MiB;

export const GUID = {
  batRegion: '2dc27766-f623-4200-9d64-115e9bfd4a08',
  metadataRegion: '8b7ca206-4790-4b9a-b8fe-575f050f886e',
  fileParameters: 'caa16737-fa36-4d43-b3b6-33f0aa44e76b',
  virtualDiskSize: '2fa54224-cd1b-4876-b211-5dbed83bf4b8',
  page83: 'beca12ab-b2e6-4523-93ef-c309e000c746',
  logicalSectorSize: '8141bf1d-a96f-4709-ba47-f233a8faab5f',
  physicalSectorSize: 'cda348c7-445d-4471-9cc9-e9885251c556',
  parentLocator: 'a8d35f2d-b30b-454d-abf7-d3d84834ab0c',
  vhdxParentLocatorType: 'b04aefb7-d19e-4a81-b789-25b8e9445913',
} as const;

export const ZERO_GUID = '00000000-0000-0000-0000-000000000000';

/** Payload block states (3 low bits of a BAT entry). */
export const PAYLOAD = {
  NOT_PRESENT: 0,
  UNDEFINED: 1,
  ZERO: 2,
  UNMAPPED: 3,
  FULLY_PRESENT: 6,
  PARTIALLY_PRESENT: 7,
} as const;
export const SB_PRESENT = 6;

// ---------------------------------------------------------------- GUIDs

/** Reads an MS GUID (first three fields little-endian) as the usual lowercase text. */
export function readGuid(buf: Buffer, at: number): string {
  const hex = (b: Buffer) => b.toString('hex');
  const d1 = Buffer.from(buf.subarray(at, at + 4)).reverse();
  const d2 = Buffer.from(buf.subarray(at + 4, at + 6)).reverse();
  const d3 = Buffer.from(buf.subarray(at + 6, at + 8)).reverse();
  return `${hex(d1)}-${hex(d2)}-${hex(d3)}-${hex(buf.subarray(at + 8, at + 10))}-${hex(buf.subarray(at + 10, at + 16))}`;
}

/** Writes a GUID given as text (braces allowed) in the MS byte order. */
export function writeGuid(buf: Buffer, at: number, guid: string): void {
  const h = guid.replace(/[{}]/g, '').toLowerCase();
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(h)) {
    throw new RangeError(`not a GUID: ${guid}`);
  }
  const p = h.split('-') as [string, string, string, string, string];
  Buffer.from(p[0], 'hex').reverse().copy(buf, at);
  Buffer.from(p[1], 'hex')
    .reverse()
    .copy(buf, at + 4);
  Buffer.from(p[2], 'hex')
    .reverse()
    .copy(buf, at + 6);
  Buffer.from(p[3] + p[4], 'hex').copy(buf, at + 8);
}

/** Normalises a GUID written as text ({...}, any case) or returns null when it is not one. */
export function parseGuidText(text: string): string | null {
  const h = text
    .trim()
    .replace(/^\{|\}$/g, '')
    .toLowerCase();
  return /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(h) ? h : null;
}

/** A random (version 4) GUID. */
export function randomGuid(): string {
  const b = randomBytes(16);
  b[6] = (b[6]! & 0x0f) | 0x40;
  b[8] = (b[8]! & 0x3f) | 0x80;
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** A uint64 field as a number, or null past 2^53. */
function readU64(buf: Buffer, at: number): number | null {
  const v = buf.readBigUInt64LE(at);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? null : Number(v);
}

// ---------------------------------------------------------------- file identifier

export function hasFileSignature(head: Buffer): boolean {
  return head.length >= 8 && head.toString('latin1', 0, 8) === FILE_SIGNATURE;
}

export function decodeCreator(id: Buffer): string {
  const raw = id.subarray(8, 520).toString('utf16le');
  const nul = raw.indexOf('\0');
  return nul >= 0 ? raw.slice(0, nul) : raw;
}

export function encodeFileIdentifier(creator: string): Buffer {
  const buf = Buffer.alloc(64 * KiB);
  buf.write(FILE_SIGNATURE, 0, 'latin1');
  buf.write(creator.slice(0, 255), 8, 'utf16le');
  return buf;
}

// ---------------------------------------------------------------- headers

export interface VhdxHeader {
  sequence: bigint;
  fileWriteGuid: string;
  dataWriteGuid: string;
  logGuid: string;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

/** Decodes one 4 KiB header; returns the reason it is invalid instead of throwing. */
export function decodeHeader(buf: Buffer, fileSize: number): VhdxHeader | string {
  if (buf.length < HEADER_SIZE) return 'is truncated';
  if (buf.toString('latin1', 0, 4) !== 'head') return "has no 'head' signature";
  const stored = buf.readUInt32LE(4);
  const computed = crc32cWithZeroField(buf.subarray(0, HEADER_SIZE), 4);
  if (stored !== computed) {
    return `has a bad CRC-32C checksum (stored 0x${stored.toString(16)}, computed 0x${computed.toString(16)})`;
  }
  const version = buf.readUInt16LE(66);
  const logLength = buf.readUInt32LE(68);
  const logOffset = readU64(buf, 72);
  const h: VhdxHeader = {
    sequence: buf.readBigUInt64LE(8),
    fileWriteGuid: readGuid(buf, 16),
    dataWriteGuid: readGuid(buf, 32),
    logGuid: readGuid(buf, 48),
    logVersion: buf.readUInt16LE(64),
    version,
    logLength,
    logOffset: logOffset ?? -1,
  };
  if (version !== 1) return `has version ${version} (only version 1 exists)`;
  if (logOffset === null || logOffset % MiB !== 0 || logOffset < HEADER_SECTION_SIZE) {
    return `has a log offset ${buf.readBigUInt64LE(72)} that is not a multiple of 1 MiB past the header section`;
  }
  if (logLength % MiB !== 0) return `has a log length ${logLength} that is not a multiple of 1 MiB`;
  if (h.logGuid !== ZERO_GUID && (logLength === 0 || logOffset + logLength > fileSize)) {
    return `has a log [${logOffset}, +${logLength}) outside the file (${fileSize} bytes)`;
  }
  return h;
}

export function encodeHeader(h: VhdxHeader): Buffer {
  const buf = Buffer.alloc(HEADER_SIZE);
  buf.write('head', 0, 'latin1');
  buf.writeBigUInt64LE(h.sequence, 8);
  writeGuid(buf, 16, h.fileWriteGuid);
  writeGuid(buf, 32, h.dataWriteGuid);
  writeGuid(buf, 48, h.logGuid);
  buf.writeUInt16LE(h.logVersion, 64);
  buf.writeUInt16LE(h.version, 66);
  buf.writeUInt32LE(h.logLength, 68);
  buf.writeBigUInt64LE(BigInt(h.logOffset), 72);
  stampCrc32c(buf, 4);
  return buf;
}

// ---------------------------------------------------------------- region table

export interface RegionEntry {
  guid: string;
  fileOffset: number;
  length: number;
  required: boolean;
}

/** Decodes a 64 KiB region table; a string is the reason it is invalid. */
export function decodeRegionTable(buf: Buffer, fileSize: number): RegionEntry[] | string {
  if (buf.toString('latin1', 0, 4) !== 'regi') return "has no 'regi' signature";
  const stored = buf.readUInt32LE(4);
  const computed = crc32cWithZeroField(buf.subarray(0, REGION_TABLE_SIZE), 4);
  if (stored !== computed) {
    return `has a bad CRC-32C checksum (stored 0x${stored.toString(16)}, computed 0x${computed.toString(16)})`;
  }
  const count = buf.readUInt32LE(8);
  if (count > MAX_REGION_ENTRIES) return `claims ${count} entries, more than the limit of ${MAX_REGION_ENTRIES}`;
  const entries: RegionEntry[] = [];
  for (let i = 0; i < count; i++) {
    const at = 16 + i * 32;
    const fileOffset = readU64(buf, at + 16);
    const length = buf.readUInt32LE(at + 24);
    const e: RegionEntry = {
      guid: readGuid(buf, at),
      fileOffset: fileOffset ?? -1,
      length,
      required: (buf.readUInt32LE(at + 28) & 1) !== 0,
    };
    if (fileOffset === null || fileOffset % MiB !== 0 || fileOffset < HEADER_SECTION_SIZE) {
      return `entry ${i} (${e.guid}) has offset ${buf.readBigUInt64LE(at + 16)}, not a multiple of 1 MiB past the header section`;
    }
    if (length % MiB !== 0 || length === 0) return `entry ${i} (${e.guid}) has length ${length}, not a multiple of 1 MiB`;
    if (fileOffset + length > fileSize) {
      return `entry ${i} (${e.guid}) [${fileOffset}, +${length}) lies beyond the end of the file (${fileSize} bytes)`;
    }
    if (entries.some((o) => o.guid === e.guid)) return `lists region ${e.guid} twice`;
    entries.push(e);
  }
  return entries;
}

export function encodeRegionTable(entries: RegionEntry[]): Buffer {
  const buf = Buffer.alloc(REGION_TABLE_SIZE);
  buf.write('regi', 0, 'latin1');
  buf.writeUInt32LE(entries.length, 8);
  entries.forEach((e, i) => {
    const at = 16 + i * 32;
    writeGuid(buf, at, e.guid);
    buf.writeBigUInt64LE(BigInt(e.fileOffset), at + 16);
    buf.writeUInt32LE(e.length, at + 24);
    buf.writeUInt32LE(e.required ? 1 : 0, at + 28);
  });
  stampCrc32c(buf, 4);
  return buf;
}

// ---------------------------------------------------------------- metadata

export interface MetadataEntry {
  itemId: string;
  offset: number;
  length: number;
  isUser: boolean;
  isVirtualDisk: boolean;
  isRequired: boolean;
}

export function decodeMetadataTable(buf: Buffer, regionLength: number, file: string): MetadataEntry[] {
  const bad = (why: string) => new CorruptImageError(`metadata table ${why}`, file);
  if (buf.toString('latin1', 0, 8) !== 'metadata') throw bad("has no 'metadata' signature");
  const count = buf.readUInt16LE(10);
  if (count > MAX_METADATA_ENTRIES) throw bad(`claims ${count} entries, more than the limit of ${MAX_METADATA_ENTRIES}`);
  const entries: MetadataEntry[] = [];
  for (let i = 0; i < count; i++) {
    const at = 32 + i * 32;
    const flags = buf.readUInt32LE(at + 24);
    const e: MetadataEntry = {
      itemId: readGuid(buf, at),
      offset: buf.readUInt32LE(at + 16),
      length: buf.readUInt32LE(at + 20),
      isUser: (flags & 1) !== 0,
      isVirtualDisk: (flags & 2) !== 0,
      isRequired: (flags & 4) !== 0,
    };
    if (e.length > MAX_METADATA_ITEM) throw bad(`item ${e.itemId} is ${e.length} bytes, more than 1 MiB`);
    if (e.length > 0 && (e.offset < METADATA_TABLE_SIZE || e.offset + e.length > regionLength)) {
      throw bad(`item ${e.itemId} [${e.offset}, +${e.length}) lies outside the metadata region (${regionLength} bytes)`);
    }
    if (entries.some((o) => o.itemId === e.itemId && o.isUser === e.isUser)) throw bad(`lists item ${e.itemId} twice`);
    entries.push(e);
  }
  return entries;
}

export interface FileParameters {
  blockSize: number;
  leaveBlocksAllocated: boolean;
  hasParent: boolean;
}

export function decodeFileParameters(buf: Buffer, file: string): FileParameters {
  if (buf.length < 8) throw new CorruptImageError('file parameters item is shorter than 8 bytes', file);
  const blockSize = buf.readUInt32LE(0);
  const bits = buf.readUInt32LE(4);
  if (blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new CorruptImageError(`block size ${blockSize} is not a power of two between 1 MiB and 256 MiB`, file);
  }
  return { blockSize, leaveBlocksAllocated: (bits & 1) !== 0, hasParent: (bits & 2) !== 0 };
}

export function decodeSectorSize(buf: Buffer, what: string, file: string): number {
  if (buf.length < 4) throw new CorruptImageError(`${what} item is shorter than 4 bytes`, file);
  const v = buf.readUInt32LE(0);
  if (v !== 512 && v !== 4096) throw new CorruptImageError(`${what} is ${v}; only 512 and 4096 are valid`, file);
  return v;
}

export function decodeVirtualSize(buf: Buffer, logicalSectorSize: number, file: string): number {
  if (buf.length < 8) throw new CorruptImageError('virtual disk size item is shorter than 8 bytes', file);
  const v = buf.readBigUInt64LE(0);
  if (v === 0n || v > BigInt(MAX_VIRTUAL_SIZE) || v % BigInt(logicalSectorSize) !== 0n) {
    throw new CorruptImageError(
      `virtual disk size ${v} is not a non-zero multiple of the ${logicalSectorSize}-byte sector up to 64 TiB`,
      file,
    );
  }
  return Number(v);
}

export interface ParentLocator {
  type: string;
  entries: Map<string, string>;
}

export function decodeParentLocator(buf: Buffer, file: string): ParentLocator {
  const bad = (why: string) => new CorruptImageError(`parent locator ${why}`, file);
  if (buf.length < 20) throw bad('is shorter than its 20-byte header');
  const type = readGuid(buf, 0);
  const count = buf.readUInt16LE(18);
  if (20 + count * 12 > buf.length) throw bad(`claims ${count} entries, more than its ${buf.length} bytes hold`);
  const entries = new Map<string, string>();
  const text = (off: number, len: number, what: string) => {
    if (len === 0 || len % 2 !== 0 || off < 20 + count * 12 || off + len > buf.length) {
      throw bad(`${what} [${off}, +${len}) lies outside the item or is not UTF-16`);
    }
    return buf.toString('utf16le', off, off + len);
  };
  for (let i = 0; i < count; i++) {
    const at = 20 + i * 12;
    const key = text(buf.readUInt32LE(at), buf.readUInt16LE(at + 8), `key ${i}`);
    const value = text(buf.readUInt32LE(at + 4), buf.readUInt16LE(at + 10), `value of '${key}'`);
    if (entries.has(key)) throw bad(`lists key '${key}' twice`);
    entries.set(key, value);
  }
  return { type, entries };
}

export function encodeParentLocator(entries: [string, string][]): Buffer {
  const strings = entries.map(([k, v]) => [Buffer.from(k, 'utf16le'), Buffer.from(v, 'utf16le')] as const);
  let pos = 20 + entries.length * 12;
  const total = pos + strings.reduce((n, [k, v]) => n + k.length + v.length, 0);
  const buf = Buffer.alloc(total);
  writeGuid(buf, 0, GUID.vhdxParentLocatorType);
  buf.writeUInt16LE(entries.length, 18);
  strings.forEach(([k, v], i) => {
    const at = 20 + i * 12;
    buf.writeUInt32LE(pos, at);
    k.copy(buf, pos);
    pos += k.length;
    buf.writeUInt32LE(pos, at + 4);
    v.copy(buf, pos);
    pos += v.length;
    buf.writeUInt16LE(k.length, at + 8);
    buf.writeUInt16LE(v.length, at + 10);
  });
  return buf;
}

export interface MetadataItem {
  guid: string;
  data: Buffer;
  isVirtualDisk: boolean;
  isRequired: boolean;
}

/** The metadata region's first part: table (64 KiB) followed by the items, packed. */
export function encodeMetadataRegion(items: MetadataItem[]): Buffer {
  const size = METADATA_TABLE_SIZE + items.reduce((n, it) => n + it.data.length, 0);
  const buf = Buffer.alloc(size);
  buf.write('metadata', 0, 'latin1');
  buf.writeUInt16LE(items.length, 10);
  let pos = METADATA_TABLE_SIZE;
  items.forEach((it, i) => {
    const at = 32 + i * 32;
    writeGuid(buf, at, it.guid);
    buf.writeUInt32LE(pos, at + 16);
    buf.writeUInt32LE(it.data.length, at + 20);
    buf.writeUInt32LE((it.isVirtualDisk ? 2 : 0) | (it.isRequired ? 4 : 0), at + 24);
    it.data.copy(buf, pos);
    pos += it.data.length;
  });
  return buf;
}

// ---------------------------------------------------------------- BAT

export interface Geometry {
  virtualSize: number;
  blockSize: number;
  logicalSectorSize: number;
  hasParent: boolean;
  sectorsPerBlock: number;
  /** Payload blocks per sector bitmap block. */
  chunkRatio: number;
  payloadBlocks: number;
  bitmapBlocks: number;
  batEntries: number;
}

export function geometry(virtualSize: number, blockSize: number, logicalSectorSize: number, hasParent: boolean): Geometry {
  const chunkRatio = (SECTORS_PER_BITMAP * logicalSectorSize) / blockSize;
  const payloadBlocks = Math.ceil(virtualSize / blockSize);
  const bitmapBlocks = Math.ceil(payloadBlocks / chunkRatio);
  const batEntries = hasParent ? bitmapBlocks * (chunkRatio + 1) : payloadBlocks + Math.floor((payloadBlocks - 1) / chunkRatio);
  return {
    virtualSize,
    blockSize,
    logicalSectorSize,
    hasParent,
    sectorsPerBlock: blockSize / logicalSectorSize,
    chunkRatio,
    payloadBlocks,
    bitmapBlocks,
    batEntries,
  };
}

/** BAT index of payload block `block` (sector bitmap entries are interleaved every chunkRatio). */
export function payloadIndex(g: Geometry, block: number): number {
  return block + Math.floor(block / g.chunkRatio);
}

/** BAT index of the sector bitmap entry of chunk `chunk`. */
export function bitmapIndex(g: Geometry, chunk: number): number {
  return chunk * (g.chunkRatio + 1) + g.chunkRatio;
}

export interface BatEntry {
  state: number;
  /** File offset in bytes (0 when none); may exceed 2^53 only in corrupt files, then Infinity. */
  offset: number;
  reservedBits: number;
}

export function decodeBatEntry(buf: Buffer, at: number): BatEntry {
  const low = buf.readUInt32LE(at);
  const high = buf.readUInt32LE(at + 4);
  const mb = high * 4096 + (low >>> 20);
  const offset = mb * MiB;
  return {
    state: low & 7,
    offset: Number.isSafeInteger(offset) ? offset : Number.POSITIVE_INFINITY,
    reservedBits: (low >>> 3) & 0x1ffff,
  };
}

export function encodeBatEntry(buf: Buffer, at: number, state: number, offset: number): void {
  const mb = offset / MiB;
  buf.writeUInt32LE((((mb % 4096) << 20) | state) >>> 0, at);
  buf.writeUInt32LE(Math.floor(mb / 4096), at + 4);
}

// ---------------------------------------------------------------- log

export const LOG_SECTOR = 4 * KiB;

export interface LogEntryHeader {
  entryLength: number;
  tail: number;
  sequence: bigint;
  descriptorCount: number;
  logGuid: string;
  flushedFileOffset: bigint;
  lastFileOffset: bigint;
}

/** Decodes the 64-byte log entry header at the start of `sector`, or null when it is not one. */
export function decodeLogEntryHeader(sector: Buffer, logLength: number): LogEntryHeader | null {
  if (sector.toString('latin1', 0, 4) !== 'loge') return null;
  const entryLength = sector.readUInt32LE(8);
  const tail = sector.readUInt32LE(12);
  const descriptorCount = sector.readUInt32LE(24);
  if (entryLength === 0 || entryLength % LOG_SECTOR !== 0 || entryLength > logLength) return null;
  if (tail % LOG_SECTOR !== 0 || tail >= logLength) return null;
  const sequence = sector.readBigUInt64LE(16);
  if (sequence === 0n) return null;
  // Header + descriptors (32 bytes each) rounded to sectors, then one sector per data descriptor.
  if (64 + descriptorCount * 32 > entryLength) return null;
  return {
    entryLength,
    tail,
    sequence,
    descriptorCount,
    logGuid: readGuid(sector, 32),
    flushedFileOffset: sector.readBigUInt64LE(48),
    lastFileOffset: sector.readBigUInt64LE(56),
  };
}

export function logEntryChecksumOk(entry: Buffer): boolean {
  return entry.readUInt32LE(4) === crc32cWithZeroField(entry, 4);
}

/** Unsupported in-file features are refused with this (kept here so the reader stays about reading). */
export function unsupported(what: string, file: string): UnsupportedFeatureError {
  return new UnsupportedFeatureError(what, file);
}

/** Options create() accepts (-o), as qemu-img names them. */
export const VHDX_CREATE_OPTIONS = ['subformat', 'block_size', 'log_size', 'block_state_zero', 'logical_sector_size'] as const;
