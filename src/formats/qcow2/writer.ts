import { dirname, isAbsolute, resolve as resolvePath } from 'node:path';
import { nodeZlib } from '../../disk/builtins.js';
import { UsageError, VmferryError } from '../../disk/errors.js';
import { checkKnownOptions, parseBoolOption, parseSize } from '../../disk/options.js';
import { openImage } from '../../disk/registry.js';
import { AtomicFileSink, type ByteSink, openSink } from '../../disk/sink.js';
import type { CodecSpec, CompressedUnit, CreateOptions, DiskReader, DiskWriter } from '../../disk/types.js';
import { zstd } from '../../disk/zstd.js';
import {
  COMPAT_LAZY_REFCOUNTS,
  COMPRESSION_ZLIB,
  COMPRESSION_ZSTD,
  encodeCompressedEntry,
  encodeHeader,
  type HeaderFields,
  INCOMPAT_COMPRESSION,
  INCOMPAT_EXTL2,
  MAX_L1_BYTES,
  QCOW2_CREATE_OPTIONS,
  SUBCLUSTERS,
} from './layout.js';

/** The image's shape, as the -o options choose it. */
export interface Qcow2Layout {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  extL2: boolean;
  refcountOrder: number;
  compressionType: number;
  lazyRefcounts: boolean;
  preallocate: boolean;
  backingFile?: string;
  backingFormat?: string;
  /** L2 entries per table. */
  l2Entries: number;
  l1Size: number;
}

/** Parses and checks create options the way qemu-img does. */
export function parseCreateOptions(virtualSize: number, options: CreateOptions, forMeasure = false): Qcow2Layout {
  const o = options.options;
  checkKnownOptions('qcow2', o, QCOW2_CREATE_OPTIONS);
  const compat = o.compat ?? '1.1';
  let version: 2 | 3;
  if (compat === '1.1' || compat === 'v3') version = 3;
  else if (compat === '0.10' || compat === 'v2') version = 2;
  else throw new UsageError(`Invalid compat version '${compat}' (use 0.10 or 1.1)`);
  const clusterSize = o.cluster_size === undefined ? 65536 : parseSize(o.cluster_size, 'cluster_size');
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw new UsageError(`Cluster size must be a power of two between 512 and 2048k (got ${o.cluster_size})`);
  }
  const ct = o.compression_type ?? 'zlib';
  if (ct !== 'zlib' && ct !== 'zstd') throw new UsageError(`Invalid compression_type '${ct}' (use zlib or zstd)`);
  const compressionType = ct === 'zstd' ? COMPRESSION_ZSTD : COMPRESSION_ZLIB;
  if (compressionType !== COMPRESSION_ZLIB && version === 2) {
    throw new UsageError('Compression types other than zlib need compat=1.1 or above');
  }
  const extL2 = parseBoolOption(o.extended_l2, 'extended_l2', false);
  if (extL2 && version === 2) throw new UsageError('Extended L2 entries are only supported with compat=1.1 and above');
  if (extL2 && clusterSize < 16384)
    throw new UsageError('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  const refcountBits = o.refcount_bits === undefined ? 16 : Number(o.refcount_bits);
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw new UsageError('Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version === 2 && refcountBits !== 16) {
    throw new UsageError(
      'Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)',
    );
  }
  const lazyRefcounts = parseBoolOption(o.lazy_refcounts, 'lazy_refcounts', false);
  if (lazyRefcounts && version === 2)
    throw new UsageError('Lazy refcounts only supported with compatibility level 1.1 and above');
  const prealloc = o.preallocation ?? 'off';
  if (prealloc !== 'off' && prealloc !== 'metadata') {
    throw new UsageError(`Unsupported preallocation mode '${prealloc}' for qcow2 (use off or metadata)`);
  }
  const preallocate = prealloc === 'metadata';
  if (o.backing_fmt !== undefined && o.backing_file === undefined) {
    throw new UsageError('backing_fmt needs backing_file');
  }
  if (preallocate && o.backing_file !== undefined) {
    throw new UsageError('Backing file and preallocation can not be used at the same time');
  }
  if (preallocate && options.compress) throw new UsageError('Compression cannot be used with preallocation=metadata');
  if (!Number.isSafeInteger(virtualSize) || virtualSize < 0) throw new UsageError(`Invalid image size ${virtualSize}`);
  const l2Entries = clusterSize / (extL2 ? 16 : 8);
  const l1Size = Math.ceil(virtualSize / (clusterSize * l2Entries));
  if (l1Size * 8 > MAX_L1_BYTES && !forMeasure) {
    throw new UsageError(`Image size ${virtualSize} is too large for a cluster size of ${clusterSize} (L1 table above 32 MiB)`);
  }
  return {
    version,
    clusterBits,
    clusterSize,
    extL2,
    refcountOrder,
    compressionType,
    lazyRefcounts,
    preallocate,
    backingFile: o.backing_file,
    backingFormat: o.backing_fmt,
    l2Entries,
    l1Size,
  };
}

/**
 * The codec as qemu compresses clusters: zlib is raw deflate with a 4 KiB window (qemu inflates
 * with windowBits -12) and memLevel 9 at the default level; zstd at its default level.
 */
export function qcow2Codec(type: number): CodecSpec {
  return type === COMPRESSION_ZSTD
    ? { codec: 'zstd', passIncompressible: true }
    : { codec: 'deflate-raw', windowBits: 12, memLevel: 9, level: -1 /* Z_DEFAULT_COMPRESSION */ };
}

/** Compresses one cluster as qemu does; null when it does not shrink below a cluster. Pure. */
export function compressCluster(data: Buffer, clusterSize: number, type: number): Buffer | null {
  const spec = qcow2Codec(type);
  const out =
    spec.codec === 'zstd'
      ? zstd().compress(data)
      : nodeZlib().deflateRawSync(data, { windowBits: spec.windowBits, memLevel: spec.memLevel, level: spec.level });
  return out.length < clusterSize ? out : null;
}

const KIND_UNALLOCATED = 0;
const KIND_DATA = 1;
const KIND_ZERO = 2;
const KIND_COMPRESSED = 3;

/** One L2 table being built: per entry its kind, host offset and (compressed) size or (ext L2) bitmaps. */
interface L2Build {
  kind: Uint8Array;
  host: Float64Array;
  /** Compressed: bytes; unused otherwise. */
  csize: Uint32Array;
  /** Extended L2 only: subcluster allocation and zero bits. */
  alloc?: Uint32Array;
  zero?: Uint32Array;
}

/** A growable array of per-host-cluster reference counts. */
class RefCounts {
  private arr = new Uint16Array(1024);
  length = 0;
  get(i: number): number {
    return i < this.arr.length ? this.arr[i]! : 0;
  }
  add(i: number, n = 1): void {
    if (i >= this.arr.length) {
      let size = this.arr.length;
      while (size <= i) size *= 2;
      const next = new Uint16Array(size);
      next.set(this.arr);
      this.arr = next;
    }
    this.arr[i]! += n;
    if (i + 1 > this.length) this.length = i + 1;
  }
  /**
   * Counts the first reference to each of host clusters [first, first + n), which nothing has
   * referenced yet (new clusters past the file's end).
   */
  addNew(first: number, n: number): void {
    if (n <= 0) return;
    this.add(first + n - 1, 0); // grows the array once
    this.arr.fill(1, first, first + n);
  }
  /** Counts of host clusters [first, first + n) (a view). */
  range(first: number, n: number): Uint16Array {
    return this.arr.subarray(first, first + n);
  }
  /** Checkpoint support: the counts as base64. */
  save(): string {
    return b64(this.arr.subarray(0, this.length));
  }
  restore(text: string): void {
    const a = new Uint16Array(unb64(text, 2));
    this.arr = new Uint16Array(Math.max(1024, a.length));
    this.arr.set(a);
    this.length = a.length;
  }
}

function b64(a: ArrayBufferView): string {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength).toString('base64');
}
/** A fresh aligned copy of base64 bytes, checked to hold whole elements of `width` bytes. */
function unb64(text: string, width: number): ArrayBuffer {
  const b = Buffer.from(text, 'base64');
  if (b.length % width !== 0) throw new UsageError('invalid qcow2 checkpoint state');
  const out = new ArrayBuffer(b.length);
  new Uint8Array(out).set(b);
  return out;
}

/** What Qcow2Writer.checkpoint() returns (JSON-serialisable). */
interface Qcow2Checkpoint {
  tempPath: string;
  tail: number;
  refs: string;
  tables: [number, string, string, string, string?, string?][];
}

/**
 * Writes a qcow2 image: data clusters appended in write order (or at fixed places with
 * preallocation=metadata), L2 tables, L1 and refcount structures at finish.
 */
export class Qcow2Writer implements DiskWriter {
  readonly sequentialOnly = false;
  readonly clusterSize: number;
  /** Set with -c: the copy pipeline compresses clusters on worker threads and calls writeCompressed. */
  readonly compression?: CodecSpec;
  private readonly cs: number;
  private readonly tables = new Map<number, L2Build>();
  private readonly refs = new RefCounts();
  /** Next free host byte (unaligned after compressed data). */
  private tail: number;
  /** Next free byte in the cluster compressed data last used partly (0: none). */
  private freeByte = 0;
  private backingReader?: DiskReader;
  private finished = false;
  /** Compressed output without a backing file: a cluster being gathered from partial writes. */
  private pending: { cluster: number; buf: Buffer } | null = null;

  private constructor(
    private readonly path: string,
    private readonly sink: ByteSink,
    readonly virtualSize: number,
    private readonly layout: Qcow2Layout,
    private readonly compress: boolean,
  ) {
    this.cs = layout.clusterSize;
    // Pipeline zero detection per subcluster when subclusters exist.
    // (compressed output needs whole clusters, so then the unit is the cluster).
    this.clusterSize = layout.extL2 && !compress ? this.cs / SUBCLUSTERS : this.cs;
    if (compress && !layout.preallocate) this.compression = qcow2Codec(layout.compressionType);
    this.refs.add(0); // header cluster
    this.tail = this.cs;
    if (layout.preallocate) {
      const clusters = Math.ceil(virtualSize / this.cs);
      for (let i = 0; i < clusters; i++) this.refs.add(1 + i);
      this.tail = this.cs * (1 + clusters);
    }
  }

  static async create(path: string, virtualSize: number, options: CreateOptions): Promise<Qcow2Writer> {
    const layout = parseCreateOptions(virtualSize, options);
    const sink = openSink(path);
    if (sink.sequential) {
      await sink.abort();
      throw new UsageError('qcow2 output needs a seekable file, not a pipe', path);
    }
    return new Qcow2Writer(path, sink, virtualSize, layout, options.compress === true);
  }

  private get hasBacking(): boolean {
    return this.layout.backingFile !== undefined;
  }

  private table(l1Index: number): L2Build {
    let t = this.tables.get(l1Index);
    if (!t) {
      const n = this.layout.l2Entries;
      t = { kind: new Uint8Array(n), host: new Float64Array(n), csize: new Uint32Array(n) };
      if (this.layout.extL2) {
        t.alloc = new Uint32Array(n);
        t.zero = new Uint32Array(n);
      }
      this.tables.set(l1Index, t);
    }
    return t;
  }

  private async backingData(offset: number, length: number): Promise<Buffer> {
    const out = Buffer.alloc(length);
    if (!this.backingReader) {
      const name = this.layout.backingFile!;
      const full = isAbsolute(name) ? name : resolvePath(dirname(resolvePath(this.path)), name);
      this.backingReader = await openImage(full, { format: this.layout.backingFormat, allowExternalFiles: true });
    }
    const b = this.backingReader;
    const n = Math.max(0, Math.min(length, b.virtualSize - offset));
    if (n > 0) await b.read(offset, n, out.subarray(0, n));
    return out;
  }

  private allocCluster(): number {
    return this.allocClusters(1);
  }

  /**
   * `count` adjacent new clusters at the end of the file; the first one's host offset. Every
   * cluster is allocated here or holds compressed data below the tail, so those past the
   * rounded-up tail have no references yet.
   */
  private allocClusters(count: number): number {
    if (this.tail % this.cs !== 0) this.tail = Math.ceil(this.tail / this.cs) * this.cs;
    const host = this.tail;
    this.tail += count * this.cs;
    this.refs.addNew(host / this.cs, count);
    return host;
  }

  private checkRange(offset: number, length: number): void {
    if (this.finished) throw new VmferryError('write after finish', this.path);
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new VmferryError(`write of ${length} bytes at ${offset} is outside the virtual size ${this.virtualSize}`, this.path);
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkRange(offset, data.length);
    if (data.length === 0) return;
    if (this.layout.preallocate) {
      await this.sink.write(data, this.cs + offset);
      return;
    }
    const cs = this.cs;
    const end = offset + data.length;
    // Pending coalesced write: host range [runHost, runHost + runLen) from data[runData...].
    let runHost = -1;
    let runData = 0;
    let runLen = 0;
    const flush = async () => {
      if (runLen > 0) await this.sink.write(data.subarray(runData, runData + runLen), runHost);
      runLen = 0;
      runHost = -1;
    };
    // Guest bytes [from, to) go to host `hostPos`: onto the pending write when they follow it there.
    const extend = async (hostPos: number, from: number, to: number) => {
      if (runLen > 0 && runHost + runLen === hostPos) {
        runLen += to - from;
        return;
      }
      await flush();
      runHost = hostPos;
      runData = from - offset;
      runLen = to - from;
    };
    let pos = offset;
    while (pos < end) {
      const cluster = Math.floor(pos / cs);
      const clusterStart = cluster * cs;
      const pieceEnd = Math.min(end, clusterStart + cs);
      // No view of the cluster's bytes unless compression needs one: a view per cluster made
      // Buffer.subarray hot on plain copies (8 ms of TurboFan compiling on the os disk).
      const t = this.table(Math.floor(cluster / this.layout.l2Entries));
      const i = cluster % this.layout.l2Entries;
      const kind = t.kind[i]!;
      if (kind === KIND_UNALLOCATED && !this.compress && !this.hasBacking && !t.alloc) {
        // The usual case of a conversion: clusters never written before, allocated together.
        // Their entries are set by small helpers: a loop over each cluster in this function
        // made it hot enough to be compiled (150 ms of a second core on the dense disk).
        const last = Math.min(Math.ceil(end / cs), (Math.floor(cluster / this.layout.l2Entries) + 1) * this.layout.l2Entries);
        const count = unallocatedRun(t.kind, i, last - cluster);
        const host = this.allocClusters(count);
        setDataEntries(t, i, count, host, cs);
        const runEnd = Math.min(end, (cluster + count) * cs);
        await extend(host + (pos - clusterStart), pos, runEnd);
        pos = runEnd;
        continue;
      }
      const clusterLen = Math.min(cs, this.virtualSize - clusterStart);
      if (kind === KIND_COMPRESSED) {
        throw new VmferryError(`cluster at ${clusterStart} is already compressed; rewriting it is not supported`, this.path);
      }
      if (this.compress && !this.hasBacking && kind === KIND_UNALLOCATED) {
        // Gather the cluster (the pipeline may hand it over in pieces around zero ranges); the
        // bytes never written read as zeros, as they would on a new image without backing.
        if (this.pending && this.pending.cluster !== cluster) {
          await flush();
          await this.flushPending();
        }
        if (!this.pending) this.pending = { cluster, buf: Buffer.alloc(cs) };
        data.copy(this.pending.buf, pos - clusterStart, pos - offset, pieceEnd - offset);
        if (pieceEnd === clusterStart + clusterLen) {
          await flush();
          await this.flushPending();
        }
        pos = pieceEnd;
        continue;
      }
      if (this.compress && kind !== KIND_DATA && pos === clusterStart && pieceEnd - clusterStart === clusterLen) {
        // A whole cluster (the last one may be short: padded with zeros, as qemu does).
        const piece = data.subarray(pos - offset, pieceEnd - offset);
        const full = clusterLen === cs ? piece : Buffer.concat([piece, Buffer.alloc(cs - clusterLen)]);
        const packed = compressCluster(full, cs, this.layout.compressionType);
        if (packed) {
          await flush();
          const host = this.placeCompressed(packed.length);
          await this.sink.write(packed, host);
          t.kind[i] = KIND_COMPRESSED;
          t.host[i] = host;
          t.csize[i] = packed.length;
          if (t.alloc) {
            t.alloc[i] = 0;
            t.zero![i] = 0;
          }
          pos = pieceEnd;
          continue;
        }
      }
      let host: number;
      if (kind === KIND_DATA) host = t.host[i]!;
      else {
        host = this.allocCluster();
        t.host[i] = host;
        t.kind[i] = KIND_DATA;
        if (!t.alloc) {
          // Copy-on-write: the rest of a partly written cluster keeps the backing file's content.
          const partial = pos !== clusterStart || pieceEnd !== clusterStart + clusterLen;
          if (partial && kind === KIND_UNALLOCATED && this.hasBacking) {
            await flush();
            await this.sink.write(await this.backingData(clusterStart, clusterLen), host);
          }
        }
      }
      if (t.alloc) await this.markSubclusters(t, i, host, clusterStart, pos, pieceEnd, flush);
      await extend(host + (pos - clusterStart), pos, pieceEnd);
      pos = pieceEnd;
    }
    await flush();
  }

  /**
   * Whole clusters the pipeline compressed with `compression`, ascending: each is stored
   * compressed when that shrinks it below a cluster, else as a plain cluster, exactly as write()
   * would store it. Writes to adjacent host bytes from adjacent memory go out as one.
   */
  async writeCompressed(units: CompressedUnit[]): Promise<void> {
    const cs = this.cs;
    let run: { host: number; buf: Buffer } | null = null;
    const flush = async () => {
      if (run) await this.sink.write(run.buf, run.host);
      run = null;
    };
    const put = async (buf: Buffer, host: number) => {
      if (
        run &&
        run.host + run.buf.length === host &&
        run.buf.buffer === buf.buffer &&
        run.buf.byteOffset + run.buf.length === buf.byteOffset
      ) {
        run.buf = Buffer.from(buf.buffer, run.buf.byteOffset, run.buf.length + buf.length);
        return;
      }
      await flush();
      run = { host, buf };
    };
    for (const u of units) {
      const { offset, raw } = u;
      this.checkRange(offset, raw.length);
      const cluster = Math.floor(offset / cs);
      const clusterStart = cluster * cs;
      const clusterLen = Math.min(cs, this.virtualSize - clusterStart);
      const t = this.table(Math.floor(cluster / this.layout.l2Entries));
      const i = cluster % this.layout.l2Entries;
      const kind = t.kind[i]!;
      const whole = offset === clusterStart && raw.length === clusterLen;
      if (!whole || kind === KIND_DATA || kind === KIND_COMPRESSED || this.pending?.cluster === cluster) {
        // Not what the pipeline hands over; the general path knows every case.
        await flush();
        await this.write(offset, raw);
        continue;
      }
      if (this.pending) {
        await flush();
        await this.flushPending();
      }
      // qemu compresses the last, short cluster padded with zeros to a whole one.
      const packed =
        clusterLen === cs
          ? u.packed.length > 0 && u.packed.length < cs
            ? u.packed
            : null
          : compressCluster(Buffer.concat([raw, Buffer.alloc(cs - clusterLen)]), cs, this.layout.compressionType);
      if (packed) {
        const host = this.placeCompressed(packed.length);
        await put(packed, host);
        t.kind[i] = KIND_COMPRESSED;
        t.host[i] = host;
        t.csize[i] = packed.length;
        if (t.alloc) {
          t.alloc[i] = 0;
          t.zero![i] = 0;
        }
        continue;
      }
      const host = this.allocCluster();
      t.kind[i] = KIND_DATA;
      t.host[i] = host;
      if (t.alloc) {
        const sc = cs / SUBCLUSTERS;
        const n = Math.ceil(clusterLen / sc);
        t.alloc[i] = n >= 32 ? 0xffffffff : (2 ** n - 1) >>> 0;
        t.zero![i] = 0;
      }
      await put(raw, host);
    }
    await flush();
  }

  /** Stores the gathered cluster: compressed when that shrinks it, else as a plain cluster. */
  private async flushPending(): Promise<void> {
    const p = this.pending;
    if (!p) return;
    this.pending = null;
    const cs = this.cs;
    const t = this.table(Math.floor(p.cluster / this.layout.l2Entries));
    const i = p.cluster % this.layout.l2Entries;
    const packed = compressCluster(p.buf, cs, this.layout.compressionType);
    if (packed) {
      const host = this.placeCompressed(packed.length);
      await this.sink.write(packed, host);
      t.kind[i] = KIND_COMPRESSED;
      t.host[i] = host;
      t.csize[i] = packed.length;
      return;
    }
    const host = this.allocCluster();
    const clusterLen = Math.min(cs, this.virtualSize - p.cluster * cs);
    await this.sink.write(p.buf.subarray(0, clusterLen), host);
    t.kind[i] = KIND_DATA;
    t.host[i] = host;
    if (t.alloc) t.alloc[i] = 0xffffffff;
  }

  /** Extended L2: marks the subclusters [pos, end) touches as allocated, filling partial ones. */
  private async markSubclusters(
    t: L2Build,
    i: number,
    host: number,
    clusterStart: number,
    pos: number,
    end: number,
    flush: () => Promise<void>,
  ): Promise<void> {
    const sc = this.cs / SUBCLUSTERS;
    const first = Math.floor((pos - clusterStart) / sc);
    const last = Math.floor((end - 1 - clusterStart) / sc);
    for (let k = first; k <= last; k++) {
      const bit = 1 << k;
      if (t.alloc![i]! & bit) continue;
      const scStart = clusterStart + k * sc;
      const scEnd = Math.min(scStart + sc, this.virtualSize);
      const wasZero = (t.zero![i]! & bit) !== 0;
      const partial = pos > scStart || end < scEnd;
      if (partial && !wasZero && this.hasBacking) {
        await flush();
        await this.sink.write(await this.backingData(scStart, scEnd - scStart), host + k * sc);
      }
      t.alloc![i] = (t.alloc![i]! | bit) >>> 0;
      t.zero![i] = (t.zero![i]! & ~bit) >>> 0;
    }
  }

  /**
   * Where `length` compressed bytes go, as qemu's allocator places them: into the rest of the
   * cluster the previous compressed data left partly used (even when plain clusters were
   * allocated after it), else into new clusters, crossing into them only when they follow it.
   */
  private placeCompressed(length: number): number {
    const cs = this.cs;
    const limit = Math.min(2 ** (2 ** this.layout.refcountOrder) - 1, 65535);
    let start = this.freeByte;
    if (start !== 0 && this.refs.get(Math.floor(start / cs)) >= limit) start = 0;
    if (start === 0 || cs - (start % cs) < length) {
      const next = Math.ceil(this.tail / cs) * cs;
      if (start === 0 || Math.ceil(start / cs) * cs !== next) start = next;
    }
    // Reference counts follow the L2 entry's sector-rounded extent, which is what qemu checks.
    const extentEnd = (Math.floor((start + length - 1) / 512) + 1) * 512;
    const firstCluster = Math.floor(start / cs);
    const lastCluster = Math.floor((extentEnd - 1) / cs);
    for (let c = firstCluster; c <= lastCluster; c++) this.refs.add(c);
    const end = start + length;
    this.tail = Math.max(this.tail, end);
    this.freeByte = end % cs === 0 ? 0 : end;
    return start;
  }

  async zero(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    if (length === 0 || this.layout.preallocate) return;
    if (this.hasBacking) {
      await this.zeroStored(offset, length);
      return;
    }
    // Without a backing file only clusters that hold data need work. A conversion zeroes ranges
    // it has not written, except for the partly written clusters at their ends: those go to the
    // general path on their own, so that its loop is not run over the whole range (that made it
    // hot enough to be compiled, 39 ms of a second core on the os disk).
    const end = offset + length;
    const headEnd = Math.min(end, Math.ceil(offset / this.cs) * this.cs);
    const tailStart = Math.max(headEnd, Math.floor(end / this.cs) * this.cs);
    for (const [from, to] of [
      [offset, headEnd],
      [headEnd, tailStart],
      [tailStart, end],
    ] as const) {
      if (to > from && this.storesAny(from, to)) await this.zeroStored(from, to - from);
    }
  }

  /** Whether a cluster overlapping [from, to) holds data, plain or compressed. */
  private storesAny(from: number, to: number): boolean {
    const n = this.layout.l2Entries;
    const last = Math.ceil(to / this.cs);
    for (let c = Math.floor(from / this.cs); c < last; ) {
      const l1Index = Math.floor(c / n);
      const stop = Math.min(last, (l1Index + 1) * n);
      const kind = this.tables.get(l1Index)?.kind;
      if (
        kind &&
        (foundBefore(kind, KIND_DATA, c - l1Index * n, stop - l1Index * n) ||
          foundBefore(kind, KIND_COMPRESSED, c - l1Index * n, stop - l1Index * n))
      ) {
        return true;
      }
      c = stop;
    }
    return false;
  }

  private async zeroStored(offset: number, length: number): Promise<void> {
    const cs = this.cs;
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const cluster = Math.floor(pos / cs);
      const clusterStart = cluster * cs;
      const pieceEnd = Math.min(end, clusterStart + cs);
      const clusterLen = Math.min(cs, this.virtualSize - clusterStart);
      const l1Index = Math.floor(cluster / this.layout.l2Entries);
      const existing = this.tables.get(l1Index);
      if (!existing && !this.hasBacking) {
        // Nothing stored under this whole L2 table: it already reads as zeros (a sparse petabyte is one step per table).
        pos = Math.min(end, (l1Index + 1) * this.layout.l2Entries * cs);
        continue;
      }
      const i = cluster % this.layout.l2Entries;
      if (existing && !this.hasBacking) {
        // Only clusters holding data need work: skip to the next one in this table (a tight scan,
        // as a table with one piece of data in it is mostly followed by zeros up to its end).
        const last = Math.min(this.layout.l2Entries, Math.ceil(end / cs) - l1Index * this.layout.l2Entries);
        let j = i;
        while (j < last && existing.kind[j] !== KIND_DATA && existing.kind[j] !== KIND_COMPRESSED) j++;
        if (j > i) {
          pos = Math.min(end, (l1Index * this.layout.l2Entries + j) * cs);
          continue;
        }
      }
      const kind = existing ? existing.kind[i]! : KIND_UNALLOCATED;
      if (kind === KIND_DATA && !existing!.alloc) {
        // Already holds data: overwrite with real zeros, up to the furthest byte written (a new
        // cluster is allocated at the end of the file, so past that it reads as zeros already).
        const host = existing!.host[i]! + (pos - clusterStart);
        const written = Math.min(pieceEnd - pos, this.sink.untouchedFrom - host);
        if (written > 0) await this.sink.write(Buffer.alloc(written), host);
      } else if (kind === KIND_COMPRESSED) {
        throw new VmferryError(`cluster at ${clusterStart} is already compressed; rewriting it is not supported`, this.path);
      } else if (this.hasBacking) {
        await this.zeroOverBacking(cluster, clusterStart, clusterLen, pos, pieceEnd);
      } else if (existing?.alloc && kind === KIND_DATA) {
        await this.zeroSubclusters(existing, i, clusterStart, pos, pieceEnd);
      }
      // No backing and nothing stored: the range already reads as zeros.
      pos = pieceEnd;
    }
  }

  /** With a backing file, zeros must be recorded so the backing content is hidden. */
  private async zeroOverBacking(
    cluster: number,
    clusterStart: number,
    clusterLen: number,
    pos: number,
    end: number,
  ): Promise<void> {
    const t = this.table(Math.floor(cluster / this.layout.l2Entries));
    const i = cluster % this.layout.l2Entries;
    const whole = pos === clusterStart && end === clusterStart + clusterLen;
    if (this.layout.version === 3 && !t.alloc && whole && t.kind[i] !== KIND_DATA) {
      t.kind[i] = KIND_ZERO;
      return;
    }
    if (t.alloc) {
      await this.zeroSubclusters(t, i, clusterStart, pos, end);
      return;
    }
    // Version 2, or part of a cluster: real zeros.
    await this.write(pos, Buffer.alloc(end - pos));
  }

  /** Extended L2: whole subclusters get the zero bit; partial ones are written as data. */
  private async zeroSubclusters(t: L2Build, i: number, clusterStart: number, pos: number, end: number): Promise<void> {
    const sc = this.cs / SUBCLUSTERS;
    let p = pos;
    while (p < end) {
      const k = Math.floor((p - clusterStart) / sc);
      const scStart = clusterStart + k * sc;
      const scEnd = Math.min(scStart + sc, this.virtualSize);
      const e = Math.min(end, scEnd);
      const bit = 1 << k;
      if (p === scStart && e === scEnd) {
        if (t.alloc![i]! & bit) {
          await this.sink.write(Buffer.alloc(e - p), t.host[i]! + k * sc);
        } else if (this.hasBacking) {
          t.zero![i] = (t.zero![i]! | bit) >>> 0;
          if (t.kind[i] === KIND_UNALLOCATED) t.kind[i] = KIND_ZERO;
        }
      } else if (t.alloc![i]! & bit) {
        await this.sink.write(Buffer.alloc(e - p), t.host[i]! + (p - clusterStart));
      } else if (this.hasBacking) {
        await this.write(p, Buffer.alloc(e - p));
      }
      p = e;
    }
  }

  /** The on-disk bytes of one L2 table, into `out` (one cluster of zeros). */
  private encodeTable(l1Index: number, t: L2Build | undefined, out: Buffer): void {
    const { l2Entries, extL2, clusterBits } = this.layout;
    const es = extL2 ? 16 : 8;
    const view = new DataView(out.buffer, out.byteOffset, out.length);
    if (t && !extL2 && !this.layout.preallocate) {
      encodePlainTable(t, view, out, clusterBits);
      return;
    }
    for (let i = 0; i < l2Entries; i++) {
      const p = i * es;
      let kind: number;
      let host: number;
      if (this.layout.preallocate) {
        const cluster = l1Index * l2Entries + i;
        if (cluster * this.cs >= this.virtualSize) break;
        kind = KIND_DATA;
        host = this.cs * (1 + cluster);
      } else {
        kind = t!.kind[i]!;
        host = t!.host[i]!;
      }
      if (kind === KIND_DATA) {
        setCopiedEntry(view, p, host);
      } else if (kind === KIND_COMPRESSED) {
        out.writeBigUInt64BE(encodeCompressedEntry(host, t!.csize[i]!, clusterBits), p);
      } else if (kind === KIND_ZERO && !extL2) {
        out.writeUInt32BE(1, p + 4);
      }
      if (extL2) {
        if (this.layout.preallocate) out.writeUInt32BE(0xffffffff, p + 12);
        else if (kind !== KIND_COMPRESSED) {
          out.writeUInt32BE(t!.zero![i]!, p + 8);
          out.writeUInt32BE(t!.alloc![i]!, p + 12);
        }
      }
    }
  }

  async finish(): Promise<void> {
    if (this.finished) return;
    this.finished = true;
    try {
      await this.writeMetadata();
      await this.sink.commit();
    } catch (err) {
      await this.abort();
      throw err;
    } finally {
      await this.backingReader?.close();
      this.backingReader = undefined;
    }
  }

  private async writeMetadata(): Promise<void> {
    await this.flushPending();
    const cs = this.cs;
    const L = this.layout;
    this.tail = Math.ceil(this.tail / cs) * cs;
    // L2 tables, encoded straight into batches of up to 8 MiB, one write each (a buffer per table,
    // then concatenated, copied each table once more).
    const l1 = Buffer.alloc(Math.ceil((L.l1Size * 8) / cs) * cs);
    const l1View = new DataView(l1.buffer, l1.byteOffset, l1.length);
    const indices = L.preallocate
      ? Array.from({ length: L.l1Size }, (_, i) => i)
      : [...this.tables.keys()].filter((idx) => hasEntries(this.tables.get(idx)!.kind)).sort((a, b) => a - b);
    const perBatch = Math.max(1, Math.floor((8 * 1024 * 1024) / cs));
    for (let first = 0; first < indices.length; first += perBatch) {
      const group = indices.slice(first, first + perBatch);
      const batch = Buffer.alloc(group.length * cs);
      const batchStart = this.tail;
      for (let k = 0; k < group.length; k++) {
        const idx = group[k]!;
        const host = this.allocCluster();
        this.encodeTable(idx, this.tables.get(idx), batch.subarray(k * cs, (k + 1) * cs));
        setCopiedEntry(l1View, idx * 8, host);
      }
      await this.sink.write(batch, batchStart);
    }
    // L1 table.
    const l1Offset = l1.length > 0 ? this.tail : 0;
    for (let i = 0; i < l1.length / cs; i++) this.allocCluster();
    if (l1.length > 0) await this.sink.write(l1, l1Offset);
    // Refcount blocks and table, sized so they also count themselves.
    const bits = 2 ** L.refcountOrder;
    const perBlock = (cs * 8) / bits;
    const used = this.tail / cs;
    let blocks = 0;
    let tableClusters = 0;
    for (;;) {
      const total = used + blocks + tableClusters;
      const nb = Math.ceil(total / perBlock);
      const nt = Math.max(1, Math.ceil((nb * 8) / cs));
      if (nb === blocks && nt === tableClusters) break;
      blocks = nb;
      tableClusters = nt;
    }
    const blocksOffset = this.tail;
    for (let i = 0; i < blocks + tableClusters; i++) this.allocCluster();
    const tableOffset = blocksOffset + blocks * cs;
    const table = Buffer.alloc(tableClusters * cs);
    const chunkBlocks = Math.max(1, Math.floor((8 * 1024 * 1024) / cs));
    for (let b0 = 0; b0 < blocks; b0 += chunkBlocks) {
      const n = Math.min(chunkBlocks, blocks - b0);
      const buf = Buffer.alloc(n * cs);
      for (let b = 0; b < n; b++) {
        const block = b0 + b;
        table.writeBigUInt64BE(BigInt(blocksOffset + block * cs), block * 8);
        encodeRefcounts(buf.subarray(b * cs, (b + 1) * cs), this.refs, block * perBlock, perBlock, bits);
      }
      await this.sink.write(buf, blocksOffset + b0 * cs);
    }
    await this.sink.write(table, tableOffset);
    // Header last.
    const fields: HeaderFields = {
      version: L.version,
      clusterBits: L.clusterBits,
      size: this.virtualSize,
      l1Size: L.l1Size,
      l1TableOffset: l1Offset,
      refcountTableOffset: tableOffset,
      refcountTableClusters: tableClusters,
      incompatible: (L.compressionType !== COMPRESSION_ZLIB ? INCOMPAT_COMPRESSION : 0) | (L.extL2 ? INCOMPAT_EXTL2 : 0),
      compatible: L.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0,
      autoclear: 0,
      refcountOrder: L.refcountOrder,
      compressionType: L.compressionType,
      backingFile: L.backingFile,
      backingFormat: L.backingFormat,
    };
    let header = encodeHeader(fields);
    if (header.length > cs) header = encodeHeader({ ...fields, featureTable: false });
    if (header.length > cs) {
      throw new UsageError(`the header and backing file name do not fit in one ${cs}-byte cluster`, this.path);
    }
    await this.sink.write(header, 0);
    await this.sink.setLength(this.tail);
  }

  /** Flushes the data written so far and returns the in-memory maps, for resume(). */
  async checkpoint(): Promise<Qcow2Checkpoint> {
    if (!(this.sink instanceof AtomicFileSink) || this.pending || this.compress || this.finished) {
      throw new UsageError('this qcow2 output cannot be checkpointed (pipe, compressed or finished)', this.path);
    }
    await this.sink.sync();
    const tables: Qcow2Checkpoint['tables'] = [];
    for (const [idx, t] of this.tables) {
      const row: Qcow2Checkpoint['tables'][number] = [idx, b64(t.kind), b64(t.host), b64(t.csize)];
      if (t.alloc && t.zero) row.push(b64(t.alloc), b64(t.zero));
      tables.push(row);
    }
    return { tempPath: this.sink.tempPath, tail: this.tail, refs: this.refs.save(), tables };
  }

  /** Reopens a checkpointed temp file, cut back to its checkpointed length, with its maps restored. */
  static async resume(path: string, virtualSize: number, options: CreateOptions, state: unknown): Promise<Qcow2Writer> {
    const layout = parseCreateOptions(virtualSize, options);
    const s = state as Partial<Qcow2Checkpoint> | null;
    if (
      !s ||
      typeof s.tempPath !== 'string' ||
      !Number.isSafeInteger(s.tail) ||
      typeof s.refs !== 'string' ||
      !Array.isArray(s.tables)
    ) {
      throw new UsageError('invalid qcow2 checkpoint state', path);
    }
    if (layout.backingFile !== undefined || layout.preallocate || options.compress) {
      throw new UsageError('only plain qcow2 outputs can be resumed', path);
    }
    const n = layout.l2Entries;
    const tables = new Map<number, L2Build>();
    for (const row of s.tables) {
      const [idx, kind, host, csize, alloc, zero] = row;
      if (!Number.isSafeInteger(idx) || idx < 0 || idx >= layout.l1Size)
        throw new UsageError('invalid qcow2 checkpoint state', path);
      const t: L2Build = {
        kind: new Uint8Array(unb64(kind, 1)),
        host: new Float64Array(unb64(host, 8)),
        csize: new Uint32Array(unb64(csize, 4)),
      };
      if (layout.extL2) {
        t.alloc = new Uint32Array(unb64(alloc ?? '', 4));
        t.zero = new Uint32Array(unb64(zero ?? '', 4));
      }
      if (
        t.kind.length !== n ||
        t.host.length !== n ||
        t.csize.length !== n ||
        (t.alloc && (t.alloc.length !== n || t.zero!.length !== n))
      ) {
        throw new UsageError('invalid qcow2 checkpoint state', path);
      }
      tables.set(idx, t);
    }
    const w = new Qcow2Writer(
      path,
      new AtomicFileSink(path, { tempPath: s.tempPath, length: s.tail! }),
      virtualSize,
      layout,
      false,
    );
    for (const [idx, t] of tables) w.tables.set(idx, t);
    w.refs.restore(s.refs);
    w.tail = s.tail!;
    return w;
  }

  async abort(): Promise<void> {
    this.finished = true;
    await this.backingReader?.close().catch(() => {});
    this.backingReader = undefined;
    await this.sink.abort();
  }
}

/**
 * Whether `value` occurs in kind[from, to). Kind arrays are scanned with indexOf, which runs
 * natively: a loop of ours over every entry of an 8 GiB disk's tables (131,072) became hot enough
 * to be compiled, on the core the copies need.
 */
function foundBefore(kind: Uint8Array, value: number, from: number, to: number): boolean {
  const i = kind.indexOf(value, from);
  return i !== -1 && i < to;
}

/**
 * The 8-byte entries of an L2 table into `out` (zeros). Most entries of a sparse disk's tables are
 * unallocated and stay zeros, so only the others are visited (indexOf runs natively: a loop over
 * all 8,192 entries of each table was hot enough to be compiled, 10 ms of a core on the os disk).
 * A function of its own, as small as it can be: on a dense disk it is hot anyway.
 */
function encodePlainTable(t: L2Build, view: DataView, out: Buffer, clusterBits: number): void {
  const { kind, host } = t;
  for (let i = kind.indexOf(KIND_DATA); i !== -1; i = kind.indexOf(KIND_DATA, i + 1)) setCopiedEntry(view, i * 8, host[i]!);
  for (let i = kind.indexOf(KIND_COMPRESSED); i !== -1; i = kind.indexOf(KIND_COMPRESSED, i + 1)) {
    out.writeBigUInt64BE(encodeCompressedEntry(host[i]!, t.csize[i]!, clusterBits), i * 8);
  }
  for (let i = kind.indexOf(KIND_ZERO); i !== -1; i = kind.indexOf(KIND_ZERO, i + 1)) view.setUint32(i * 8 + 4, 1);
}

/**
 * An L1 or L2 entry at `at`: host offset `host`, flagged COPIED (its cluster's refcount is 1).
 * setUint32 takes the int32 bit patterns as they are, and the high word is computed only past
 * 4 GiB: `>>> 0`, `% 2 ** 32` and the division made numbers that V8 boxes (237 KB of garbage on
 * the os disk's 2,900 entries).
 */
function setCopiedEntry(view: DataView, at: number, host: number): void {
  view.setUint32(at, host < 2 ** 32 ? 0x80000000 | 0 : Math.floor(host / 2 ** 32) | 0x80000000);
  view.setUint32(at + 4, host | 0);
}

/** How many entries from `i` on (at most `max`) are unallocated. */
function unallocatedRun(kind: Uint8Array, i: number, max: number): number {
  let n = 0;
  while (n < max && kind[i + n] === KIND_UNALLOCATED) n++;
  return n;
}

/** Marks entries [i, i + count) as data in adjacent host clusters from `host` on. */
function setDataEntries(t: L2Build, i: number, count: number, host: number, cs: number): void {
  t.kind.fill(KIND_DATA, i, i + count);
  for (let j = 0; j < count; j++) t.host[i + j] = host + j * cs;
}

/** Whether an L2 table has any entry at all. */
function hasEntries(kind: Uint8Array): boolean {
  return kind.indexOf(KIND_DATA) !== -1 || kind.indexOf(KIND_COMPRESSED) !== -1 || kind.indexOf(KIND_ZERO) !== -1;
}

/** Packs `count` refcounts of `bits` width, starting at host cluster `first`, into `out`. */
function encodeRefcounts(out: Buffer, refs: RefCounts, first: number, count: number, bits: number): void {
  const counts = refs.range(first, Math.min(count, Math.max(0, refs.length - first)));
  // DataView's setters are V8 builtins; Buffer's writeUInt16BE is JavaScript, and a call per
  // host cluster made it hot enough to be compiled.
  const view = new DataView(out.buffer, out.byteOffset, out.length);
  for (let j = 0; j < counts.length; j++) {
    const v = counts[j]!;
    if (v === 0) continue;
    switch (bits) {
      case 64:
        view.setUint32(j * 8 + 4, v);
        break;
      case 32:
        view.setUint32(j * 4, v);
        break;
      case 16:
        view.setUint16(j * 2, v);
        break;
      case 8:
        out[j] = v;
        break;
      default: {
        // Sub-byte widths: least significant bits first within each byte.
        const bit = j * bits;
        out[bit >> 3] = out[bit >> 3]! | ((v & ((1 << bits) - 1)) << (bit & 7));
      }
    }
  }
}
