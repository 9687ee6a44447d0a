import { flatExtents } from '../../disk/chain.js';
import { adoptMarked, markFile, seal, unseal } from '../../disk/checkpoint.js';
import { UnsupportedFeatureError, UsageError } from '../../disk/errors.js';
import { checkKnownOptions, parseBoolOption, parseSize } from '../../disk/options.js';
import { type ByteSink, openSink } from '../../disk/sink.js';
import type { CreateOptions, DiskReader, DiskWriter, MeasureResult } from '../../disk/types.js';
import {
  encodeBatEntry,
  encodeFileIdentifier,
  encodeHeader,
  encodeMetadataRegion,
  encodeRegionTable,
  type Geometry,
  GUID,
  geometry,
  HEADER_OFFSETS,
  HEADER_SECTION_SIZE,
  MAX_BLOCK_SIZE,
  MAX_VIRTUAL_SIZE,
  MiB,
  PAYLOAD,
  payloadIndex,
  REGION_TABLE_OFFSETS,
  randomGuid,
  VHDX_CREATE_OPTIONS,
  writeGuid,
  ZERO_GUID,
} from './layout.js';

const GiB = 1024 * MiB;
const TiB = 1024 * GiB;

export interface VhdxPlan {
  virtualSize: number;
  fixed: boolean;
  blockStateZero: boolean;
  logSize: number;
  geometry: Geometry;
  batOffset: number;
  batLength: number;
  metadataOffset: number;
  metadataLength: number;
  /** Where payload blocks start. */
  dataOffset: number;
}

const roundUp = (n: number, m: number) => Math.ceil(n / m) * m;

/** qemu's choice when block_size is not given: bigger disks get bigger blocks. */
export function defaultBlockSize(virtualSize: number): number {
  if (virtualSize > 32 * TiB) return 64 * MiB;
  if (virtualSize > 100 * GiB) return 32 * MiB;
  if (virtualSize > GiB) return 16 * MiB;
  return 8 * MiB;
}

/** Validates -o options and lays the file out: header section, log, BAT, metadata, data. */
export function planVhdx(requestedSize: number, opts: Record<string, string>): VhdxPlan {
  checkKnownOptions('vhdx', opts, VHDX_CREATE_OPTIONS);
  const subformat = opts.subformat ?? 'dynamic';
  if (subformat !== 'dynamic' && subformat !== 'fixed') {
    throw new UsageError(`Invalid subformat '${subformat}' for vhdx (use dynamic or fixed)`);
  }
  const lssText = opts.logical_sector_size ?? '512';
  if (lssText !== '512' && lssText !== '4096') throw new UsageError(`Invalid logical_sector_size '${lssText}' (use 512 or 4096)`);
  const lss = Number(lssText);
  const virtualSize = roundUp(requestedSize, lss);
  if (virtualSize <= 0) throw new UsageError('Image size must be greater than zero for vhdx');
  if (virtualSize > MAX_VIRTUAL_SIZE) throw new UsageError('Image size too large; max of 64TB for vhdx');
  const logSize = roundUp(opts.log_size === undefined ? MiB : parseSize(opts.log_size, 'log_size'), MiB);
  if (logSize < MiB || logSize > 0xffffffff) throw new UsageError('Log size must be at least 1 MB and smaller than 4 GB');
  let blockSize = opts.block_size === undefined ? 0 : roundUp(parseSize(opts.block_size, 'block_size'), MiB);
  if (blockSize === 0) blockSize = defaultBlockSize(virtualSize);
  if (blockSize > MAX_BLOCK_SIZE) blockSize = MAX_BLOCK_SIZE;
  if ((blockSize & (blockSize - 1)) !== 0) throw new UsageError(`Block size ${blockSize} must be a power of two`);
  const blockStateZero = parseBoolOption(opts.block_state_zero, 'block_state_zero', true);
  const g = geometry(virtualSize, blockSize, lss, false);
  const batOffset = roundUp(HEADER_SECTION_SIZE + logSize, MiB);
  const batLength = roundUp(g.batEntries * 8, MiB);
  if (batLength > 0xffffffff) throw new UsageError('The BAT would exceed 4 GB; use a larger block_size');
  const metadataOffset = batOffset + batLength;
  const metadataLength = MiB;
  return {
    virtualSize,
    fixed: subformat === 'fixed',
    blockStateZero,
    logSize,
    geometry: g,
    batOffset,
    batLength,
    metadataOffset,
    metadataLength,
    dataOffset: metadataOffset + metadataLength,
  };
}

/** Everything before the log: identifier, two headers, two region tables (1 MiB). */
function encodeHeaderSection(plan: VhdxPlan, dataWriteGuid: string): Buffer {
  const buf = Buffer.alloc(HEADER_SECTION_SIZE);
  encodeFileIdentifier('vmferry').copy(buf, 0);
  const fileWriteGuid = randomGuid();
  HEADER_OFFSETS.forEach((off, i) => {
    encodeHeader({
      sequence: BigInt(i + 1),
      fileWriteGuid,
      dataWriteGuid,
      logGuid: ZERO_GUID,
      logVersion: 0,
      version: 1,
      logLength: plan.logSize,
      logOffset: HEADER_SECTION_SIZE,
    }).copy(buf, off);
  });
  const table = encodeRegionTable([
    { guid: GUID.batRegion, fileOffset: plan.batOffset, length: plan.batLength, required: true },
    { guid: GUID.metadataRegion, fileOffset: plan.metadataOffset, length: plan.metadataLength, required: true },
  ]);
  for (const off of REGION_TABLE_OFFSETS) table.copy(buf, off);
  return buf;
}

function encodeMetadata(plan: VhdxPlan): Buffer {
  const g = plan.geometry;
  const u32 = (v: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32LE(v, 0);
    return b;
  };
  const params = Buffer.alloc(8);
  params.writeUInt32LE(g.blockSize, 0);
  params.writeUInt32LE(plan.fixed ? 1 : 0, 4);
  const size = Buffer.alloc(8);
  size.writeBigUInt64LE(BigInt(plan.virtualSize), 0);
  const page83 = Buffer.alloc(16);
  writeGuid(page83, 0, randomGuid());
  return encodeMetadataRegion([
    { guid: GUID.fileParameters, data: params, isVirtualDisk: false, isRequired: true },
    { guid: GUID.virtualDiskSize, data: size, isVirtualDisk: true, isRequired: true },
    { guid: GUID.page83, data: page83, isVirtualDisk: true, isRequired: true },
    { guid: GUID.logicalSectorSize, data: u32(g.logicalSectorSize), isVirtualDisk: true, isRequired: true },
    { guid: GUID.physicalSectorSize, data: u32(g.logicalSectorSize), isVirtualDisk: true, isRequired: true },
  ]);
}

export interface VhdxWriterExtras {
  /** The data-write GUID to store (tests build parents whose GUID a child expects). */
  dataWriteGuid?: string;
}

/**
 * Writes fixed and dynamic VHDX. Dynamic: payload blocks are appended in the order they are
 * first written and the BAT is written at finish (memory: one map entry per allocated block).
 * Fixed: every block is stored in order after the metadata, the BAT is known up front, so a
 * fixed image can also stream to a pipe.
 */
export class VhdxWriter implements DiskWriter {
  readonly sequentialOnly: boolean;
  /** Zero detection granularity: unwritten parts of a block stay holes in the file. */
  readonly clusterSize: number;
  readonly virtualSize: number;
  private readonly allocated = new Map<number, number>();
  /** Allocation order, for checkpoints: runs [first block, count] of consecutive blocks. */
  private readonly order: [number, number][] = [];
  private nextFree: number;
  /** Guest bytes below this may hold written data (zero() above it is free). */
  private highWater = 0;

  private constructor(
    private readonly sink: ByteSink,
    readonly plan: VhdxPlan,
  ) {
    this.sequentialOnly = sink.sequential;
    this.virtualSize = plan.virtualSize;
    this.clusterSize = Math.min(MiB, plan.geometry.blockSize);
    this.nextFree = plan.dataOffset;
  }

  static async create(
    path: string,
    virtualSize: number,
    options: CreateOptions,
    extras: VhdxWriterExtras = {},
  ): Promise<VhdxWriter> {
    const plan = planVhdx(virtualSize, options.options);
    if (options.compress) throw new UnsupportedFeatureError('vhdx has no compression (-c)', path);
    const sink = openSink(path);
    if (sink.sequential && !plan.fixed) {
      await sink.abort();
      throw new UnsupportedFeatureError(
        'a dynamic vhdx cannot be streamed to a pipe (its BAT comes first); use subformat=fixed',
        path,
      );
    }
    const writer = new VhdxWriter(sink, plan);
    try {
      await sink.write(encodeHeaderSection(plan, extras.dataWriteGuid ?? randomGuid()), 0);
      if (plan.fixed) await writer.writeBat();
      await sink.write(encodeMetadata(plan), plan.metadataOffset);
    } catch (err) {
      await sink.abort();
      throw err;
    }
    return writer;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new UsageError(`write of ${length} bytes at ${offset} is outside the virtual size ${this.virtualSize}`);
    }
  }

  /** File position of guest `offset`, allocating its block when `allocate`. */
  private locate(block: number, allocate: boolean): number | undefined {
    const bs = this.plan.geometry.blockSize;
    if (this.plan.fixed) return this.plan.dataOffset + block * bs;
    let pos = this.allocated.get(block);
    if (pos === undefined && allocate) {
      pos = this.nextFree;
      this.allocated.set(block, pos);
      this.nextFree += bs;
      const last = this.order.at(-1);
      if (last && last[0] + last[1] === block) last[1]++;
      else this.order.push([block, 1]);
    }
    return pos;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkRange(offset, data.length);
    const bs = this.plan.geometry.blockSize;
    // Pieces per block, merged where they are contiguous in the file too.
    let runFile = -1;
    let runStart = 0;
    let runLen = 0;
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const block = Math.floor(pos / bs);
      const n = Math.min(data.length - done, (block + 1) * bs - pos);
      const filePos = this.locate(block, true)! + (pos - block * bs);
      if (runLen > 0 && runFile + runLen === filePos) runLen += n;
      else {
        if (runLen > 0) await this.sink.write(data.subarray(runStart, runStart + runLen), runFile);
        runFile = filePos;
        runStart = done;
        runLen = n;
      }
      done += n;
    }
    if (runLen > 0) await this.sink.write(data.subarray(runStart, runStart + runLen), runFile);
    this.highWater = Math.max(this.highWater, offset + data.length);
  }

  async zero(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    // A new image reads as zeros everywhere nothing was written; only earlier writes need undoing.
    const end = Math.min(offset + length, this.highWater);
    if (end <= offset) return;
    const bs = this.plan.geometry.blockSize;
    const zeros = Buffer.alloc(Math.min(MiB, end - offset));
    for (let pos = offset; pos < end; ) {
      const block = Math.floor(pos / bs);
      const blockEnd = Math.min(end, (block + 1) * bs);
      const base = this.locate(block, false);
      if (base !== undefined) {
        for (let p = pos; p < blockEnd; p += zeros.length) {
          const n = Math.min(zeros.length, blockEnd - p);
          await this.sink.write(zeros.subarray(0, n), base + (p - block * bs));
        }
      }
      pos = blockEnd;
    }
  }

  /**
   * Flushes the data written so far. The header section and metadata were written at create and
   * the BAT of a dynamic image is only written at finish, so the state is the allocation runs.
   */
  async checkpoint(): Promise<unknown> {
    const mark = await markFile(this.sink, this.plan.dataOffset, 'vhdx');
    const { virtualSize, fixed, geometry } = this.plan;
    return seal({
      format: 'vhdx',
      virtualSize,
      fixed,
      blockSize: geometry.blockSize,
      highWater: this.highWater,
      order: this.order,
      ...mark,
    });
  }

  /** Continues a checkpointed output: the file is cut back to its checkpointed length. */
  static async resume(path: string, virtualSize: number, options: CreateOptions, state: unknown): Promise<VhdxWriter> {
    const plan = planVhdx(virtualSize, options.options);
    if (options.compress) throw new UnsupportedFeatureError('vhdx has no compression (-c)', path);
    const s = unseal(state, 'vhdx', path);
    const bad = (why: string) => new UsageError(`the vhdx checkpoint state does not fit this output (${why})`, path);
    const bs = plan.geometry.blockSize;
    if (s.format !== 'vhdx' || s.virtualSize !== plan.virtualSize || s.fixed !== plan.fixed || s.blockSize !== bs) {
      throw bad('subformat, size or block size');
    }
    const hw = s.highWater;
    if (!Number.isSafeInteger(hw) || (hw as number) < 0 || (hw as number) > plan.virtualSize) throw bad('high-water mark');
    if (!Array.isArray(s.order) || (plan.fixed && s.order.length > 0)) throw bad('malformed');
    // Checked in full before the file is touched: a refused state leaves it as it was.
    const allocated = new Map<number, number>();
    let next = plan.dataOffset;
    for (const run of s.order as unknown[]) {
      if (!Array.isArray(run) || run.length !== 2 || !Number.isSafeInteger(run[0]) || !Number.isSafeInteger(run[1])) {
        throw bad('malformed run');
      }
      const [first, count] = run as [number, number];
      if (first < 0 || count < 1 || first + count > plan.geometry.payloadBlocks) throw bad('block outside the disk');
      for (let b = first; b < first + count; b++) {
        if (allocated.has(b)) throw bad('a block allocated twice');
        allocated.set(b, next);
        next += bs;
      }
    }
    const limit = plan.fixed ? plan.dataOffset + plan.geometry.payloadBlocks * bs : next;
    if (!Number.isSafeInteger(s.length) || (s.length as number) > limit) throw bad('length past the written blocks');
    const w = new VhdxWriter(adoptMarked(path, s, plan.dataOffset, 'vhdx'), plan);
    for (const [b, pos] of allocated) w.allocated.set(b, pos);
    for (const run of s.order as [number, number][]) w.order.push([run[0], run[1]]);
    w.nextFree = next;
    w.highWater = hw as number;
    return w;
  }

  /** Streams the BAT out in 1 MiB pieces (bounded memory whatever the disk size). */
  private async writeBat(): Promise<void> {
    const { geometry: g, batOffset, fixed, dataOffset, blockStateZero } = this.plan;
    const piece = Buffer.alloc(MiB);
    const perPiece = piece.length / 8;
    const emptyState = blockStateZero ? PAYLOAD.ZERO : PAYLOAD.NOT_PRESENT;
    // Sector bitmap entries (non-differencing) stay zero: SB_BLOCK_NOT_PRESENT.
    for (let first = 0; first < g.batEntries; first += perPiece) {
      const count = Math.min(perPiece, g.batEntries - first);
      piece.fill(0);
      for (let block = Math.max(0, Math.floor(first - first / (g.chunkRatio + 1)) - 1); ; block++) {
        const idx = payloadIndex(g, block);
        if (idx < first) continue;
        if (idx >= first + count || block >= g.payloadBlocks) break;
        const at = (idx - first) * 8;
        if (fixed) encodeBatEntry(piece, at, PAYLOAD.FULLY_PRESENT, dataOffset + block * g.blockSize);
        else {
          const pos = this.allocated.get(block);
          if (pos !== undefined) encodeBatEntry(piece, at, PAYLOAD.FULLY_PRESENT, pos);
          else encodeBatEntry(piece, at, emptyState, 0);
        }
      }
      await this.sink.write(piece.subarray(0, count * 8), batOffset + first * 8);
    }
  }

  async finish(): Promise<void> {
    const { fixed, dataOffset, geometry: g } = this.plan;
    try {
      if (!fixed) await this.writeBat();
      const end = fixed ? dataOffset + g.payloadBlocks * g.blockSize : this.nextFree;
      await this.sink.setLength(end);
      await this.sink.commit();
    } catch (err) {
      await this.sink.abort();
      throw err;
    }
  }

  async abort(): Promise<void> {
    await this.sink.abort();
  }
}

/** Bytes a conversion of `source` needs: fixed overhead plus every block that holds data. */
export async function measureVhdx(source: DiskReader, virtualSize: number, options: CreateOptions): Promise<MeasureResult> {
  const plan = planVhdx(virtualSize, options.options);
  const g = plan.geometry;
  const fullyAllocated = plan.dataOffset + g.payloadBlocks * g.blockSize;
  if (plan.fixed) return { required: fullyAllocated, fullyAllocated };
  let blocks = 0;
  let lastBlock = -1;
  for await (const e of flatExtents(source, 0, Math.min(source.virtualSize, plan.virtualSize))) {
    if (e.kind !== 'data') continue;
    const first = Math.max(Math.floor(e.offset / g.blockSize), lastBlock + 1);
    const last = Math.floor((e.offset + e.length - 1) / g.blockSize);
    if (last >= first) blocks += last - first + 1;
    lastBlock = Math.max(lastBlock, last);
  }
  return { required: plan.dataOffset + blocks * g.blockSize, fullyAllocated };
}
