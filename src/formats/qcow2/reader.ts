import { dirname, resolve as resolvePath } from 'node:path';
import { inflateRawSync } from 'node:zlib';
import { CorruptImageError, UnsafeReferenceError, UnsupportedFeatureError, VmferryError } from '../../disk/errors.js';
import type { Segment } from '../../disk/mapped.js';
import { MappedDiskReader } from '../../disk/mapped.js';
import { resolveReference } from '../../disk/refs.js';
import { type ByteSource, FileSource, readExact } from '../../disk/source.js';
import {
  DEFAULT_MAX_METADATA_MEMORY,
  type DiskReader,
  type FormatDetails,
  type OpenOptions,
  type SnapshotInfo,
} from '../../disk/types.js';
import { zstd } from '../../disk/zstd.js';
import {
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZSTD,
  compressedLocation,
  decodeExtensions,
  decodeHeader,
  decodeSnapshot,
  EXT_BACKING_FORMAT,
  EXT_CRYPTO,
  EXT_DATA_FILE,
  entryOffset,
  extendedL2,
  type HeaderExtension,
  INCOMPAT_CORRUPT,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  l2EntrySize,
  lowBits,
  MAX_L1_BYTES,
  MAX_SNAPSHOT_EXTRA,
  type Qcow2Header,
  SNAPSHOT_FIXED,
  type SnapshotEntry,
  SUBCLUSTERS,
  zstdFrameLength,
} from './layout.js';

/** L1 entries are read in chunks of this many (32 KiB), on demand. */
const L1_CHUNK = 4096;

/** Everything parsed from an image's first cluster and snapshot table. */
export interface Qcow2Metadata {
  header: Qcow2Header;
  extensions: HeaderExtension[];
  backingName?: string;
  backingFormat?: string;
  dataFileName?: string;
  snapshots: SnapshotEntry[];
}

/** Reads and validates the header, its extensions and the snapshot table. */
export async function readMetadata(source: ByteSource): Promise<Qcow2Metadata> {
  const file = source.name;
  const head = await source.read(0, Math.min(source.size, 64 * 1024));
  const header = decodeHeader(head, source.size, file);
  let first = head;
  if (header.clusterSize > head.length && source.size > head.length) {
    first = await source.read(0, Math.min(source.size, header.clusterSize));
  }
  const extensions = decodeExtensions(first, header, file);
  const meta: Qcow2Metadata = { header, extensions, snapshots: [] };
  if (header.backingFileOffset !== 0 && header.backingFileSize > 0) {
    meta.backingName = first
      .subarray(header.backingFileOffset, header.backingFileOffset + header.backingFileSize)
      .toString('utf8');
  }
  for (const e of extensions) {
    if (e.type === EXT_BACKING_FORMAT) meta.backingFormat = e.data.toString('utf8').replace(/\0+$/, '');
    if (e.type === EXT_DATA_FILE) meta.dataFileName = e.data.toString('utf8').replace(/\0+$/, '');
    if (e.type === EXT_CRYPTO) throw new UnsupportedFeatureError('encrypted qcow2 images are not supported', file);
  }
  meta.snapshots = await readSnapshotTable(source, header);
  return meta;
}

async function readSnapshotTable(source: ByteSource, h: Qcow2Header): Promise<SnapshotEntry[]> {
  const out: SnapshotEntry[] = [];
  if (h.nbSnapshots === 0) return out;
  // Each entry is at most 40 + 1024 + 2 * 65535 bytes; read in blocks and grow as needed.
  const maxEntry = SNAPSHOT_FIXED + MAX_SNAPSHOT_EXTRA + 2 * 65535 + 8;
  let pos = h.snapshotsOffset;
  let buf: Buffer = Buffer.alloc(0);
  let bufStart = pos;
  for (let i = 0; i < h.nbSnapshots; i++) {
    let decoded = decodeSnapshot(buf, pos - bufStart, source.name);
    if (!decoded) {
      const want = Math.min(source.size - pos, Math.max(64 * 1024, maxEntry));
      if (want < SNAPSHOT_FIXED) {
        throw new CorruptImageError(`snapshot table entry ${i} lies beyond the end of the file`, source.name);
      }
      buf = await source.read(pos, want);
      bufStart = pos;
      decoded = decodeSnapshot(buf, 0, source.name);
      if (!decoded) throw new CorruptImageError(`snapshot table entry ${i} lies beyond the end of the file`, source.name);
    }
    out.push(decoded.entry);
    pos += decoded.length;
  }
  return out;
}

/** qemu's snapshot fields, as `qemu-img info` lists them. */
export function snapshotInfo(s: SnapshotEntry): SnapshotInfo {
  const info: SnapshotInfo = {
    id: s.id,
    name: s.name,
    vmStateSize: s.vmStateSize,
    dateSec: s.dateSec,
    dateNsec: s.dateNsec,
    vmClockNsec: s.vmClockNsec,
  };
  if (s.icount !== undefined && s.icount >= 0) info.icount = s.icount;
  return info;
}

/** qemu-img info's "format-specific" data for qcow2. */
export function formatSpecific(meta: Qcow2Metadata): { type: string; data: Record<string, unknown> } {
  const h = meta.header;
  const data: Record<string, unknown> = {
    compat: h.version === 2 ? '0.10' : '1.1',
    'compression-type': h.compressionType === COMPRESSION_ZSTD ? 'zstd' : 'zlib',
  };
  if (h.version === 3) {
    data['lazy-refcounts'] = (lowBits(h.compatible) & COMPAT_LAZY_REFCOUNTS) !== 0;
  }
  data['refcount-bits'] = 2 ** h.refcountOrder;
  if (h.version === 3) {
    if (meta.dataFileName !== undefined) {
      data['data-file'] = meta.dataFileName;
      data['data-file-raw'] = (lowBits(h.autoclear) & AUTOCLEAR_DATA_FILE_RAW) !== 0;
    }
    data.corrupt = (lowBits(h.incompatible) & INCOMPAT_CORRUPT) !== 0;
    data['extended-l2'] = extendedL2(h);
  }
  return { type: 'qcow2', data };
}

/** A small LRU of L2 tables keyed by host offset, bounded in bytes. */
class TableCache {
  private readonly map = new Map<number, Buffer>();
  constructor(private readonly capacity: number) {}
  get(key: number): Buffer | undefined {
    const v = this.map.get(key);
    if (v) {
      this.map.delete(key);
      this.map.set(key, v);
    }
    return v;
  }
  set(key: number, value: Buffer): void {
    this.map.set(key, value);
    while (this.map.size > this.capacity) this.map.delete(this.map.keys().next().value as number);
  }
}

/** A qcow2 image (active layer or an internal snapshot), backing chain merged in. */
export class Qcow2Reader extends MappedDiskReader {
  readonly format = 'qcow2';
  readonly virtualSize: number;
  override readonly backing?: DiskReader;
  readonly details: FormatDetails;

  private readonly clusterSize: number;
  private readonly clusterBits: number;
  private readonly l2Entries: number;
  private readonly extL2: boolean;
  private readonly subclusterSize: number;
  private readonly l1Offset: number;
  private readonly l1Size: number;
  private readonly l1Chunks = new Map<number, Float64Array>();
  private readonly l2Cache: TableCache;
  private readonly zeroFlagValid: boolean;
  private lastCompressed: { offset: number; data: Buffer } | null = null;

  private constructor(
    readonly filename: string,
    private readonly source: FileSource,
    private readonly dataSource: FileSource,
    readonly meta: Qcow2Metadata,
    l1: { offset: number; size: number; virtualSize: number },
    backing: DiskReader | undefined,
    details: FormatDetails,
    maxMetadataMemory: number,
  ) {
    super();
    const h = meta.header;
    this.clusterSize = h.clusterSize;
    this.clusterBits = h.clusterBits;
    this.extL2 = extendedL2(h);
    this.l2Entries = h.clusterSize / l2EntrySize(h);
    this.subclusterSize = this.extL2 ? h.clusterSize / SUBCLUSTERS : h.clusterSize;
    this.zeroFlagValid = h.version === 3 && !this.extL2;
    this.l1Offset = l1.offset;
    this.l1Size = l1.size;
    this.virtualSize = l1.virtualSize;
    this.backing = backing;
    this.details = details;
    this.l2Cache = new TableCache(Math.max(2, Math.floor(maxMetadataMemory / h.clusterSize)));
  }

  static async open(path: string, options: OpenOptions): Promise<Qcow2Reader> {
    const source = FileSource.open(path);
    const opened: DiskReader[] = [];
    let dataSource: FileSource | undefined;
    try {
      const meta = await readMetadata(source);
      const h = meta.header;
      // Where the guest data lives: the image itself, or an external data file.
      const extraFiles: string[] = [];
      if (lowBits(h.incompatible) & INCOMPAT_DATA_FILE) {
        if (meta.dataFileName === undefined) {
          throw new UnsupportedFeatureError('the image uses an external data file but does not name it', path);
        }
        if (!options.allowExternalFiles) {
          throw new UnsafeReferenceError(
            `keeps its data in an external data file '${meta.dataFileName}'; pass --allow-external-files to read it`,
            path,
          );
        }
        const dataPath = resolveReference(path, meta.dataFileName, 'data file', options);
        dataSource = FileSource.open(dataPath);
        extraFiles.push(dataPath);
      }
      // Which L1 table: the active one, or an internal snapshot's.
      let l1 = { offset: h.l1TableOffset, size: h.l1Size, virtualSize: h.size };
      if (options.snapshot !== undefined) {
        const want = options.snapshot;
        const snap = meta.snapshots.find((s) => s.id === want) ?? meta.snapshots.find((s) => s.name === want);
        if (!snap) {
          const known = meta.snapshots.map((s) => `${s.id} '${s.name}'`).join(', ') || 'none';
          throw new VmferryError(`no snapshot '${want}' in the image (snapshots: ${known})`, path);
        }
        const vsize = snap.diskSize ?? h.size;
        const perL2 = h.clusterSize * (h.clusterSize / l2EntrySize(h));
        if (snap.l1Size * 8 > MAX_L1_BYTES || snap.l1Size < Math.ceil(vsize / perL2)) {
          throw new CorruptImageError(`snapshot '${snap.name}' has an invalid L1 table size ${snap.l1Size}`, path);
        }
        if (snap.l1Size > 0 && (snap.l1TableOffset % h.clusterSize !== 0 || snap.l1TableOffset + snap.l1Size * 8 > source.size)) {
          throw new CorruptImageError(`snapshot '${snap.name}' L1 table lies outside the file or is misaligned`, path);
        }
        l1 = { offset: snap.l1TableOffset, size: snap.l1Size, virtualSize: vsize };
      }
      const details: FormatDetails = {
        clusterSize: h.clusterSize,
        dirtyFlag: (lowBits(h.incompatible) & INCOMPAT_DIRTY) !== 0,
        encrypted: false,
        snapshots: meta.snapshots.map(snapshotInfo),
        formatSpecific: formatSpecific(meta),
      };
      if (extraFiles.length) details.extraFiles = extraFiles;
      // The backing chain: the image's own reference, or the caller's override.
      let backing: DiskReader | undefined;
      const backingName = options.backingFile ?? meta.backingName;
      const backingFormat =
        options.backingFile !== undefined ? options.backingFormat : (options.backingFormat ?? meta.backingFormat);
      if (backingName !== undefined) {
        details.backingFilename = backingName;
        if (backingFormat) details.backingFormat = backingFormat;
        if (options.noBacking) {
          details.fullBackingFilename = resolvePath(dirname(path), backingName);
        } else {
          const full = resolveReference(path, backingName, 'backing file', options);
          details.fullBackingFilename = full;
          if (!options.openChild) throw new VmferryError('cannot open the backing file here (no opener given)', path);
          const { snapshot: _s, backingFile: _b, backingFormat: _f, ...childOptions } = options;
          backing = await options.openChild(full, backingFormat, childOptions);
          opened.push(backing);
        }
      }
      return new Qcow2Reader(
        path,
        source,
        dataSource ?? source,
        meta,
        l1,
        backing,
        details,
        options.maxMetadataMemory ?? DEFAULT_MAX_METADATA_MEMORY,
      );
    } catch (err) {
      for (const r of opened) await r.close().catch(() => {});
      await dataSource?.close();
      await source.close();
      throw err;
    }
  }

  /** One L1 entry's L2 table offset (0 = absent), from a lazily read chunk. */
  private async l1Entry(index: number): Promise<number> {
    const chunkIndex = Math.floor(index / L1_CHUNK);
    let chunk = this.l1Chunks.get(chunkIndex);
    if (!chunk) {
      const first = chunkIndex * L1_CHUNK;
      const count = Math.min(L1_CHUNK, this.l1Size - first);
      const raw = await readExact(this.source, this.l1Offset + first * 8, count * 8, 'L1 table');
      chunk = new Float64Array(count);
      for (let i = 0; i < count; i++) {
        const off = entryOffset(raw.readUInt32BE(i * 8), raw.readUInt32BE(i * 8 + 4));
        if (off % this.clusterSize !== 0) {
          throw new CorruptImageError(`L1 entry ${first + i} points to unaligned L2 table offset ${off}`, this.filename);
        }
        chunk[i] = off;
      }
      // L1 chunks are small (32 KiB of doubles); bound them with the table cache's budget anyway.
      if (this.l1Chunks.size >= 256) this.l1Chunks.clear();
      this.l1Chunks.set(chunkIndex, chunk);
    }
    return chunk[index - chunkIndex * L1_CHUNK]!;
  }

  private async l2Table(offset: number): Promise<Buffer> {
    let table = this.l2Cache.get(offset);
    if (!table) {
      table = await readExact(this.source, offset, this.clusterSize, 'L2 table');
      this.l2Cache.set(offset, table);
    }
    return table;
  }

  protected async segment(offset: number, maxLength: number): Promise<Segment> {
    const cs = this.clusterSize;
    const cluster = Math.floor(offset / cs);
    const l1Index = Math.floor(cluster / this.l2Entries);
    const perL2 = cs * this.l2Entries;
    if (l1Index >= this.l1Size) return { kind: 'unallocated', length: maxLength };
    const l2Offset = await this.l1Entry(l1Index);
    if (l2Offset === 0) {
      // A whole absent L2 table; keep going over further absent ones in the same chunk.
      let end = (l1Index + 1) * perL2;
      let next = l1Index + 1;
      const chunkEnd = Math.min(this.l1Size, (Math.floor(l1Index / L1_CHUNK) + 1) * L1_CHUNK);
      while (end - offset < maxLength && next < chunkEnd && (await this.l1Entry(next)) === 0) {
        end += perL2;
        next++;
      }
      return { kind: 'unallocated', length: Math.min(maxLength, end - offset) };
    }
    const table = await this.l2Table(l2Offset);
    let index = cluster % this.l2Entries;
    const inCluster = offset - cluster * cs;
    const first = this.classify(table, index, inCluster);
    if (first.kind === 'encoded') return { ...first, length: Math.min(first.length, maxLength) };
    // Extend over following entries of the same kind (contiguous on the host for data).
    let length = first.length;
    let hostNext = first.kind === 'data' ? first.position + first.length : 0;
    let within = inCluster + first.length;
    while (length < maxLength) {
      if (within >= cs) {
        index++;
        within = 0;
        if (index >= this.l2Entries) break;
      }
      const next = this.classify(table, index, within);
      if (next.kind !== first.kind) break;
      if (next.kind === 'data' && next.position !== hostNext) break;
      length += next.length;
      within += next.length;
      if (next.kind === 'data') hostNext = next.position + next.length;
    }
    length = Math.min(length, maxLength);
    if (first.kind === 'data') return { kind: 'data', length, source: this.dataSource, position: first.position };
    return { kind: first.kind, length };
  }

  /** What the guest bytes at `inCluster` of L2 entry `index` are, up to the end of their (sub)cluster run. */
  private classify(
    table: Buffer,
    index: number,
    inCluster: number,
  ):
    | { kind: 'data'; length: number; position: number }
    | { kind: 'zero' | 'unallocated'; length: number }
    | { kind: 'encoded'; length: number; skip: number; load: () => Promise<Buffer> } {
    const cs = this.clusterSize;
    const p = index * (this.extL2 ? 16 : 8);
    const hi = table.readUInt32BE(p);
    const lo = table.readUInt32BE(p + 4);
    const rest = cs - inCluster;
    if (hi & 0x40000000) {
      const loc = compressedLocation(hi, lo, this.clusterBits);
      return { kind: 'encoded', length: rest, skip: inCluster, load: () => this.loadCompressed(loc.offset, loc.length) };
    }
    const host = entryOffset(hi, lo);
    const external = this.dataSource !== this.source;
    const checkHost = () => {
      if (host % cs !== 0) {
        throw new CorruptImageError(`L2 entry points to unaligned data offset ${host} (guest cluster ${index})`, this.filename);
      }
    };
    if (!this.extL2) {
      if (this.zeroFlagValid && lo & 1) return { kind: 'zero', length: rest };
      if (host === 0 && !(external && hi & 0x80000000)) return { kind: 'unallocated', length: rest };
      checkHost();
      return { kind: 'data', length: rest, position: host + inCluster };
    }
    // Extended L2: 32 subclusters, allocation bits 0..31 and zero bits 32..63 of the bitmap.
    const zeroBits = table.readUInt32BE(p + 8);
    const allocBits = table.readUInt32BE(p + 12);
    const sc = this.subclusterSize;
    const i = Math.floor(inCluster / sc);
    const state = (k: number) => ((allocBits >>> k) & 1) | (((zeroBits >>> k) & 1) << 1);
    const s = state(i);
    if (s === 3)
      throw new CorruptImageError(`subcluster ${i} of guest cluster entry ${index} is both allocated and zero`, this.filename);
    let j = i + 1;
    while (j < SUBCLUSTERS && state(j) === s) j++;
    const length = j * sc - inCluster;
    if (s === 1) {
      if (host === 0 && !external) {
        throw new CorruptImageError(`allocated subcluster with host offset 0 (guest cluster entry ${index})`, this.filename);
      }
      checkHost();
      return { kind: 'data', length, position: host + inCluster };
    }
    return { kind: s === 2 ? 'zero' : 'unallocated', length };
  }

  private async loadCompressed(offset: number, length: number): Promise<Buffer> {
    if (this.lastCompressed?.offset === offset) return this.lastCompressed.data;
    if (offset >= this.source.size) {
      throw new CorruptImageError(`compressed cluster at ${offset} lies beyond the end of the file`, this.filename);
    }
    // The last sector of the last compressed cluster may be cut short at the end of the file.
    const raw = await this.source.read(offset, Math.min(length, this.source.size - offset));
    let data: Buffer;
    try {
      if (this.meta.header.compressionType === COMPRESSION_ZSTD) {
        data = zstd().decompress(raw.subarray(0, zstdFrameLength(raw)));
      } else {
        data = inflateRawSync(raw, {
          finishFlush: 2 /* Z_SYNC_FLUSH: tolerate a cut-short end */,
          maxOutputLength: this.clusterSize,
        });
      }
    } catch (err) {
      throw new CorruptImageError(
        `compressed cluster at ${offset} cannot be decompressed (${(err as Error).message})`,
        this.filename,
      );
    }
    if (data.length < this.clusterSize) {
      throw new CorruptImageError(
        `compressed cluster at ${offset} decompresses to ${data.length} bytes, less than a cluster`,
        this.filename,
      );
    }
    if (data.length > this.clusterSize) data = data.subarray(0, this.clusterSize);
    this.lastCompressed = { offset, data };
    return data;
  }

  protected async closeSources(): Promise<void> {
    if (this.dataSource !== this.source) await this.dataSource.close();
    await this.source.close();
  }
}
