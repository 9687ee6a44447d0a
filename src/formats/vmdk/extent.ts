/**
 * Sparse extents (hosted KDMV, ESX COWD, seSparse) behind one lookup, plus the two caches the
 * reader needs: open extent files (bounded fd count) and metadata tables (bounded bytes).
 */

import { inflateSync } from 'node:zlib';
import { CorruptImageError } from '../../disk/errors.js';
import type { PackedSource, Segment } from '../../disk/mapped.js';
import { type ByteSource, FileSource, readExact } from '../../disk/source.js';
import { isZero } from '../../disk/zero.js';
import {
  COWD_GTES_PER_GT,
  type CowdHeader,
  FLAG_COMPRESSED,
  FLAG_MARKERS,
  FLAG_ZERO_GRAIN,
  SECTOR,
  type SeSparseHeader,
  type SparseHeader,
} from './layout.js';

/** Compressed grains are read through this many windows of this size (per extent). */
const WINDOWS = 8;
const WINDOW_BYTES = 256 * 1024;

/** Keeps at most `limit` extent files open; a file in the middle of a read is never closed. */
export class FilePool {
  private readonly open = new Set<LazyFile>();
  constructor(private readonly limit = 64) {}
  touch(f: LazyFile): void {
    this.open.delete(f);
    this.open.add(f);
    if (this.open.size <= this.limit) return;
    for (const old of this.open) {
      if (this.open.size <= this.limit) break;
      if (old !== f && old.idle()) {
        this.open.delete(old);
        old.release();
      }
    }
  }
  forget(f: LazyFile): void {
    this.open.delete(f);
  }
}

/** A read-only file opened on demand (twoGbMaxExtent images of a 2 TiB disk have 1024 of them). */
export class LazyFile implements ByteSource {
  readonly size: number;
  private src: FileSource | null;
  private busy = 0;
  private closed = false;
  constructor(
    readonly name: string,
    private readonly pool: FilePool,
  ) {
    this.src = FileSource.open(name);
    this.size = this.src.size;
    pool.touch(this);
  }
  idle(): boolean {
    return this.busy === 0;
  }
  release(): void {
    const s = this.src;
    this.src = null;
    void s?.close();
  }
  async read(position: number, length: number, into?: Buffer): Promise<Buffer> {
    if (this.closed) throw new CorruptImageError('read after close', this.name);
    this.busy++;
    try {
      if (!this.src) this.src = FileSource.open(this.name);
      this.pool.touch(this);
      return await this.src.read(position, length, into);
    } finally {
      this.busy--;
    }
  }
  async close(): Promise<void> {
    this.closed = true;
    this.pool.forget(this);
    this.release();
  }
}

/** Least-recently-used cache of metadata tables under a byte budget. */
export class MetaCache {
  private readonly map = new Map<string, Buffer>();
  private bytes = 0;
  constructor(private readonly budget: number) {}
  peek(key: string): Buffer | undefined {
    const hit = this.map.get(key);
    if (hit) {
      this.map.delete(key);
      this.map.set(key, hit);
    }
    return hit;
  }
  put(key: string, buf: Buffer): void {
    const old = this.map.get(key);
    if (old) {
      this.map.delete(key);
      this.bytes -= old.length;
    }
    this.map.set(key, buf);
    this.bytes += buf.length;
    for (const [k, v] of this.map) {
      if (this.bytes <= this.budget || k === key) break;
      this.map.delete(k);
      this.bytes -= v.length;
    }
  }
  async get(key: string, load: () => Promise<Buffer>): Promise<Buffer> {
    const hit = this.peek(key);
    if (hit) return hit;
    const buf = await load();
    this.put(key, buf);
    return buf;
  }
}

type Grain = { kind: 'unallocated' } | { kind: 'zero' } | { kind: 'data'; pos: number } | { kind: 'compressed'; pos: number };

const GD_PAGE = 4096;
/** Bytes of neighbouring grain tables read in one request. */
const GT_READAHEAD = 256 * 1024;
let nextExtentId = 0;

/** One sparse extent: a grain directory of grain tables of grains, whatever the dialect. */
export class SparseExtent {
  readonly id = nextExtentId++;
  readonly grainBytes: number;
  readonly gtEntries: number;
  readonly gdEntries: number;
  readonly entrySize: 4 | 8;
  readonly compressed: boolean;
  private lastGrain: { pos: number; data: Buffer } | null = null;

  private constructor(
    readonly dialect: 'kdmv' | 'cowd' | 'sesparse',
    readonly source: ByteSource,
    /** Guest bytes this extent covers. */
    readonly length: number,
    grainSectors: number,
    gtEntries: number,
    readonly gdOffset: number,
    private readonly cache: MetaCache,
    private readonly flags: number,
    private readonly seSparse?: SeSparseHeader,
  ) {
    this.grainBytes = grainSectors * SECTOR;
    this.gtEntries = gtEntries;
    this.gdEntries = Math.ceil(length / (this.grainBytes * gtEntries));
    this.entrySize = dialect === 'sesparse' ? 8 : 4;
    this.compressed = (flags & FLAG_COMPRESSED) !== 0;
    if (gdOffset + this.gdEntries * this.entrySize > source.size) {
      throw new CorruptImageError(
        `grain directory at offset ${gdOffset} (${this.gdEntries} entries) lies beyond the end of the file (${source.size} bytes)`,
        source.name,
      );
    }
  }

  get clusterSize(): number {
    return this.grainBytes;
  }
  get hasMarkers(): boolean {
    return (this.flags & FLAG_MARKERS) !== 0;
  }

  static kdmv(source: ByteSource, h: SparseHeader, gdSector: number, length: number, cache: MetaCache): SparseExtent {
    return new SparseExtent('kdmv', source, length, h.grainSize, h.numGTEsPerGT, gdSector * SECTOR, cache, h.flags);
  }
  static cowd(source: ByteSource, h: CowdHeader, length: number, cache: MetaCache): SparseExtent {
    return new SparseExtent('cowd', source, length, h.grainSize, COWD_GTES_PER_GT, h.gdOffset * SECTOR, cache, 0);
  }
  static sesparse(source: ByteSource, h: SeSparseHeader, length: number, cache: MetaCache): SparseExtent {
    const gtEntries = (h.grainTableSize * SECTOR) / 8;
    return new SparseExtent('sesparse', source, length, h.grainSize, gtEntries, h.grainDirOffset * SECTOR, cache, 0, h);
  }

  private gdPage(page: number): Promise<Buffer> {
    return this.cache.get(`${this.id}:gd:${page}`, () => {
      const first = page * GD_PAGE;
      const n = Math.min(GD_PAGE, this.gdEntries - first);
      return readExact(this.source, this.gdOffset + first * this.entrySize, n * this.entrySize, 'grain directory');
    });
  }

  /** Byte offset of grain table `i`, or 0 when it is absent. */
  private gtOffsetFrom(page: Buffer, j: number): number {
    if (this.entrySize === 4) return page.readUInt32LE(j * 4) * SECTOR;
    const hi = page.readUInt32LE(j * 8 + 4);
    const lo = page.readUInt32LE(j * 8);
    if (hi === 0 && lo === 0) return 0;
    if (hi !== 0x10000000) {
      throw new CorruptImageError(
        `seSparse grain directory entry ${hi.toString(16)}${lo.toString(16).padStart(8, '0')} is invalid`,
        this.source.name,
      );
    }
    const se = this.seSparse!;
    const gtBytes = this.gtEntries * 8;
    if (lo * gtBytes >= se.grainTablesSize * SECTOR) {
      throw new CorruptImageError(`seSparse grain table index ${lo} lies outside the grain tables area`, this.source.name);
    }
    return se.grainTablesOffset * SECTOR + lo * gtBytes;
  }

  /**
   * Grain table `index` at `offset`. Tables that follow it in the directory and lie right after it
   * in the file (qemu-img and VMware preallocate them that way) are read in the same request.
   */
  private async gt(index: number, offset: number): Promise<Buffer> {
    const key = `${this.id}:gt:${index}`;
    const hit = this.cache.peek(key);
    if (hit) return hit;
    const gtBytes = this.gtEntries * this.entrySize;
    const page = Math.floor(index / GD_PAGE);
    const dir = await this.gdPage(page);
    let count = 1;
    const maxCount = Math.max(1, Math.floor(GT_READAHEAD / gtBytes));
    while (count < maxCount) {
      const k = index + count;
      if (k >= this.gdEntries || Math.floor(k / GD_PAGE) !== page) break;
      if (this.gtOffsetFrom(dir, k - page * GD_PAGE) !== offset + count * gtBytes) break;
      if (offset + (count + 1) * gtBytes > this.source.size) break;
      count++;
    }
    const span = await readExact(this.source, offset, count * gtBytes, `grain table ${index}`);
    for (let i = count - 1; i >= 0; i--) {
      this.cache.put(`${this.id}:gt:${index + i}`, span.subarray(i * gtBytes, (i + 1) * gtBytes));
    }
    return this.cache.peek(key)!;
  }

  private grain(gt: Buffer, j: number): Grain {
    if (this.entrySize === 4) {
      const v = gt.readUInt32LE(j * 4);
      if (v === 0) return { kind: 'unallocated' };
      if (v === 1 && this.dialect === 'kdmv' && (this.flags & FLAG_ZERO_GRAIN) !== 0) return { kind: 'zero' };
      return { kind: this.compressed ? 'compressed' : 'data', pos: v * SECTOR };
    }
    const hi = gt.readUInt32LE(j * 8 + 4);
    const lo = gt.readUInt32LE(j * 8);
    switch (hi >>> 28) {
      case 0:
        if (hi !== 0 || lo !== 0) throw new CorruptImageError('seSparse grain table entry is invalid', this.source.name);
        return { kind: 'unallocated' };
      case 1: // unmapped
      case 2: // zero
        return { kind: 'zero' };
      case 3: {
        // index = bits 48..59 as the low 12 bits, bits 0..47 shifted up by 12
        const low48 = (hi & 0xffff) * 2 ** 32 + lo;
        const index = ((hi >>> 16) & 0xfff) + low48 * 4096;
        const se = this.seSparse!;
        const pos = (se.grainsOffset + index * se.grainSize) * SECTOR;
        if (!Number.isSafeInteger(pos)) throw new CorruptImageError('seSparse grain offset is out of range', this.source.name);
        return { kind: 'data', pos };
      }
      default:
        throw new CorruptImageError('seSparse grain table entry has an unknown type', this.source.name);
    }
  }

  private grainIsEmpty(gt: Buffer, j: number): boolean {
    return this.entrySize === 4 ? gt.readUInt32LE(j * 4) === 0 : gt.readUInt32LE(j * 8) === 0 && gt.readUInt32LE(j * 8 + 4) === 0;
  }

  /**
   * Length of the unallocated stretch starting at `rel` (at most `want`): absent grain tables and
   * tables of nothing but empty entries (qemu-img preallocates them) are skipped whole.
   */
  private async unallocatedRun(rel: number, want: number): Promise<number> {
    const gb = this.grainBytes;
    const coverage = gb * this.gtEntries;
    const limit = rel + want;
    let gtIndex = Math.floor(rel / coverage);
    let page = -1;
    let dir: Buffer | null = null;
    let j = Math.floor(rel / gb) - gtIndex * this.gtEntries;
    let gt: Buffer | null = null;
    let pos = Math.floor(rel / gb) * gb;
    while (pos < limit) {
      if (gt === null) {
        if (gtIndex >= this.gdEntries) break;
        const p = Math.floor(gtIndex / GD_PAGE);
        if (p !== page) {
          page = p;
          dir = await this.gdPage(p);
        }
        const off = this.gtOffsetFrom(dir!, gtIndex - p * GD_PAGE);
        if (off !== 0) {
          const t = await this.gt(gtIndex, off);
          const tail = t.subarray(j * this.entrySize);
          if (!isZero(tail)) gt = t;
        }
        if (gt === null) {
          pos = (gtIndex + 1) * coverage;
          gtIndex++;
          j = 0;
          continue;
        }
      }
      if (!this.grainIsEmpty(gt, j)) break;
      pos += gb;
      if (++j === this.gtEntries) {
        gt = null;
        gtIndex++;
        j = 0;
      }
    }
    return Math.min(want, pos - rel);
  }

  /** What the guest bytes at `rel` (relative to this extent) are, for up to `max` bytes. */
  async lookup(rel: number, max: number): Promise<Segment> {
    const gb = this.grainBytes;
    const coverage = gb * this.gtEntries;
    const gtIndex = Math.floor(rel / coverage);
    const want = Math.min(max, this.length - rel);
    const gtOffset = this.gtOffsetFrom(await this.gdPage(Math.floor(gtIndex / GD_PAGE)), gtIndex % GD_PAGE);
    const first = Math.floor(rel / gb) - gtIndex * this.gtEntries;
    if (gtOffset === 0 || this.grainIsEmpty(await this.gt(gtIndex, gtOffset), first)) {
      return { kind: 'unallocated', length: await this.unallocatedRun(rel, want) };
    }
    const gt = await this.gt(gtIndex, gtOffset);
    const skip = rel - Math.floor(rel / gb) * gb;
    const g = this.grain(gt, first);
    if (g.kind === 'compressed') {
      const length = Math.min(want, gb - skip);
      const grainEnd = Math.min(gb, this.length - (rel - skip));
      return {
        kind: 'encoded',
        length,
        skip,
        load: () => this.loadCompressed(g.pos, grainEnd),
        pack: () => this.packCompressed(g.pos, grainEnd),
      };
    }
    // Extend over following grains of the same kind (and, for data, contiguous in the file).
    let j = first + 1;
    let end = rel - skip + gb;
    while (end < rel + want && j < this.gtEntries) {
      const n = this.grain(gt, j);
      if (n.kind !== g.kind) break;
      if (g.kind === 'data' && n.kind === 'data' && n.pos !== g.pos + (j - first) * gb) break;
      j++;
      end += gb;
    }
    const length = Math.min(want, end - rel);
    if (g.kind === 'data') {
      const position = g.pos + skip;
      if (position + length > this.source.size) {
        throw new CorruptImageError(
          `grain at offset ${g.pos} lies beyond the end of the file (${this.source.size} bytes); the image is truncated or corrupt`,
          this.source.name,
        );
      }
      return { kind: 'data', length, source: this.source, position };
    }
    return { kind: g.kind, length };
  }

  /**
   * Reads and inflates one compressed grain; the last decoded grain is kept for small reads.
   * Grains with markers are read through a few windows of the file (stream-optimized grains lie
   * one after the other, so one read serves many). (Inflating on libuv's thread pool instead was
   * measured slower: a 64 KiB grain inflates faster than the hand-off costs.)
   */
  private async loadCompressed(pos: number, needed: number): Promise<Buffer> {
    if (this.lastGrain?.pos === pos) return this.lastGrain.data;
    const gb = this.grainBytes;
    const stream = await this.grainStream(pos);
    let data: Buffer;
    try {
      // One output chunk of a whole grain: no concatenation of 16 KiB pieces afterwards.
      data = inflateSync(stream, { maxOutputLength: gb, chunkSize: gb + 1024 });
    } catch (err) {
      throw this.grainError(pos, needed, { reason: (err as Error).message });
    }
    if (data.length < needed) throw this.grainError(pos, needed, { decoded: data.length });
    if (data.length < gb) data = Buffer.concat([data, Buffer.alloc(gb - data.length)]);
    this.lastGrain = { pos, data };
    return data;
  }

  /** A compressed grain as stored, for the copy pipeline to inflate on a worker thread. */
  private async packCompressed(pos: number, needed: number): Promise<PackedSource> {
    return {
      codec: 'inflate',
      packed: await this.grainStream(pos),
      size: this.grainBytes,
      minSize: needed,
      corrupt: (problem) => this.grainError(pos, needed, problem),
    };
  }

  /**
   * The compressed grains from `rel` on (up to `max` guest bytes, while each lies after the last
   * in the file, as in stream-optimized images) as stored, read in one request into memory of
   * their own (from `memory` when given). `length` is the guest bytes they cover: 0 when the grain
   * at `rel` is not such a one.
   */
  async packGrains(
    rel: number,
    max: number,
    memory: (bytes: number) => Buffer = Buffer.allocUnsafeSlow,
  ): Promise<{ length: number; units: (PackedSource & { rel: number; length: number; skip: number })[] }> {
    const none = { length: 0, units: [] };
    if (!this.compressed || !this.hasMarkers) return none;
    const gb = this.grainBytes;
    const coverage = gb * this.gtEntries;
    const end = Math.min(rel + max, this.length);
    const grains: { start: number; pos: number }[] = [];
    let start = Math.floor(rel / gb) * gb;
    let table: Buffer | null = null;
    let tableIndex = -1;
    while (start < end) {
      const gtIndex = Math.floor(start / coverage);
      if (gtIndex !== tableIndex) {
        const off = this.gtOffsetFrom(await this.gdPage(Math.floor(gtIndex / GD_PAGE)), gtIndex % GD_PAGE);
        if (off === 0) break;
        table = await this.gt(gtIndex, off);
        tableIndex = gtIndex;
      }
      const g = this.grain(table!, Math.floor(start / gb) - gtIndex * this.gtEntries);
      if (g.kind !== 'compressed') break;
      const last = grains[grains.length - 1];
      if (last && g.pos <= last.pos) break;
      grains.push({ start, pos: g.pos });
      start += gb;
    }
    if (grains.length === 0) return none;
    const first = grains[0]!.pos;
    const lastPos = grains[grains.length - 1]!.pos;
    const lastSize = (await readExact(this.source, lastPos, 12, 'grain marker')).readUInt32LE(8);
    const span = lastPos + 12 + lastSize - first;
    const units: (PackedSource & { rel: number; length: number; skip: number })[] = [];
    // Grains scattered over the file (or a corrupt size) are read one by one.
    const together = lastSize > 0 && lastSize <= 2 * gb + 1024 && span <= grains.length * (2 * gb + 2048);
    const block = together ? await readExact(this.source, first, span, 'compressed grains', memory(span)) : null;
    for (const { start: s, pos } of grains) {
      const needed = Math.min(gb, this.length - s);
      const skip = Math.max(0, rel - s);
      const length = Math.min(end, s + gb) - s - skip;
      const corrupt = (problem: { reason: string } | { decoded: number }) => this.grainError(pos, needed, problem);
      const at = pos - first;
      const size = block ? block.readUInt32LE(at + 8) : 0;
      if (block && size > 0 && size <= 2 * gb + 1024 && at + 12 + size <= span) {
        const packed = block.subarray(at + 12, at + 12 + size);
        units.push({ rel: s + skip, length, skip, codec: 'inflate', packed, size: gb, minSize: needed, movable: true, corrupt });
      } else {
        units.push({ rel: s + skip, length, skip, ...(await this.packCompressed(pos, needed)) });
      }
    }
    return { length: Math.min(end, start) - rel, units };
  }

  /** The deflate stream of the compressed grain at `pos` (with markers: exactly its bytes). */
  private async grainStream(pos: number): Promise<Buffer> {
    const gb = this.grainBytes;
    if (!this.hasMarkers) return readExact(this.source, pos, Math.min(2 * gb, this.source.size - pos), 'compressed grain');
    const head = await this.windowed(pos, 12, 'grain marker');
    const size = head.readUInt32LE(8);
    if (size === 0 || size > 2 * gb + 1024) {
      throw new CorruptImageError(`compressed grain at offset ${pos} claims ${size} bytes`, this.source.name);
    }
    return this.windowed(pos + 12, size, 'compressed grain');
  }

  private grainError(pos: number, needed: number, problem: { reason: string } | { decoded: number }): CorruptImageError {
    const what =
      'reason' in problem ? `does not inflate (${problem.reason})` : `inflates to ${problem.decoded} bytes, ${needed} expected`;
    return new CorruptImageError(`compressed grain at offset ${pos} ${what}`, this.source.name);
  }

  private readonly windows: { pos: number; data: Buffer }[] = [];

  /** `length` bytes at `pos`, from a cached window of the file when one holds them. */
  private async windowed(pos: number, length: number, what: string): Promise<Buffer> {
    for (const w of this.windows) {
      if (pos >= w.pos && pos + length <= w.pos + w.data.length) return w.data.subarray(pos - w.pos, pos - w.pos + length);
    }
    const span = Math.min(Math.max(length, WINDOW_BYTES), this.source.size - pos);
    if (span < length) return readExact(this.source, pos, length, what);
    const data = await readExact(this.source, pos, span, what);
    if (this.windows.length >= WINDOWS) this.windows.shift();
    this.windows.push({ pos, data });
    return data.subarray(0, length);
  }

  /** Walks every allocated grain table entry (for check): calls `visit` per table and grain. */
  async walk(
    onTable: (gtIndex: number, offset: number) => void | Promise<void>,
    onGrain: (gtIndex: number, j: number, kind: 'data' | 'compressed', pos: number) => void | Promise<void>,
  ): Promise<void> {
    for (let page = 0; page * GD_PAGE < this.gdEntries; page++) {
      const buf = await this.gdPage(page);
      const n = buf.length / this.entrySize;
      for (let k = 0; k < n; k++) {
        const gtIndex = page * GD_PAGE + k;
        const off = this.gtOffsetFrom(buf, k);
        if (off === 0) continue;
        await onTable(gtIndex, off);
        if (off + this.gtEntries * this.entrySize > this.source.size) continue;
        const gt = await this.gt(gtIndex, off);
        for (let j = 0; j < this.gtEntries; j++) {
          const g = this.grain(gt, j);
          if (g.kind === 'data' || g.kind === 'compressed') await onGrain(gtIndex, j, g.kind, g.pos);
        }
      }
    }
  }

  /** Raw grain table bytes (for comparing the redundant copy in check). */
  readTable(offset: number): Promise<Buffer> {
    return readExact(this.source, offset, this.gtEntries * this.entrySize, 'grain table');
  }
}
