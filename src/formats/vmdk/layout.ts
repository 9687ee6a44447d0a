/**
 * VMDK on-disk structures: the hosted sparse extent header (KDMV), the ESX COW header (COWD),
 * the seSparse headers, stream markers, the text descriptor, and geometry. Every field is
 * checked against the format's bounds here, before anything sizes an allocation or a loop.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../disk/errors.js';

export const SECTOR = 512;
export const KDMV_MAGIC = 0x4b444d56; // "KDMV" read big-endian
export const COWD_MAGIC = 0x434f5744; // "COWD" read big-endian
export const SESPARSE_CONST_MAGIC = 0xcafebabe;
export const SESPARSE_VOLATILE_MAGIC = 0xcafecafe;

export const FLAG_NL_DETECT = 1 << 0;
export const FLAG_RGD = 1 << 1;
export const FLAG_ZERO_GRAIN = 1 << 2;
export const FLAG_COMPRESSED = 1 << 16;
export const FLAG_MARKERS = 1 << 17;
export const COMPRESSION_DEFLATE = 1;
/** gdOffset value meaning "read the grain directory offset from the footer". */
export const GD_AT_END = 0xffffffffffffffffn;

export const MARKER_EOS = 0;
export const MARKER_GT = 1;
export const MARKER_GD = 2;
export const MARKER_FOOTER = 3;

/** Largest grain we accept (qemu accepts up to 1 GiB; 64 MiB is far beyond any real writer). */
export const MAX_GRAIN_SECTORS = 1 << 17;
/** Largest descriptor we read (qemu reads at most 1 MiB). */
export const MAX_DESCRIPTOR_BYTES = 1 << 20;
/** Grain table entries VMware and qemu use. */
export const GTES_PER_GT = 512;
/** The split size of twoGbMaxExtent* images. */
export const SPLIT_BYTES = 2 ** 31;

/** Header of a hosted sparse extent (monolithicSparse, twoGbMaxExtentSparse, streamOptimized). */
export interface SparseHeader {
  version: number;
  flags: number;
  capacity: number; // sectors
  grainSize: number; // sectors
  descriptorOffset: number; // sectors
  descriptorSize: number; // sectors
  numGTEsPerGT: number;
  rgdOffset: number; // sectors
  /** Sectors; -1 when the header says GD_AT_END. */
  gdOffset: number;
  overHead: number; // sectors
  uncleanShutdown: boolean;
  compressAlgorithm: number;
}

function u64(buf: Buffer, off: number, what: string, file: string): number {
  const v = buf.readBigUInt64LE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new CorruptImageError(`${what} ${v} is out of range`, file);
  return Number(v);
}

export function isPowerOfTwo(n: number): boolean {
  return n > 0 && Number.isSafeInteger(n) && 2 ** Math.round(Math.log2(n)) === n;
}

/** Decodes the 512-byte KDMV header (from offset 0 of a sparse extent, or a footer). */
export function decodeSparseHeader(buf: Buffer, file: string): SparseHeader {
  if (buf.length < SECTOR || buf.readUInt32BE(0) !== KDMV_MAGIC) {
    throw new CorruptImageError('not a VMDK sparse extent (no KDMV magic)', file);
  }
  const gdRaw = buf.readBigUInt64LE(56);
  const h: SparseHeader = {
    version: buf.readUInt32LE(4),
    flags: buf.readUInt32LE(8),
    capacity: u64(buf, 12, 'capacity', file),
    grainSize: u64(buf, 20, 'grain size', file),
    descriptorOffset: u64(buf, 28, 'descriptor offset', file),
    descriptorSize: u64(buf, 36, 'descriptor size', file),
    numGTEsPerGT: buf.readUInt32LE(44),
    rgdOffset: u64(buf, 48, 'redundant grain directory offset', file),
    gdOffset: gdRaw === GD_AT_END ? -1 : u64(buf, 56, 'grain directory offset', file),
    overHead: u64(buf, 64, 'overhead', file),
    uncleanShutdown: buf[72] !== 0,
    compressAlgorithm: buf.readUInt16LE(77),
  };
  if (h.version < 1 || h.version > 3) {
    throw new UnsupportedFeatureError(`VMDK sparse extent version ${h.version} is not supported (1 to 3 are)`, file);
  }
  return h;
}

/** Checks the fields that size tables and loops, against the spec and the file size. */
export function validateSparseHeader(h: SparseHeader, fileSize: number, file: string): void {
  if (!isPowerOfTwo(h.grainSize) || h.grainSize > MAX_GRAIN_SECTORS) {
    throw new CorruptImageError(`grain size ${h.grainSize} sectors is invalid (a power of two up to ${MAX_GRAIN_SECTORS})`, file);
  }
  if (h.numGTEsPerGT < 1 || h.numGTEsPerGT > 4096) {
    throw new CorruptImageError(`${h.numGTEsPerGT} grain table entries per grain table is invalid`, file);
  }
  if (h.capacity * SECTOR > Number.MAX_SAFE_INTEGER)
    throw new CorruptImageError(`capacity ${h.capacity} sectors is too large`, file);
  if (h.compressAlgorithm !== 0 && h.compressAlgorithm !== COMPRESSION_DEFLATE) {
    throw new UnsupportedFeatureError(`compression algorithm ${h.compressAlgorithm} is not supported (only deflate)`, file);
  }
  if (h.gdOffset >= 0 && h.capacity > 0 && h.gdOffset * SECTOR >= fileSize) {
    throw new CorruptImageError(
      `grain directory at sector ${h.gdOffset} lies beyond the end of the file (${fileSize} bytes)`,
      file,
    );
  }
}

/** Encodes a KDMV header sector. `gdOffset` -1 writes GD_AT_END. */
export function encodeSparseHeader(h: SparseHeader): Buffer {
  const buf = Buffer.alloc(SECTOR);
  buf.writeUInt32BE(KDMV_MAGIC, 0);
  buf.writeUInt32LE(h.version, 4);
  buf.writeUInt32LE(h.flags >>> 0, 8);
  buf.writeBigUInt64LE(BigInt(h.capacity), 12);
  buf.writeBigUInt64LE(BigInt(h.grainSize), 20);
  buf.writeBigUInt64LE(BigInt(h.descriptorOffset), 28);
  buf.writeBigUInt64LE(BigInt(h.descriptorSize), 36);
  buf.writeUInt32LE(h.numGTEsPerGT, 44);
  buf.writeBigUInt64LE(BigInt(h.rgdOffset), 48);
  buf.writeBigUInt64LE(h.gdOffset < 0 ? GD_AT_END : BigInt(h.gdOffset), 56);
  buf.writeBigUInt64LE(BigInt(h.overHead), 64);
  buf[72] = h.uncleanShutdown ? 1 : 0;
  buf[73] = 0x0a; // the newline-detection check bytes
  buf[74] = 0x20;
  buf[75] = 0x0d;
  buf[76] = 0x0a;
  buf.writeUInt16LE(h.compressAlgorithm, 77);
  return buf;
}

/** ESX "COWD" sparse header (vmfsSparse). */
export interface CowdHeader {
  version: number;
  flags: number;
  numSectors: number;
  grainSize: number;
  gdOffset: number;
  numGDEntries: number;
  freeSector: number;
}

export const COWD_GTES_PER_GT = 4096;

export function decodeCowdHeader(buf: Buffer, fileSize: number, file: string): CowdHeader {
  if (buf.length < 32 || buf.readUInt32BE(0) !== COWD_MAGIC) throw new CorruptImageError('not a COWD sparse extent', file);
  const h: CowdHeader = {
    version: buf.readUInt32LE(4),
    flags: buf.readUInt32LE(8),
    numSectors: buf.readUInt32LE(12),
    grainSize: buf.readUInt32LE(16),
    gdOffset: buf.readUInt32LE(20),
    numGDEntries: buf.readUInt32LE(24),
    freeSector: buf.readUInt32LE(28),
  };
  if (!isPowerOfTwo(h.grainSize) || h.grainSize > MAX_GRAIN_SECTORS) {
    throw new CorruptImageError(`COWD grain size ${h.grainSize} sectors is invalid`, file);
  }
  const needed = Math.ceil(h.numSectors / (h.grainSize * COWD_GTES_PER_GT));
  if (h.numGDEntries < needed) {
    throw new CorruptImageError(`COWD grain directory has ${h.numGDEntries} entries, ${needed} are needed`, file);
  }
  if (h.gdOffset * SECTOR + needed * 4 > fileSize) {
    throw new CorruptImageError(`COWD grain directory at sector ${h.gdOffset} lies beyond the end of the file`, file);
  }
  return h;
}

/** seSparse constant header (ESXi 6.5+ snapshot deltas). All offsets and sizes in sectors. */
export interface SeSparseHeader {
  capacity: number;
  grainSize: number;
  grainTableSize: number;
  volatileHeaderOffset: number;
  grainDirOffset: number;
  grainDirSize: number;
  grainTablesOffset: number;
  grainTablesSize: number;
  grainsOffset: number;
  grainsSize: number;
}

export function decodeSeSparseHeader(buf: Buffer, fileSize: number, file: string): SeSparseHeader {
  if (buf.length < SECTOR || buf.readBigUInt64LE(0) !== BigInt(SESPARSE_CONST_MAGIC)) {
    throw new CorruptImageError('not a seSparse extent (bad constant header magic)', file);
  }
  const version = buf.readBigUInt64LE(8);
  if (version !== 0x0000000200000001n) {
    throw new UnsupportedFeatureError(`seSparse version 0x${version.toString(16)} is not supported`, file);
  }
  const f = (off: number, what: string) => u64(buf, off, what, file);
  const h: SeSparseHeader = {
    capacity: f(16, 'capacity'),
    grainSize: f(24, 'grain size'),
    grainTableSize: f(32, 'grain table size'),
    volatileHeaderOffset: f(80, 'volatile header offset'),
    grainDirOffset: f(128, 'grain directory offset'),
    grainDirSize: f(136, 'grain directory size'),
    grainTablesOffset: f(144, 'grain tables offset'),
    grainTablesSize: f(152, 'grain tables size'),
    grainsOffset: f(192, 'grains offset'),
    grainsSize: f(200, 'grains size'),
  };
  const flags = buf.readBigUInt64LE(40);
  if (flags !== 0n) throw new UnsupportedFeatureError(`seSparse flags 0x${flags.toString(16)} are not supported`, file);
  if (h.grainSize !== 8) throw new UnsupportedFeatureError(`seSparse grain size ${h.grainSize} is not supported (8)`, file);
  if (h.grainTableSize !== 64) {
    throw new UnsupportedFeatureError(`seSparse grain table size ${h.grainTableSize} is not supported (64)`, file);
  }
  if (h.capacity * SECTOR > Number.MAX_SAFE_INTEGER) throw new CorruptImageError('seSparse capacity is too large', file);
  const gtCoverage = h.grainSize * ((h.grainTableSize * SECTOR) / 8);
  const gdEntries = Math.ceil(h.capacity / gtCoverage);
  if (gdEntries * 8 > h.grainDirSize * SECTOR) {
    throw new CorruptImageError(`seSparse grain directory (${h.grainDirSize} sectors) is too small for the capacity`, file);
  }
  for (const [off, size, what] of [
    [h.grainDirOffset, h.grainDirSize, 'grain directory'],
    [h.volatileHeaderOffset, 1, 'volatile header'],
  ] as const) {
    if ((off + size) * SECTOR > fileSize) {
      throw new CorruptImageError(`seSparse ${what} at sector ${off} lies beyond the end of the file (${fileSize} bytes)`, file);
    }
  }
  return h;
}

export function checkSeSparseVolatile(buf: Buffer, file: string): void {
  if (buf.readBigUInt64LE(0) !== BigInt(SESPARSE_VOLATILE_MAGIC)) {
    throw new CorruptImageError('seSparse volatile header has a bad magic', file);
  }
  if (buf.readBigUInt64LE(24) !== 0n) {
    throw new UnsupportedFeatureError('seSparse journal needs replaying (the image was not closed cleanly)', file);
  }
}

/** A stream marker: for grains `value` is the LBA and `size` the compressed length; metadata markers have size 0. */
export interface Marker {
  value: number;
  size: number;
  type: number;
}

export function decodeMarker(buf: Buffer, file: string): Marker {
  const value = u64(buf, 0, 'marker value', file);
  const size = buf.readUInt32LE(8);
  return { value, size, type: size === 0 ? buf.readUInt32LE(12) : -1 };
}

/** A metadata marker sector (GT, GD, footer, EOS). */
export function encodeMetaMarker(numSectors: number, type: number): Buffer {
  const buf = Buffer.alloc(SECTOR);
  buf.writeBigUInt64LE(BigInt(numSectors), 0);
  buf.writeUInt32LE(0, 8);
  buf.writeUInt32LE(type, 12);
  return buf;
}

/** A grain marker + compressed data, padded to a whole sector: pure, so a worker pool can run it. */
export function encodeGrain(lba: number, compressed: Buffer): Buffer {
  const total = Math.ceil((12 + compressed.length) / SECTOR) * SECTOR;
  // Not zero-filled first: every byte is written once (a gigabyte of grains is a gigabyte to clear).
  const buf = Buffer.allocUnsafe(total);
  buf.writeBigUInt64LE(BigInt(lba), 0);
  buf.writeUInt32LE(compressed.length, 8);
  compressed.copy(buf, 12);
  buf.fill(0, 12 + compressed.length);
  return buf;
}

// ---------------------------------------------------------------------------------------------
// The text descriptor

export type ExtentAccess = 'RW' | 'RDONLY' | 'NOACCESS';
export type ExtentType = 'SPARSE' | 'FLAT' | 'ZERO' | 'VMFS' | 'VMFSSPARSE' | 'VMFSRDM' | 'VMFSRAW' | 'SESPARSE';
const EXTENT_TYPES: readonly string[] = ['SPARSE', 'FLAT', 'ZERO', 'VMFS', 'VMFSSPARSE', 'VMFSRDM', 'VMFSRAW', 'SESPARSE'];

export interface DescriptorExtent {
  access: ExtentAccess;
  sectors: number;
  type: ExtentType;
  file?: string;
  /** Sectors into the file (FLAT). */
  offset: number;
}

export interface Descriptor {
  version: number;
  cid: number;
  parentCid: number;
  createType: string;
  parentFileNameHint?: string;
  extents: DescriptorExtent[];
  /** ddb.* keys without the prefix, e.g. adapterType, geometry.cylinders, uuid. */
  ddb: Record<string, string>;
}

export const NO_PARENT_CID = 0xffffffff;

function unquote(v: string): string {
  const t = v.trim();
  return t.length >= 2 && t.startsWith('"') && t.endsWith('"') ? t.slice(1, -1) : t;
}

function parseCid(v: string, what: string, file: string): number {
  const t = unquote(v);
  if (!/^[0-9a-fA-F]{1,8}$/.test(t)) throw new CorruptImageError(`descriptor ${what} '${t}' is not a 32-bit hex number`, file);
  return Number.parseInt(t, 16) >>> 0;
}

/** True when the text looks like a VMDK descriptor (comments and blank lines, then version=N). */
export function looksLikeDescriptor(head: Buffer): boolean {
  const text = head.subarray(0, Math.min(head.length, 4096)).toString('latin1');
  for (const rawLine of text.split('\n')) {
    const line = rawLine.replace(/\r$/, '');
    if (line.startsWith('#')) continue;
    if (line.trim() === '') continue;
    return /^version=[123]\s*$/.test(line);
  }
  return false;
}

/** Parses a descriptor; `text` ends at the first NUL. */
export function parseDescriptor(text: string, file: string): Descriptor {
  const nul = text.indexOf('\0');
  const body = nul >= 0 ? text.slice(0, nul) : text;
  const d: Descriptor = { version: 1, cid: 0, parentCid: NO_PARENT_CID, createType: '', extents: [], ddb: {} };
  let sawCid = false;
  let total = 0;
  for (const rawLine of body.split('\n')) {
    const line = rawLine.trim();
    if (line === '' || line.startsWith('#')) continue;
    const ext = /^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Z]+)(?:\s+"([^"]*)"(?:\s+(\d+))?)?\s*$/.exec(line);
    if (ext) {
      const type = ext[3]!;
      if (!EXTENT_TYPES.includes(type)) throw new UnsupportedFeatureError(`extent type ${type} is not supported`, file);
      const sectors = Number(ext[2]);
      const offset = ext[5] === undefined ? 0 : Number(ext[5]);
      if (!Number.isSafeInteger(sectors) || sectors <= 0 || !Number.isSafeInteger(offset * SECTOR)) {
        throw new CorruptImageError(`invalid extent line: ${line}`, file);
      }
      if (type !== 'ZERO' && ext[4] === undefined) throw new CorruptImageError(`extent line names no file: ${line}`, file);
      if (type === 'FLAT' && ext[5] === undefined) throw new CorruptImageError(`FLAT extent line has no offset: ${line}`, file);
      total += sectors;
      if (total * SECTOR > Number.MAX_SAFE_INTEGER) throw new CorruptImageError('extents add up to an impossible size', file);
      d.extents.push({ access: ext[1] as ExtentAccess, sectors, type: type as ExtentType, file: ext[4], offset });
      continue;
    }
    if (/^(RW|RDONLY|NOACCESS)\s/.test(line)) throw new CorruptImageError(`invalid extent line: ${line}`, file);
    const kv = /^([A-Za-z0-9_.]+)\s*=\s*(.*)$/.exec(line);
    if (!kv) continue; // unknown lines are tolerated, as VMware does
    const key = kv[1]!;
    const value = kv[2]!;
    if (key === 'version') d.version = Number(unquote(value));
    else if (key === 'CID') {
      d.cid = parseCid(value, 'CID', file);
      sawCid = true;
    } else if (key === 'parentCID') d.parentCid = parseCid(value, 'parentCID', file);
    else if (key === 'createType') d.createType = unquote(value);
    else if (key === 'parentFileNameHint') d.parentFileNameHint = unquote(value);
    else if (key.startsWith('ddb.')) d.ddb[key.slice(4)] = unquote(value);
  }
  if (!sawCid) throw new CorruptImageError('descriptor has no CID', file);
  return d;
}

export interface DescriptorFields {
  cid: number;
  parentCid: number;
  createType: string;
  parentFileNameHint?: string;
  extentLines: string[];
  ddb: [string, string][];
}

/** Formats a descriptor the way qemu-img and VMware lay it out. */
export function formatDescriptor(f: DescriptorFields): string {
  const hex = (n: number) => (n >>> 0).toString(16).padStart(8, '0');
  return [
    '# Disk DescriptorFile',
    'version=1',
    `CID=${hex(f.cid)}`,
    `parentCID=${hex(f.parentCid)}`,
    `createType="${f.createType}"`,
    ...(f.parentFileNameHint ? [`parentFileNameHint="${f.parentFileNameHint}"`] : []),
    '',
    '# Extent description',
    ...f.extentLines,
    '',
    '# The Disk Data Base',
    '#DDB',
    '',
    ...f.ddb.map(([k, v]) => `ddb.${k} = "${v}"`),
    '',
  ].join('\n');
}

/** Geometry as qemu-img computes it: 63 sectors, 16 heads for IDE and 255 otherwise. */
export function geometry(virtualSize: number, adapterType: string): { cylinders: number; heads: number; sectors: number } {
  const heads = adapterType === 'ide' ? 16 : 255;
  return { cylinders: Math.floor(virtualSize / (63 * heads * SECTOR)), heads, sectors: 63 };
}

/** VMware's ddb.uuid spelling: "60 00 c2 9a 4f 2e 6b 9c-d3 18 8d 4a 45 4b d4 e2". */
export function formatDdbUuid(bytes: Buffer): string {
  const h = [...bytes.subarray(0, 16)].map((b) => b.toString(16).padStart(2, '0'));
  return `${h.slice(0, 8).join(' ')}-${h.slice(8, 16).join(' ')}`;
}

/** Options create() accepts (-o), as qemu-img names them. */
export const VMDK_CREATE_OPTIONS = ['subformat', 'adapter_type', 'hwversion', 'toolsversion', 'compat6', 'zeroed_grain'] as const;

/** What a sparse extent file holds, by its magic. */
export type ExtentMagic = 'kdmv' | 'cowd' | 'sesparse' | 'other';

export function extentMagic(head: Buffer): ExtentMagic {
  if (head.length >= 4 && head.readUInt32BE(0) === KDMV_MAGIC) return 'kdmv';
  if (head.length >= 4 && head.readUInt32BE(0) === COWD_MAGIC) return 'cowd';
  if (head.length >= 8 && head.readBigUInt64LE(0) === BigInt(SESPARSE_CONST_MAGIC)) return 'sesparse';
  return 'other';
}
