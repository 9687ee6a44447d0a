/**
 * qcow2 on-disk structures (qemu docs/interop/qcow2.txt): header, header extensions, snapshot
 * table entries, L1/L2 entries. All multi-byte fields are big-endian. 64-bit fields that hold
 * offsets are decoded as JS numbers (bits 9..55), never as BigInt, so hot paths stay cheap.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../disk/errors.js';

export const QCOW2_MAGIC = 0x514649fb; // "QFI\xfb"
export const V2_HEADER_LENGTH = 72;
export const V3_HEADER_LENGTH = 104;
/** What vmferry writes: 104 bytes + the compression type byte, padded to 8. */
export const V3_WRITE_HEADER_LENGTH = 112;

export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
/** qemu's limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE, QCOW_MAX_SNAPSHOTS). */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;
export const MAX_SNAPSHOTS = 65536;
export const MAX_SNAPSHOT_EXTRA = 1024;
export const MAX_BACKING_NAME = 1023;
export const SUBCLUSTERS = 32;

export const INCOMPAT_DIRTY = 1;
export const INCOMPAT_CORRUPT = 2;
export const INCOMPAT_DATA_FILE = 4;
export const INCOMPAT_COMPRESSION = 8;
export const INCOMPAT_EXTL2 = 16;
export const INCOMPAT_KNOWN = 0x1f;
export const COMPAT_LAZY_REFCOUNTS = 1;
export const AUTOCLEAR_BITMAPS = 1;
export const AUTOCLEAR_DATA_FILE_RAW = 2;

export const INCOMPAT_NAMES: Record<number, string> = {
  0: 'dirty bit',
  1: 'corrupt bit',
  2: 'external data file',
  3: 'compression type',
  4: 'extended L2 entries',
};

export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

export const COMPRESSION_ZLIB = 0;
export const COMPRESSION_ZSTD = 1;

/** Bits 9..55 of an L1/L2 entry: a host offset. */
const OFFSET_HI_MASK = 0x00ffffff;
const OFFSET_LO_MASK = 0xfffffe00;
const TWO32 = 2 ** 32;

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  clusterSize: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: number;
  compatible: number;
  autoclear: number;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
}

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

function u64(buf: Buffer, pos: number, what: string, file: string): number {
  const hi = buf.readUInt32BE(pos);
  const lo = buf.readUInt32BE(pos + 4);
  const v = hi * TWO32 + lo;
  if (!Number.isSafeInteger(v)) {
    throw new CorruptImageError(`header field ${what} (${buf.readBigUInt64BE(pos)}) is too large`, file);
  }
  return v;
}

/** Feature bit fields: only the low 32 bits have meanings; higher bits are reported as numbers. */
function bits64(buf: Buffer, pos: number): number {
  return buf.readUInt32BE(pos) * TWO32 + buf.readUInt32BE(pos + 4);
}

/** The highest set bit of a (possibly > 32-bit) feature field that is not in `known`. */
export function unknownBits(value: number, known: number): number[] {
  const out: number[] = [];
  const hi = Math.floor(value / TWO32);
  const lo = value % TWO32;
  for (let b = 0; b < 32; b++) {
    if ((lo >>> b) & 1 && !((known >>> b) & 1)) out.push(b);
    if ((hi >>> b) & 1) out.push(b + 32);
  }
  return out;
}

export function lowBits(value: number): number {
  return (value % TWO32) >>> 0;
}

export function isAligned(offset: number, clusterSize: number): boolean {
  return offset % clusterSize === 0;
}

/**
 * Decodes and validates the fixed header against the spec's bounds and the file size.
 * `head` holds at least the first min(file size, 64 KiB) bytes.
 */
export function decodeHeader(head: Buffer, fileSize: number, file: string): Qcow2Header {
  const bad = (why: string) => new CorruptImageError(why, file);
  if (head.length < V2_HEADER_LENGTH) throw bad(`file is too short for a qcow2 header (${fileSize} bytes)`);
  if (head.readUInt32BE(0) !== QCOW2_MAGIC) throw bad('not a qcow2 image (bad magic)');
  const version = head.readUInt32BE(4);
  if (version !== 2 && version !== 3) {
    throw new UnsupportedFeatureError(`qcow2 version ${version} is not supported (only 2 and 3)`, file);
  }
  const clusterBits = head.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw bad(`cluster size 2^${clusterBits} is outside 512 B .. 2 MiB`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(head, 8, 'backing_file_offset', file),
    backingFileSize: head.readUInt32BE(16),
    clusterBits,
    clusterSize,
    size: u64(head, 24, 'size', file),
    cryptMethod: head.readUInt32BE(32),
    l1Size: head.readUInt32BE(36),
    l1TableOffset: u64(head, 40, 'l1_table_offset', file),
    refcountTableOffset: u64(head, 48, 'refcount_table_offset', file),
    refcountTableClusters: head.readUInt32BE(56),
    nbSnapshots: head.readUInt32BE(60),
    snapshotsOffset: u64(head, 64, 'snapshots_offset', file),
    incompatible: 0,
    compatible: 0,
    autoclear: 0,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: COMPRESSION_ZLIB,
  };
  if (version === 3) {
    if (head.length < V3_HEADER_LENGTH) throw bad('file is too short for a qcow2 version 3 header');
    h.incompatible = bits64(head, 72);
    h.compatible = bits64(head, 80);
    h.autoclear = bits64(head, 88);
    h.refcountOrder = head.readUInt32BE(96);
    h.headerLength = head.readUInt32BE(100);
    if (h.headerLength < V3_HEADER_LENGTH || h.headerLength % 8 !== 0 || h.headerLength > clusterSize) {
      throw bad(`header length ${h.headerLength} is invalid (at least 104, a multiple of 8, within the first cluster)`);
    }
    if (h.headerLength > head.length) throw bad(`header length ${h.headerLength} lies beyond the end of the file`);
    if (h.headerLength > V3_HEADER_LENGTH) h.compressionType = head.readUInt8(104);
  }
  const unknown = unknownBits(h.incompatible, INCOMPAT_KNOWN);
  if (unknown.length > 0) {
    throw new UnsupportedFeatureError(
      `unknown incompatible feature bit ${unknown.join(', ')} is set; this image needs a newer qcow2 implementation`,
      file,
    );
  }
  if (h.cryptMethod !== 0) {
    const kind = h.cryptMethod === 1 ? 'AES' : h.cryptMethod === 2 ? 'LUKS' : `method ${h.cryptMethod}`;
    throw new UnsupportedFeatureError(`encrypted qcow2 images (${kind}) are not supported`, file);
  }
  if (h.refcountOrder > 6) throw bad(`refcount order ${h.refcountOrder} is above 6 (64-bit refcounts)`);
  if (h.compressionType !== COMPRESSION_ZLIB && h.compressionType !== COMPRESSION_ZSTD) {
    throw new UnsupportedFeatureError(`compression type ${h.compressionType} is not supported (zlib and zstd are)`, file);
  }
  if ((h.compressionType !== COMPRESSION_ZLIB) !== ((lowBits(h.incompatible) & INCOMPAT_COMPRESSION) !== 0)) {
    throw bad('the compression type field and the compression incompatible bit disagree');
  }
  if (extendedL2(h) && clusterBits < 14) throw bad('extended L2 entries need a cluster size of at least 16 KiB');
  // The fixed header must lie inside the file.
  if (h.headerLength > fileSize) throw bad('header lies beyond the end of the file');
  // Backing file name: inside the first cluster, at most 1023 bytes.
  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_NAME || h.backingFileOffset + h.backingFileSize > clusterSize) {
      throw bad(
        `backing file name (${h.backingFileSize} bytes at ${h.backingFileOffset}) is too long or outside the header cluster`,
      );
    }
    if (h.backingFileOffset + h.backingFileSize > fileSize) throw bad('backing file name lies beyond the end of the file');
  }
  // L1 table: bounded by qemu's limit, large enough for the virtual size, inside the file.
  const l2Entries = clusterSize / l2EntrySize(h);
  const needed = Math.ceil(h.size / (clusterSize * l2Entries));
  if (h.l1Size * 8 > MAX_L1_BYTES) throw bad(`L1 table of ${h.l1Size} entries is above qemu's limit of ${MAX_L1_BYTES} bytes`);
  if (h.l1Size < needed) {
    throw bad(`L1 table of ${h.l1Size} entries is too small for a virtual size of ${h.size} bytes (needs ${needed})`);
  }
  if (h.l1Size > 0) {
    if (!isAligned(h.l1TableOffset, clusterSize)) throw bad(`L1 table offset ${h.l1TableOffset} is not cluster aligned`);
    if (h.l1TableOffset + h.l1Size * 8 > fileSize) {
      throw bad(`L1 table (${h.l1Size} entries at ${h.l1TableOffset}) lies beyond the end of the file (${fileSize} bytes)`);
    }
  }
  if (!isAligned(h.refcountTableOffset, clusterSize) || h.refcountTableOffset === 0) {
    throw bad(`refcount table offset ${h.refcountTableOffset} is invalid`);
  }
  if (h.refcountTableClusters * clusterSize > MAX_REFTABLE_BYTES) {
    throw bad(`refcount table of ${h.refcountTableClusters} clusters is above qemu's limit`);
  }
  if (h.nbSnapshots > MAX_SNAPSHOTS) throw bad(`${h.nbSnapshots} snapshots is above the limit of ${MAX_SNAPSHOTS}`);
  if (h.nbSnapshots > 0) {
    if (!isAligned(h.snapshotsOffset, clusterSize))
      throw bad(`snapshot table offset ${h.snapshotsOffset} is not cluster aligned`);
    if (h.snapshotsOffset >= fileSize) throw bad('snapshot table lies beyond the end of the file');
  }
  if (version === 2 && h.refcountOrder !== 4) throw bad('version 2 images must use 16-bit refcounts');
  return h;
}

export function extendedL2(h: Pick<Qcow2Header, 'incompatible'>): boolean {
  return (lowBits(h.incompatible) & INCOMPAT_EXTL2) !== 0;
}

/** Bytes per L2 entry: 8, or 16 with extended L2 (entry + subcluster bitmap). */
export function l2EntrySize(h: Pick<Qcow2Header, 'incompatible'>): number {
  return extendedL2(h) ? 16 : 8;
}

/** Header extensions between the header and the end of the first cluster (or the backing name). */
export function decodeExtensions(head: Buffer, h: Qcow2Header, file: string): HeaderExtension[] {
  const out: HeaderExtension[] = [];
  let pos = h.headerLength;
  const end = Math.min(head.length, h.clusterSize, h.backingFileOffset > 0 ? h.backingFileOffset : h.clusterSize);
  while (pos + 8 <= end) {
    const type = head.readUInt32BE(pos);
    const length = head.readUInt32BE(pos + 4);
    if (type === EXT_END) return out;
    if (pos + 8 + length > end) throw new CorruptImageError(`header extension 0x${type.toString(16)} overruns the header`, file);
    out.push({ type, data: Buffer.from(head.subarray(pos + 8, pos + 8 + length)) });
    pos += 8 + Math.ceil(length / 8) * 8;
  }
  return out;
}

/** The incompatible-feature names from the feature name table, by bit. */
export function featureNames(exts: HeaderExtension[]): Map<number, string> {
  const names = new Map<number, string>();
  for (const e of exts) {
    if (e.type !== EXT_FEATURE_TABLE) continue;
    for (let p = 0; p + 48 <= e.data.length; p += 48) {
      if (e.data[p] !== 0) continue;
      const raw = e.data.subarray(p + 2, p + 48);
      const nul = raw.indexOf(0);
      names.set(e.data[p + 1]!, raw.subarray(0, nul < 0 ? raw.length : nul).toString('latin1'));
    }
  }
  return names;
}

/** Host offset in bits 9..55 of an L1 or standard L2 entry given as two 32-bit halves. */
export function entryOffset(hi: number, lo: number): number {
  return (hi & OFFSET_HI_MASK) * TWO32 + ((lo & OFFSET_LO_MASK) >>> 0);
}

/** A compressed L2 entry: where its bytes lie. */
export function compressedLocation(hi: number, lo: number, clusterBits: number): { offset: number; length: number } {
  const entry = (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
  const x = BigInt(62 - (clusterBits - 8));
  const offset = Number(entry & ((1n << x) - 1n));
  const sectors = Number((entry >> x) & ((1n << BigInt(clusterBits - 8)) - 1n));
  return { offset, length: (sectors + 1) * 512 - (offset % 512) };
}

/** Encodes a compressed L2 entry (bit 62 set) for data of `length` bytes at `offset`. */
export function encodeCompressedEntry(offset: number, length: number, clusterBits: number): bigint {
  const x = BigInt(62 - (clusterBits - 8));
  const lastSector = Math.floor((offset + length - 1) / 512);
  const extra = BigInt(lastSector - Math.floor(offset / 512));
  return (1n << 62n) | (extra << x) | BigInt(offset);
}

export interface SnapshotEntry {
  l1TableOffset: number;
  l1Size: number;
  id: string;
  name: string;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  vmStateSize: number;
  /** Virtual size when the snapshot was taken (extra data), else undefined. */
  diskSize?: number;
  icount?: number;
  extraData: Buffer;
}

/** Fixed part of a snapshot table entry. */
export const SNAPSHOT_FIXED = 40;

/** Decodes one snapshot entry at `pos` of `buf`; returns it with the entry's padded length. */
export function decodeSnapshot(buf: Buffer, pos: number, file: string): { entry: SnapshotEntry; length: number } | null {
  if (pos + SNAPSHOT_FIXED > buf.length) return null;
  const extraSize = buf.readUInt32BE(pos + 36);
  if (extraSize > MAX_SNAPSHOT_EXTRA) throw new CorruptImageError(`snapshot extra data of ${extraSize} bytes is too large`, file);
  const idSize = buf.readUInt16BE(pos + 12);
  const nameSize = buf.readUInt16BE(pos + 14);
  const raw = SNAPSHOT_FIXED + extraSize + idSize + nameSize;
  const length = Math.ceil(raw / 8) * 8;
  if (pos + raw > buf.length) return null;
  const extra = buf.subarray(pos + SNAPSHOT_FIXED, pos + SNAPSHOT_FIXED + extraSize);
  const idStart = pos + SNAPSHOT_FIXED + extraSize;
  const vmStateSmall = buf.readUInt32BE(pos + 32);
  const entry: SnapshotEntry = {
    l1TableOffset: u64(buf, pos, 'snapshot l1_table_offset', file),
    l1Size: buf.readUInt32BE(pos + 8),
    id: buf.subarray(idStart, idStart + idSize).toString('utf8'),
    name: buf.subarray(idStart + idSize, idStart + idSize + nameSize).toString('utf8'),
    dateSec: buf.readUInt32BE(pos + 16),
    dateNsec: buf.readUInt32BE(pos + 20),
    vmClockNsec: u64(buf, pos + 24, 'snapshot vm_clock_nsec', file),
    vmStateSize: vmStateSmall,
    extraData: Buffer.from(extra),
  };
  if (extraSize >= 8) {
    const large = u64(extra, 0, 'snapshot vm_state_size', file);
    if (large > 0 || vmStateSmall === 0) entry.vmStateSize = large;
  }
  if (extraSize >= 16) entry.diskSize = u64(extra, 8, 'snapshot disk_size', file);
  if (extraSize >= 24) entry.icount = Number(extra.readBigInt64BE(16));
  return { entry, length };
}

export interface HeaderFields {
  version: 2 | 3;
  clusterBits: number;
  size: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  incompatible: number;
  compatible: number;
  autoclear: number;
  refcountOrder: number;
  compressionType: number;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  /** Include the feature name table (left out when the first cluster is too small). */
  featureTable?: boolean;
}

/** Feature name table entries vmferry writes (as qemu does), so tools can name the bits. */
const FEATURE_TABLE: [number, number, string][] = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

function extension(type: number, data: Buffer): Buffer {
  const out = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
  out.writeUInt32BE(type, 0);
  out.writeUInt32BE(data.length, 4);
  data.copy(out, 8);
  return out;
}

/** Encodes the first cluster's content: header, extensions, backing file name. */
export function encodeHeader(f: HeaderFields): Buffer {
  const headerLength = f.version === 3 ? V3_WRITE_HEADER_LENGTH : V2_HEADER_LENGTH;
  const fixed = Buffer.alloc(headerLength);
  fixed.writeUInt32BE(QCOW2_MAGIC, 0);
  fixed.writeUInt32BE(f.version, 4);
  fixed.writeUInt32BE(f.clusterBits, 20);
  fixed.writeBigUInt64BE(BigInt(f.size), 24);
  fixed.writeUInt32BE(f.l1Size, 36);
  fixed.writeBigUInt64BE(BigInt(f.l1TableOffset), 40);
  fixed.writeBigUInt64BE(BigInt(f.refcountTableOffset), 48);
  fixed.writeUInt32BE(f.refcountTableClusters, 56);
  const parts: Buffer[] = [fixed];
  if (f.version === 3) {
    fixed.writeBigUInt64BE(BigInt(f.incompatible), 72);
    fixed.writeBigUInt64BE(BigInt(f.compatible), 80);
    fixed.writeBigUInt64BE(BigInt(f.autoclear), 88);
    fixed.writeUInt32BE(f.refcountOrder, 96);
    fixed.writeUInt32BE(headerLength, 100);
    fixed.writeUInt8(f.compressionType, 104);
    if (f.backingFormat) parts.push(extension(EXT_BACKING_FORMAT, Buffer.from(f.backingFormat, 'utf8')));
    if (f.dataFile) parts.push(extension(EXT_DATA_FILE, Buffer.from(f.dataFile, 'utf8')));
    if (f.featureTable !== false) {
      const table = Buffer.alloc(48 * FEATURE_TABLE.length);
      FEATURE_TABLE.forEach(([type, bit, name], i) => {
        table[i * 48] = type;
        table[i * 48 + 1] = bit;
        table.write(name, i * 48 + 2, 46, 'latin1');
      });
      parts.push(extension(EXT_FEATURE_TABLE, table));
    }
    parts.push(Buffer.alloc(8)); // end of extensions
  } else if (f.backingFormat) {
    // Version 2 images may carry extensions too (qemu writes the backing format there).
    parts.push(extension(EXT_BACKING_FORMAT, Buffer.from(f.backingFormat, 'utf8')));
    parts.push(Buffer.alloc(8));
  }
  let out = Buffer.concat(parts);
  if (f.backingFile) {
    const name = Buffer.from(f.backingFile, 'utf8');
    out.writeBigUInt64BE(BigInt(out.length), 8);
    out.writeUInt32BE(name.length, 16);
    out = Buffer.concat([out, name]);
  }
  return out;
}

/**
 * Length of the zstd frame at the start of `buf` (qemu stores a cluster as one frame followed by
 * padding or the next cluster's bytes), from the frame header and block headers.
 */
export function zstdFrameLength(buf: Buffer): number {
  if (buf.length < 6 || buf.readUInt32LE(0) !== 0xfd2fb528) throw new Error('not a zstd frame');
  const fhd = buf[4]!;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const checksum = (fhd >> 2) & 1;
  const dictFlag = fhd & 3;
  let pos = 5 + (single ? 0 : 1) + [0, 1, 2, 4][dictFlag]! + [single ? 1 : 0, 2, 4, 8][fcsFlag]!;
  for (;;) {
    if (pos + 3 > buf.length) throw new Error('truncated zstd frame');
    const bh = buf[pos]! | (buf[pos + 1]! << 8) | (buf[pos + 2]! << 16);
    const last = bh & 1;
    const type = (bh >> 1) & 3;
    const size = bh >>> 3;
    if (type === 3) throw new Error('reserved zstd block type');
    pos += 3 + (type === 1 ? 1 : size);
    if (last) break;
  }
  pos += checksum ? 4 : 0;
  if (pos > buf.length) throw new Error('truncated zstd frame');
  return pos;
}

/** Options create() accepts (-o), as qemu-img names them. */
export const QCOW2_CREATE_OPTIONS = [
  'compat',
  'cluster_size',
  'compression_type',
  'preallocation',
  'backing_file',
  'backing_fmt',
  'extended_l2',
  'refcount_bits',
  'lazy_refcounts',
] as const;
