/**
 * Writes VMDK: monolithicSparse (default), monolithicFlat, twoGbMaxExtentSparse,
 * twoGbMaxExtentFlat and streamOptimized (one sequential pass, so a pipe works too).
 */
import { createHash } from 'node:crypto';
import { closeSync, openSync, readSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { deflateSync } from 'node:zlib';
import { adoptMarked, markFile, seal, unseal, verifyMarked } from '../../disk/checkpoint.js';
import { UsageError, VmferryError } from '../../disk/errors.js';
import { checkKnownOptions, parseBoolOption } from '../../disk/options.js';
import { AtomicFileSink, type ByteSink, commitAll, openSink } from '../../disk/sink.js';
import type { CodecSpec, CompressedUnit, CreateOptions, DiskWriter } from '../../disk/types.js';
import {
  COMPRESSION_DEFLATE,
  encodeGrain,
  encodeMetaMarker,
  encodeSparseHeader,
  FLAG_COMPRESSED,
  FLAG_MARKERS,
  FLAG_NL_DETECT,
  FLAG_RGD,
  FLAG_ZERO_GRAIN,
  formatDdbUuid,
  formatDescriptor,
  GTES_PER_GT,
  geometry,
  MARKER_FOOTER,
  MARKER_GD,
  MARKER_GT,
  NO_PARENT_CID,
  SECTOR,
  SPLIT_BYTES,
  type SparseHeader,
  VMDK_CREATE_OPTIONS,
} from './layout.js';

export const SUBFORMATS = [
  'monolithicSparse',
  'monolithicFlat',
  'twoGbMaxExtentSparse',
  'twoGbMaxExtentFlat',
  'streamOptimized',
] as const;
export type Subformat = (typeof SUBFORMATS)[number];
const ADAPTERS = ['ide', 'lsilogic', 'buslogic', 'legacyESX'];

/** Grain size of everything vmferry writes: 128 sectors, as qemu-img and VMware use. */
export const GRAIN_SECTORS = 128;
const GRAIN_BYTES = GRAIN_SECTORS * SECTOR;
const DESC_SECTORS = 20;
/** Grain tables kept in memory by a sparse writer before the oldest are written back. */
const GT_CACHE_LIMIT = 4096;

export interface VmdkCreateSettings {
  subformat: Subformat;
  adapterType: string;
  hwVersion: string;
  toolsVersion: string;
  zeroedGrain: boolean;
}

export function parseCreateOptions(options: CreateOptions): VmdkCreateSettings {
  const o = options.options;
  checkKnownOptions('vmdk', o, VMDK_CREATE_OPTIONS);
  const subformat = (o.subformat ?? 'monolithicSparse') as Subformat;
  if (!SUBFORMATS.includes(subformat)) {
    throw new UsageError(`Unknown subformat '${o.subformat}' for vmdk (use ${SUBFORMATS.join(', ')})`);
  }
  const adapterType = o.adapter_type ?? 'ide';
  if (!ADAPTERS.includes(adapterType)) {
    throw new UsageError(`Unknown adapter type '${adapterType}' for vmdk (use ${ADAPTERS.join(', ')})`);
  }
  const compat6 = parseBoolOption(o.compat6, 'compat6', false);
  if (compat6 && o.hwversion !== undefined) throw new UsageError('compat6 cannot be enabled with hwversion set');
  const hwVersion = compat6 ? '6' : (o.hwversion ?? '4');
  if (!/^\d{1,5}$/.test(hwVersion)) throw new UsageError(`Invalid hwversion '${hwVersion}' (a number, e.g. 4, 6, 13, 21)`);
  const toolsVersion = o.toolsversion ?? '2147483647';
  if (!/^\d{1,10}$/.test(toolsVersion)) throw new UsageError(`Invalid toolsversion '${toolsVersion}' (a number)`);
  const zeroedGrain = parseBoolOption(o.zeroed_grain, 'zeroed_grain', false);
  const flat = subformat === 'monolithicFlat' || subformat === 'twoGbMaxExtentFlat';
  if (flat && zeroedGrain) throw new UsageError("Flat image can't enable zeroed grain");
  if (options.compress && subformat !== 'streamOptimized') {
    throw new UsageError(`vmdk subformat ${subformat} cannot hold compressed grains; use -o subformat=streamOptimized`);
  }
  return { subformat, adapterType, hwVersion, toolsVersion, zeroedGrain };
}

/**
 * CID and ddb.uuid: derived from the creation parameters, never from the clock or a random
 * source, so the same input and options give byte-identical images.
 */
function identity(virtualSize: number, s: VmdkCreateSettings): { cid: number; uuid: string } {
  const h = createHash('sha256')
    .update(JSON.stringify(['vmferry-vmdk', virtualSize, s]))
    .digest();
  let cid = h.readUInt32LE(0);
  if (cid === NO_PARENT_CID || cid === 0) cid = 0x1f2e3d4c;
  return { cid, uuid: formatDdbUuid(h.subarray(4, 20)) };
}

function descriptorText(virtualSize: number, s: VmdkCreateSettings, extentLines: string[]): string {
  const g = geometry(virtualSize, s.adapterType);
  const { cid, uuid } = identity(virtualSize, s);
  return formatDescriptor({
    cid,
    parentCid: NO_PARENT_CID,
    createType: s.subformat,
    extentLines,
    ddb: [
      ['virtualHWVersion', s.hwVersion],
      ['geometry.cylinders', String(g.cylinders)],
      ['geometry.heads', String(g.heads)],
      ['geometry.sectors', String(g.sectors)],
      ['adapterType', s.adapterType],
      ['toolsVersion', s.toolsVersion],
      ['uuid', uuid],
    ],
  });
}

/** Compresses one grain as VMware does (zlib format): a pure function, fit for a worker pool. */
export function compressGrain(lba: number, grain: Buffer): Buffer {
  return encodeGrain(lba, deflateSync(grain));
}

// ---------------------------------------------------------------------------------------------

interface ExtentWriter {
  readonly sink: AtomicFileSink;
  readonly length: number;
  write(rel: number, data: Buffer): Promise<void>;
  zero(rel: number, length: number): Promise<void>;
  /** Metadata, then flush (closes the file); commit comes later with the others. */
  finish(descriptor?: string): Promise<void>;
}

/** A flat extent: the guest bytes as they are; zeros stay holes. */
class FlatExtentWriter implements ExtentWriter {
  private highWater = 0;
  constructor(
    readonly sink: AtomicFileSink,
    readonly length: number,
  ) {}
  async write(rel: number, data: Buffer): Promise<void> {
    await this.sink.write(data, rel);
    this.highWater = Math.max(this.highWater, rel + data.length);
  }
  async zero(rel: number, length: number): Promise<void> {
    const end = Math.min(rel + length, this.highWater);
    const block = Buffer.alloc(Math.min(1 << 20, Math.max(0, end - rel)));
    for (let pos = rel; pos < end; pos += block.length) {
      await this.sink.write(block.subarray(0, Math.min(block.length, end - pos)), pos);
    }
  }
  async finish(): Promise<void> {
    await this.sink.setLength(this.length);
    await this.sink.flush();
  }
}

/** Where a hosted sparse extent keeps its metadata (the layout qemu-img uses). */
export function sparseLayout(capacitySectors: number) {
  const grains = Math.ceil(capacitySectors / GRAIN_SECTORS);
  const gtCount = Math.ceil(grains / GTES_PER_GT);
  const gtSectors = (GTES_PER_GT * 4) / SECTOR;
  const gdSectors = Math.ceil((gtCount * 4) / SECTOR);
  const rgdOffset = 1 + DESC_SECTORS;
  const gdOffset = rgdOffset + gdSectors + gtSectors * gtCount;
  const grainOffset = Math.ceil((gdOffset + gdSectors + gtSectors * gtCount) / GRAIN_SECTORS) * GRAIN_SECTORS;
  return { grains, gtCount, gtSectors, gdSectors, rgdOffset, gdOffset, grainOffset };
}

const MiB = 1024 * 1024;

/** Ascending indices as runs [first, count]. */
function toRuns(sorted: number[]): [number, number][] {
  const runs: [number, number][] = [];
  for (const i of sorted) {
    const last = runs.at(-1);
    if (last && last[0] + last[1] === i) last[1]++;
    else runs.push([i, 1]);
  }
  return runs;
}

function fromRuns(runs: unknown, limit: number, bad: (why: string) => Error): Set<number> {
  if (!Array.isArray(runs)) throw bad('malformed');
  const out = new Set<number>();
  let prev = -1;
  for (const run of runs) {
    if (!Array.isArray(run) || run.length !== 2 || !Number.isSafeInteger(run[0]) || !Number.isSafeInteger(run[1]))
      throw bad('malformed run');
    const [first, count] = run as [number, number];
    if (first <= prev || count < 1 || first + count > limit) throw bad('a table outside the disk');
    for (let i = first; i < first + count; i++) out.add(i);
    prev = first + count - 1;
  }
  return out;
}

/** An uncompressed hosted sparse extent, written through a random-access sink. */
class SparseExtentWriter implements ExtentWriter {
  private readonly layout: ReturnType<typeof sparseLayout>;
  private nextSector: number;
  /** Grain tables in memory (dirty or clean), oldest first. */
  private readonly gts = new Map<number, Uint32Array>();
  /** Grain tables written back to the file (reloaded from there when touched again). */
  private readonly spilled = new Set<number>();
  /** Grain tables holding at least one grain. */
  private readonly touched = new Set<number>();
  /** Grain tables changed since they were last written to the file (checkpoints write these). */
  private readonly dirty = new Set<number>();
  private pending: { grain: number; buf: Buffer } | null = null;
  private readFd: number | null = null;

  constructor(
    readonly sink: AtomicFileSink,
    readonly length: number,
    private readonly zeroedGrain: boolean,
  ) {
    this.layout = sparseLayout(Math.ceil(length / SECTOR));
    this.nextSector = this.layout.grainOffset;
  }

  private async table(gt: number): Promise<Uint32Array> {
    let t = this.gts.get(gt);
    if (t) return t;
    t = new Uint32Array(GTES_PER_GT);
    if (this.spilled.has(gt)) {
      this.readFd ??= openSync(this.sink.tempPath, 'r');
      const b = Buffer.from(t.buffer);
      readSync(this.readFd, b, 0, b.length, this.gtPosition(gt, false));
    }
    this.gts.set(gt, t);
    if (this.gts.size > GT_CACHE_LIMIT) {
      const [oldest, old] = this.gts.entries().next().value as [number, Uint32Array];
      this.gts.delete(oldest);
      if (this.touched.has(oldest)) {
        if (this.dirty.has(oldest)) await this.writeTable(oldest, old);
        this.dirty.delete(oldest);
        this.spilled.add(oldest);
      }
    }
    return t;
  }

  private gtPosition(gt: number, redundant: boolean): number {
    const l = this.layout;
    const base = (redundant ? l.rgdOffset : l.gdOffset) + l.gdSectors;
    return (base + gt * l.gtSectors) * SECTOR;
  }

  private async writeTable(gt: number, t: Uint32Array): Promise<void> {
    const b = Buffer.from(t.buffer, t.byteOffset, t.byteLength);
    await this.sink.write(b, this.gtPosition(gt, false));
    await this.sink.write(b, this.gtPosition(gt, true));
  }

  private async entry(grain: number): Promise<number> {
    const gt = Math.floor(grain / GTES_PER_GT);
    if (!this.touched.has(gt)) return 0;
    return (await this.table(gt))[grain % GTES_PER_GT]!;
  }

  private async allocate(firstGrain: number, count: number, data: Buffer): Promise<void> {
    const sector = this.nextSector;
    if (sector + count * GRAIN_SECTORS > 0xffffffff) {
      throw new VmferryError('sparse extent grows past 2 TiB, the most its 32-bit grain tables can address', this.sink.name);
    }
    await this.sink.write(data, sector * SECTOR);
    this.nextSector += count * GRAIN_SECTORS;
    for (let i = 0; i < count; i++) {
      const g = firstGrain + i;
      const gt = Math.floor(g / GTES_PER_GT);
      this.touched.add(gt);
      (await this.table(gt))[g % GTES_PER_GT] = sector + i * GRAIN_SECTORS;
      this.dirty.add(gt);
    }
  }

  /**
   * Writes the grain tables changed since the last checkpoint to their places (both copies) and
   * flushes. The state is then small: the allocation end and which tables hold grains; the tables
   * themselves are read back from the file on resume.
   */
  async checkpoint(): Promise<Record<string, unknown>> {
    if (this.pending) throw new UsageError('a vmdk output cannot be checkpointed in the middle of a grain', this.sink.name);
    for (const gt of this.dirty) await this.writeTable(gt, this.gts.get(gt)!);
    this.dirty.clear();
    const mark = await markFile(this.sink, this.layout.grainOffset * SECTOR, 'vmdk');
    return { nextSector: this.nextSector, touched: toRuns([...this.touched].sort((a, b) => a - b)), ...mark };
  }

  /**
   * Checks a checkpoint state against the file's grain tables, read-only: tables written after
   * the checkpoint (by the process that was killed) may point at grains past its end; those
   * entries are dropped. Returns the tables that need writing back, or throws on a mismatch.
   */
  static scan(length: number, s: Record<string, unknown>, bad: (why: string) => Error) {
    const l = sparseLayout(Math.ceil(length / SECTOR));
    const next = s.nextSector;
    if (!Number.isSafeInteger(next) || (next as number) < l.grainOffset || ((next as number) - l.grainOffset) % GRAIN_SECTORS)
      throw bad('allocation end');
    const nextSector = next as number;
    if (!Number.isSafeInteger(s.length) || (s.length as number) > nextSector * SECTOR) throw bad('length past the grains');
    const touched = fromRuns(s.touched, l.gtCount, bad);
    const fixes = new Map<number, Uint32Array>();
    const tableBytes = GTES_PER_GT * 4;
    const fd = openSync(s.tempPath as string, 'r');
    try {
      const per = Math.max(1, Math.floor(MiB / tableBytes));
      const bufs = [Buffer.alloc(per * tableBytes), Buffer.alloc(per * tableBytes)];
      for (let first = 0; first < l.gtCount; first += per) {
        const n = Math.min(per, l.gtCount - first);
        [false, true].forEach((redundant, k) => {
          const base = ((redundant ? l.rgdOffset : l.gdOffset) + l.gdSectors + first * l.gtSectors) * SECTOR;
          bufs[k]!.fill(0);
          readSync(fd, bufs[k]!, 0, n * tableBytes, base);
        });
        for (let i = 0; i < n; i++) {
          const gt = first + i;
          const views = bufs.map((b) => new Uint32Array(b.buffer, b.byteOffset + i * tableBytes, GTES_PER_GT));
          const clean = new Uint32Array(GTES_PER_GT);
          let kept = 0;
          let changed = false;
          for (let e = 0; e < GTES_PER_GT; e++) {
            const a = views[0]![e]!;
            const b = views[1]![e]!;
            const keep = (v: number) => (v >= nextSector ? 0 : v);
            if (keep(a) !== keep(b)) throw bad('its two grain-table copies disagree');
            const v = keep(a);
            if (v !== 0 && (v < l.grainOffset || (v - l.grainOffset) % GRAIN_SECTORS !== 0)) throw bad('a grain-table entry');
            if (v !== a || v !== b) changed = true;
            if (v !== 0) kept++;
            clean[e] = v;
          }
          if (kept > 0 !== touched.has(gt)) throw bad('grain tables differ from the state');
          if (changed) fixes.set(gt, clean);
        }
      }
    } finally {
      closeSync(fd);
    }
    return { nextSector, touched, fixes };
  }

  /** A writer continuing a checkpoint that scan() accepted; cleaned tables are written back. */
  static async resumed(
    sink: AtomicFileSink,
    length: number,
    zeroedGrain: boolean,
    scanned: ReturnType<typeof SparseExtentWriter.scan>,
  ): Promise<SparseExtentWriter> {
    const w = new SparseExtentWriter(sink, length, zeroedGrain);
    w.nextSector = scanned.nextSector;
    for (const gt of scanned.touched) {
      w.touched.add(gt);
      w.spilled.add(gt);
    }
    for (const [gt, t] of scanned.fixes) await w.writeTable(gt, t);
    return w;
  }

  private async flushPending(): Promise<void> {
    const p = this.pending;
    if (!p) return;
    this.pending = null;
    await this.allocate(p.grain, 1, p.buf);
  }

  async write(rel: number, data: Buffer): Promise<void> {
    let pos = rel;
    const end = rel + data.length;
    while (pos < end) {
      const grain = Math.floor(pos / GRAIN_BYTES);
      const inGrain = pos - grain * GRAIN_BYTES;
      const n = Math.min(GRAIN_BYTES - inGrain, end - pos);
      const piece = data.subarray(pos - rel, pos - rel + n);
      const at = await this.entry(grain);
      if (at > 1) {
        await this.sink.write(piece, at * SECTOR + inGrain);
      } else if (this.pending?.grain === grain) {
        piece.copy(this.pending.buf, inGrain);
      } else if (inGrain === 0 && n === GRAIN_BYTES) {
        // A run of whole, new grains goes out in one write.
        let count = 1;
        while (
          pos + (count + 1) * GRAIN_BYTES <= end &&
          (await this.entry(grain + count)) <= 1 &&
          this.pending?.grain !== grain + count
        ) {
          count++;
        }
        await this.flushPending();
        await this.allocate(grain, count, data.subarray(pos - rel, pos - rel + count * GRAIN_BYTES));
        pos += count * GRAIN_BYTES;
        continue;
      } else {
        await this.flushPending();
        this.pending = { grain, buf: Buffer.alloc(GRAIN_BYTES) };
        piece.copy(this.pending.buf, inGrain);
      }
      pos += n;
    }
  }

  async zero(rel: number, length: number): Promise<void> {
    const end = rel + length;
    const p = this.pending;
    if (p) {
      const gs = p.grain * GRAIN_BYTES;
      const a = Math.max(rel, gs);
      const b = Math.min(end, gs + GRAIN_BYTES);
      if (a < b) p.buf.fill(0, a - gs, b - gs);
    }
    // Only grains already written need zeros; visit just the tables that hold any.
    const cover = GRAIN_BYTES * GTES_PER_GT;
    const firstGt = Math.floor(rel / cover);
    const lastGt = Math.floor((end - 1) / cover);
    const gtsInRange =
      lastGt - firstGt < this.touched.size
        ? Array.from({ length: lastGt - firstGt + 1 }, (_, i) => firstGt + i).filter((g) => this.touched.has(g))
        : [...this.touched].filter((g) => g >= firstGt && g <= lastGt);
    for (const gt of gtsInRange) {
      const t = await this.table(gt);
      const g0 = Math.max(gt * GTES_PER_GT, Math.floor(rel / GRAIN_BYTES));
      const g1 = Math.min((gt + 1) * GTES_PER_GT - 1, Math.floor((end - 1) / GRAIN_BYTES));
      for (let g = g0; g <= g1; g++) {
        const at = t[g % GTES_PER_GT]!;
        if (at <= 1) continue;
        const gs = g * GRAIN_BYTES;
        const a = Math.max(rel, gs);
        const b = Math.min(end, gs + GRAIN_BYTES);
        await this.sink.write(Buffer.alloc(b - a), at * SECTOR + (a - gs));
      }
    }
  }

  async finish(descriptor?: string): Promise<void> {
    await this.flushPending();
    for (const [gt, t] of this.gts) if (this.touched.has(gt)) await this.writeTable(gt, t);
    if (this.readFd !== null) {
      closeSync(this.readFd);
      this.readFd = null;
    }
    const l = this.layout;
    const gd = Buffer.alloc(l.gdSectors * SECTOR);
    for (const [dirSector, out] of [
      [l.rgdOffset, 'rgd'],
      [l.gdOffset, 'gd'],
    ] as const) {
      for (let i = 0; i < l.gtCount; i++) gd.writeUInt32LE(dirSector + l.gdSectors + i * l.gtSectors, i * 4);
      await this.sink.write(gd, dirSector * SECTOR);
      void out;
    }
    const header: SparseHeader = {
      version: this.zeroedGrain ? 2 : 1,
      flags: FLAG_NL_DETECT | FLAG_RGD | (this.zeroedGrain ? FLAG_ZERO_GRAIN : 0),
      capacity: Math.ceil(this.length / SECTOR),
      grainSize: GRAIN_SECTORS,
      descriptorOffset: 1,
      descriptorSize: DESC_SECTORS,
      numGTEsPerGT: GTES_PER_GT,
      rgdOffset: l.rgdOffset,
      gdOffset: l.gdOffset,
      overHead: l.grainOffset,
      uncleanShutdown: false,
      compressAlgorithm: 0,
    };
    await this.sink.write(encodeSparseHeader(header), 0);
    if (descriptor !== undefined) {
      const text = Buffer.from(descriptor, 'latin1');
      if (text.length > DESC_SECTORS * SECTOR) throw new VmferryError('descriptor does not fit its 20 sectors', this.sink.name);
      await this.sink.write(text, SECTOR);
    }
    await this.sink.setLength(this.nextSector * SECTOR);
    await this.sink.flush();
  }

  abortReads(): void {
    if (this.readFd !== null) closeSync(this.readFd);
    this.readFd = null;
  }
}

/** Extent-file names as qemu-img makes them: disk.vmdk -> disk-flat.vmdk, disk-s001.vmdk, disk-f001.vmdk. */
export function extentFileName(path: string, subformat: Subformat, index: number): string {
  const base = basename(path);
  const dot = base.lastIndexOf('.');
  const prefix = dot > 0 ? base.slice(0, dot) : base;
  const postfix = dot > 0 ? base.slice(dot) : '';
  if (subformat === 'monolithicFlat') return `${prefix}-flat${postfix}`;
  const letter = subformat === 'twoGbMaxExtentFlat' ? 'f' : 's';
  return `${prefix}-${letter}${String(index + 1).padStart(3, '0')}${postfix}`;
}

/** Descriptor file plus extent files (monolithicFlat, twoGbMaxExtent*), or one sparse file. */
class MultiExtentWriter implements DiskWriter {
  readonly clusterSize: number;
  readonly sequentialOnly: boolean;
  private readonly writers: (ExtentWriter | undefined)[];
  private readonly done: boolean[];
  private readonly sizes: number[];
  private descriptorSink: ByteSink | null = null;
  private finished = false;
  /** Only monolithicSparse (one file) can be checkpointed; multi-file outputs restart from zero. */
  checkpoint?: () => Promise<unknown>;

  constructor(
    private readonly path: string,
    readonly virtualSize: number,
    private readonly settings: VmdkCreateSettings,
    private readonly mainSink: AtomicFileSink | null,
    resumed?: SparseExtentWriter,
  ) {
    const s = settings.subformat;
    const split = s === 'twoGbMaxExtentSparse' || s === 'twoGbMaxExtentFlat';
    const extentSize = split ? SPLIT_BYTES : Math.max(virtualSize, SECTOR);
    const count = Math.max(1, Math.ceil(virtualSize / extentSize));
    this.sizes = Array.from({ length: count }, (_, i) => Math.min(extentSize, virtualSize - i * extentSize) || SECTOR);
    this.writers = new Array(count).fill(undefined);
    this.done = new Array(count).fill(false);
    this.clusterSize = this.flat ? 4096 : GRAIN_BYTES;
    this.sequentialOnly = split;
    if (settings.subformat === 'monolithicSparse') {
      if (resumed) this.writers[0] = resumed;
      this.checkpoint = async () => {
        const w = this.get(0) as SparseExtentWriter;
        return seal({ format: 'vmdk', subformat: 'monolithicSparse', size: this.virtualSize, ...(await w.checkpoint()) });
      };
    }
  }

  private get flat(): boolean {
    return this.settings.subformat === 'monolithicFlat' || this.settings.subformat === 'twoGbMaxExtentFlat';
  }

  private extentStart(i: number): number {
    return i * SPLIT_BYTES;
  }

  private extentFor(offset: number): number {
    return this.settings.subformat.startsWith('twoGb') ? Math.floor(offset / SPLIT_BYTES) : 0;
  }

  private get(i: number): ExtentWriter {
    let w = this.writers[i];
    if (w) return w;
    if (this.done[i]) {
      throw new VmferryError(`writes to a ${this.settings.subformat} image must ascend across its 2 GiB extents`, this.path);
    }
    const sink =
      this.settings.subformat === 'monolithicSparse'
        ? this.mainSink!
        : new AtomicFileSink(join(dirname(this.path), extentFileName(this.path, this.settings.subformat, i)));
    w = this.flat
      ? new FlatExtentWriter(sink, this.sizes[i]!)
      : new SparseExtentWriter(sink, this.sizes[i]!, this.settings.zeroedGrain);
    this.writers[i] = w;
    return w;
  }

  /** Split images: extents below `i` are complete once a write reaches extent `i`. */
  private async closeBelow(i: number): Promise<void> {
    if (!this.settings.subformat.startsWith('twoGb')) return;
    for (let k = 0; k < i; k++) {
      if (this.done[k]) continue;
      await this.get(k).finish();
      this.done[k] = true;
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    let pos = offset;
    const end = offset + data.length;
    if (end > this.virtualSize) throw new VmferryError(`write beyond the virtual size ${this.virtualSize}`, this.path);
    while (pos < end) {
      const i = this.extentFor(pos);
      const start = this.extentStart(i);
      const n = Math.min(end - pos, start + this.sizes[i]! - pos);
      await this.closeBelow(i);
      await this.get(i).write(pos - start, data.subarray(pos - offset, pos - offset + n));
      pos += n;
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    let pos = offset;
    const end = Math.min(offset + length, this.virtualSize);
    while (pos < end) {
      const i = this.extentFor(pos);
      const start = this.extentStart(i);
      const n = Math.min(end - pos, start + this.sizes[i]! - pos);
      const w = this.writers[i];
      if (w && !this.done[i]) await w.zero(pos - start, n);
      pos += n;
    }
  }

  async finish(): Promise<void> {
    if (this.finished) return;
    const s = this.settings.subformat;
    const lines: string[] = [];
    for (let i = 0; i < this.sizes.length; i++) {
      const sectors = Math.ceil(this.sizes[i]! / SECTOR);
      const name = s === 'monolithicSparse' ? basename(this.path) : extentFileName(this.path, s, i);
      lines.push(this.flat ? `RW ${sectors} FLAT "${name}" 0` : `RW ${sectors} SPARSE "${name}"`);
    }
    const desc = descriptorText(this.virtualSize, this.settings, lines);
    const sinks: ByteSink[] = [];
    for (let i = 0; i < this.sizes.length; i++) {
      const w = this.get(i);
      if (!this.done[i]) await w.finish(s === 'monolithicSparse' ? desc : undefined);
      this.done[i] = true;
      sinks.push(w.sink);
    }
    if (s !== 'monolithicSparse') {
      const d = new AtomicFileSink(this.path);
      this.descriptorSink = d;
      await d.write(Buffer.from(desc, 'latin1'), 0);
      sinks.push(d);
    }
    await commitAll(sinks);
    this.finished = true;
  }

  async abort(): Promise<void> {
    for (const w of this.writers) {
      if (w instanceof SparseExtentWriter) w.abortReads();
      await w?.sink.abort();
    }
    await this.mainSink?.abort();
    await this.descriptorSink?.abort();
  }
}

/** streamOptimized: header, descriptor, then compressed grains, GTs, GD, footer, EOS, in one pass. */
class StreamOptimizedWriter implements DiskWriter {
  readonly clusterSize = GRAIN_BYTES;
  readonly sequentialOnly = true;
  /** Grains are deflated in the zlib format at zlib's defaults, on the pipeline's workers. */
  readonly compression: CodecSpec = { codec: 'zlib' };
  private pos = 0;
  private readonly capacity: number;
  private readonly gd: Buffer;
  private readonly gt = new Uint32Array(GTES_PER_GT);
  private gtIndex = -1;
  private gtUsed = false;
  private pending: { grain: number; buf: Buffer } | null = null;
  /** Grains below this are out (compressed and written). */
  private floor = 0;
  private readonly header: SparseHeader;

  constructor(
    private readonly sink: ByteSink,
    readonly virtualSize: number,
    settings: VmdkCreateSettings,
    extentName: string,
  ) {
    this.capacity = Math.ceil(virtualSize / SECTOR);
    const gdEntries = Math.ceil(this.capacity / (GRAIN_SECTORS * GTES_PER_GT));
    this.gd = Buffer.alloc(Math.ceil((gdEntries * 4) / SECTOR) * SECTOR);
    this.header = {
      version: 3,
      flags: FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS,
      capacity: this.capacity,
      grainSize: GRAIN_SECTORS,
      descriptorOffset: 1,
      descriptorSize: DESC_SECTORS,
      numGTEsPerGT: GTES_PER_GT,
      rgdOffset: 0,
      gdOffset: -1,
      overHead: GRAIN_SECTORS,
      uncleanShutdown: false,
      compressAlgorithm: COMPRESSION_DEFLATE,
    };
    this.desc = descriptorText(virtualSize, settings, [`RW ${this.capacity} SPARSE "${extentName}"`]);
  }
  private readonly desc: string;

  async start(): Promise<void> {
    const head = Buffer.alloc(GRAIN_SECTORS * SECTOR);
    encodeSparseHeader(this.header).copy(head, 0);
    const text = Buffer.from(this.desc, 'latin1');
    if (text.length > DESC_SECTORS * SECTOR) throw new VmferryError('descriptor does not fit its 20 sectors', this.sink.name);
    text.copy(head, SECTOR);
    await this.emit(head);
  }

  /**
   * The stream so far is final (grains and finished grain tables are never rewritten), so the
   * state is its length, the directory entries so far and the grain table being filled.
   */
  async checkpoint(): Promise<unknown> {
    if (this.pending) throw new UsageError('a vmdk output cannot be checkpointed in the middle of a grain', this.sink.name);
    const mark = await markFile(this.sink, 0, 'vmdk');
    if (mark.length !== this.pos) throw new VmferryError('the stream file is not as long as written', this.sink.name);
    return seal({
      format: 'vmdk',
      subformat: 'streamOptimized',
      size: this.virtualSize,
      floor: this.floor,
      gtIndex: this.gtIndex,
      gd: nonZero(new Uint32Array(this.gd.buffer, this.gd.byteOffset, this.gd.length / 4)),
      gt: nonZero(this.gt),
      ...mark,
    });
  }

  /** Restores a checkpoint's tables into a writer whose sink was adopted (after checking them). */
  static check(s: Record<string, unknown>, virtualSize: number, bad: (why: string) => Error) {
    const capacity = Math.ceil(virtualSize / SECTOR);
    const gdEntries = Math.ceil(capacity / (GRAIN_SECTORS * GTES_PER_GT));
    const grains = Math.ceil(capacity / GRAIN_SECTORS);
    const { floor, gtIndex, length } = s;
    if (!Number.isSafeInteger(length) || (length as number) < GRAIN_BYTES || (length as number) % SECTOR) throw bad('length');
    if (!Number.isSafeInteger(floor) || (floor as number) < 0 || (floor as number) > grains) throw bad('grain count');
    if (!Number.isSafeInteger(gtIndex) || (gtIndex as number) < -1 || (gtIndex as number) >= gdEntries) throw bad('table index');
    const end = (length as number) / SECTOR;
    const gd = parseNonZero(s.gd, gdEntries, end, bad);
    const gt = parseNonZero(s.gt, GTES_PER_GT, end, bad);
    // The table being filled is the one holding the last grain; finished tables come before it.
    const g = gtIndex as number;
    if (gt.size > 0 && (g < 0 || Math.floor(((floor as number) - 1) / GTES_PER_GT) !== g)) throw bad('table index');
    for (const i of gd.keys()) if (i >= g) throw bad('directory entry');
    return { floor: floor as number, gtIndex: g, gd, gt, pos: length as number };
  }

  static resumed(
    sink: AtomicFileSink,
    virtualSize: number,
    settings: VmdkCreateSettings,
    extentName: string,
    c: ReturnType<typeof StreamOptimizedWriter.check>,
  ): StreamOptimizedWriter {
    const w = new StreamOptimizedWriter(sink, virtualSize, settings, extentName);
    for (const [i, v] of c.gd) w.gd.writeUInt32LE(v, i * 4);
    for (const [i, v] of c.gt) w.gt[i] = v;
    w.gtUsed = c.gt.size > 0;
    w.gtIndex = c.gtIndex;
    w.floor = c.floor;
    w.pos = c.pos;
    return w;
  }

  /** While writeCompressed runs: what it emits, written as one at its end. */
  private batch: Buffer[] | null = null;

  private async emit(buf: Buffer): Promise<void> {
    if (this.batch) this.batch.push(buf);
    else await this.sink.write(buf, this.pos);
    this.pos += buf.length;
  }

  private async finishTable(): Promise<void> {
    if (this.gtIndex < 0 || !this.gtUsed) return;
    await this.emit(encodeMetaMarker((GTES_PER_GT * 4) / SECTOR, MARKER_GT));
    this.gd.writeUInt32LE(this.pos / SECTOR, this.gtIndex * 4);
    // A copy: the table is reused at once, and a batched emit writes later.
    await this.emit(Buffer.from(this.gt.buffer.slice(0)));
    this.gt.fill(0);
    this.gtUsed = false;
  }

  private async emitGrain(grain: number, data: Buffer): Promise<void> {
    await this.emitEncoded(grain, compressGrain(grain * GRAIN_SECTORS, data));
  }

  /** A grain already framed by encodeGrain. */
  private async emitEncoded(grain: number, encoded: Buffer): Promise<void> {
    const gt = Math.floor(grain / GTES_PER_GT);
    if (gt !== this.gtIndex) {
      await this.finishTable();
      this.gtIndex = gt;
    }
    this.gt[grain % GTES_PER_GT] = this.pos / SECTOR;
    this.gtUsed = true;
    await this.emit(encoded);
    this.floor = grain + 1;
  }

  private async flushPending(): Promise<void> {
    const p = this.pending;
    if (!p) return;
    this.pending = null;
    await this.emitGrain(p.grain, p.buf);
  }

  private refuseBackwards(offset: number): void {
    if (offset < this.floor * GRAIN_BYTES) {
      throw new VmferryError(
        `streamOptimized is written in one ascending pass; offset ${offset} comes after ${this.floor * GRAIN_BYTES}`,
        this.sink.name,
      );
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    if (data.length === 0) return;
    this.refuseBackwards(offset);
    if (offset + data.length > this.virtualSize)
      throw new VmferryError(`write beyond the virtual size ${this.virtualSize}`, this.sink.name);
    let pos = offset;
    const end = offset + data.length;
    while (pos < end) {
      const grain = Math.floor(pos / GRAIN_BYTES);
      const inGrain = pos - grain * GRAIN_BYTES;
      const n = Math.min(GRAIN_BYTES - inGrain, end - pos);
      const piece = data.subarray(pos - offset, pos - offset + n);
      if (this.pending && this.pending.grain !== grain) await this.flushPending();
      if (!this.pending && inGrain === 0 && n === GRAIN_BYTES) {
        await this.emitGrain(grain, piece);
      } else {
        this.pending ??= { grain, buf: Buffer.alloc(GRAIN_BYTES) };
        piece.copy(this.pending.buf, inGrain);
      }
      pos += n;
    }
  }

  /**
   * Whole grains the pipeline deflated (zlib format, as compressGrain does) on worker threads;
   * framed and emitted exactly as write() would, so the file is byte-for-byte the same. Anything
   * else (a short last grain, a grain being gathered) takes write()'s path.
   */
  async writeCompressed(units: CompressedUnit[]): Promise<void> {
    try {
      this.batch = [];
      let start = this.pos;
      for (const u of units) {
        const grain = Math.floor(u.offset / GRAIN_BYTES);
        if (u.offset % GRAIN_BYTES !== 0 || u.raw.length !== GRAIN_BYTES || this.pending?.grain === grain) {
          await this.writeBatch(start);
          this.batch = null;
          await this.write(u.offset, u.raw);
          this.batch = [];
          start = this.pos;
          continue;
        }
        this.refuseBackwards(u.offset);
        if (u.offset + GRAIN_BYTES > this.virtualSize)
          throw new VmferryError(`write beyond the virtual size ${this.virtualSize}`, this.sink.name);
        if (this.pending) await this.flushPending();
        await this.emitEncoded(grain, encodeGrain(grain * GRAIN_SECTORS, u.packed));
      }
      await this.writeBatch(start);
    } finally {
      this.batch = null;
    }
  }

  /** Writes what was batched since `start` in one call. */
  private async writeBatch(start: number): Promise<void> {
    const b = this.batch;
    if (!b || b.length === 0) return;
    this.batch = [];
    await this.sink.write(b.length === 1 ? b[0]! : Buffer.concat(b), start);
  }

  async zero(offset: number, length: number): Promise<void> {
    const p = this.pending;
    if (!p) return;
    const gs = p.grain * GRAIN_BYTES;
    const a = Math.max(offset, gs);
    const b = Math.min(offset + length, gs + GRAIN_BYTES);
    if (a < b) p.buf.fill(0, a - gs, b - gs);
  }

  async finish(): Promise<void> {
    await this.flushPending();
    await this.finishTable();
    await this.emit(encodeMetaMarker(this.gd.length / SECTOR, MARKER_GD));
    const gdSector = this.pos / SECTOR;
    await this.emit(this.gd);
    await this.emit(encodeMetaMarker(1, MARKER_FOOTER));
    await this.emit(encodeSparseHeader({ ...this.header, gdOffset: gdSector }));
    await this.emit(Buffer.alloc(SECTOR)); // end-of-stream marker
    await this.sink.commit();
  }

  async abort(): Promise<void> {
    await this.sink.abort();
  }
}

/** Non-zero entries as [index, value] pairs (tables are mostly empty while being written). */
function nonZero(a: Uint32Array): [number, number][] {
  const out: [number, number][] = [];
  for (let i = 0; i < a.length; i++) if (a[i] !== 0) out.push([i, a[i]!]);
  return out;
}

function parseNonZero(v: unknown, size: number, below: number, bad: (why: string) => Error): Map<number, number> {
  if (!Array.isArray(v)) throw bad('malformed');
  const out = new Map<number, number>();
  for (const pair of v) {
    if (!Array.isArray(pair) || pair.length !== 2 || !Number.isSafeInteger(pair[0]) || !Number.isSafeInteger(pair[1]))
      throw bad('malformed entry');
    const [i, x] = pair as [number, number];
    if (i < 0 || i >= size || out.has(i) || x < 1 || x >= below) throw bad('a table entry');
    out.set(i, x);
  }
  return out;
}

/**
 * Continues a checkpointed monolithicSparse or streamOptimized output (the multi-file subformats
 * cannot be checkpointed); the file is cut back to its checkpointed length.
 */
export async function resumeVmdk(path: string, virtualSize: number, options: CreateOptions, state: unknown): Promise<DiskWriter> {
  const settings = parseCreateOptions(options);
  if (!Number.isSafeInteger(virtualSize) || virtualSize < 0) throw new UsageError(`Invalid image size ${virtualSize}`);
  const size = Math.ceil(virtualSize / SECTOR) * SECTOR;
  const sub = settings.subformat;
  if (sub !== 'monolithicSparse' && sub !== 'streamOptimized') {
    throw new UsageError(`vmdk subformat ${sub} (several files) cannot be resumed`, path);
  }
  const s = unseal(state, 'vmdk', path);
  const bad = (why: string) => new UsageError(`the vmdk checkpoint state does not fit this output (${why})`, path);
  if (s.format !== 'vmdk' || s.subformat !== sub || s.size !== size) throw bad('subformat or size');
  if (sub === 'streamOptimized') {
    const c = StreamOptimizedWriter.check(s, size, bad);
    return StreamOptimizedWriter.resumed(adoptMarked(path, s, 0, 'vmdk'), size, settings, basename(path), c);
  }
  if (size > 2 ** 32 * SECTOR) throw new UsageError('a monolithicSparse vmdk holds at most 2 TiB', path);
  const extentLength = Math.max(size, SECTOR);
  const floor = sparseLayout(Math.ceil(extentLength / SECTOR)).grainOffset * SECTOR;
  // The checks that only read come first: a refused state leaves the file as it was.
  verifyMarked(path, s, floor, 'vmdk');
  const scanned = SparseExtentWriter.scan(extentLength, s, bad);
  const sink = adoptMarked(path, s, floor, 'vmdk');
  const extent = await SparseExtentWriter.resumed(sink, extentLength, settings.zeroedGrain, scanned);
  return new MultiExtentWriter(path, size, settings, sink, extent);
}

export async function createVmdk(path: string, virtualSize: number, options: CreateOptions): Promise<DiskWriter> {
  const settings = parseCreateOptions(options);
  if (!Number.isSafeInteger(virtualSize) || virtualSize < 0) throw new UsageError(`Invalid image size ${virtualSize}`);
  const size = Math.ceil(virtualSize / SECTOR) * SECTOR;
  if (settings.subformat === 'streamOptimized') {
    const sink = openSink(path);
    const w = new StreamOptimizedWriter(sink, size, settings, path === '-' ? 'disk.vmdk' : basename(path));
    try {
      await w.start();
    } catch (err) {
      await sink.abort();
      throw err;
    }
    return w;
  }
  if (path === '-')
    throw new UsageError(`vmdk subformat ${settings.subformat} cannot be written to a pipe; use subformat=streamOptimized`);
  if (settings.subformat === 'monolithicSparse') {
    const sink = openSink(path);
    if (!(sink instanceof AtomicFileSink)) {
      await sink.abort();
      throw new UsageError(
        'vmdk subformat monolithicSparse needs a seekable file; use subformat=streamOptimized for a pipe',
        path,
      );
    }
    if (size > 2 ** 32 * SECTOR)
      throw new UsageError('a monolithicSparse vmdk holds at most 2 TiB; use twoGbMaxExtentSparse', path);
    return new MultiExtentWriter(path, size, settings, sink);
  }
  return new MultiExtentWriter(path, size, settings, null);
}
