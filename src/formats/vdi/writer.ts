import { adoptMarked, markFile, seal, unseal } from '../../disk/checkpoint.js';
import { UnsupportedFeatureError, UsageError, VmferryError } from '../../disk/errors.js';
import { checkKnownOptions, parseBoolOption } from '../../disk/options.js';
import { firstOtherThan } from '../../disk/scan.js';
import { type ByteSink, openSink } from '../../disk/sink.js';
import type { CreateOptions, DiskWriter } from '../../disk/types.js';
import {
  BLOCK_FREE,
  DATA_ALIGN,
  DEFAULT_BLOCK_SIZE,
  encodeHeader,
  HEADER_AREA,
  MAX_BLOCKS,
  newUuid,
  VDI_CREATE_OPTIONS,
  VDI_TYPE_FIXED,
  VDI_TYPE_NORMAL,
} from './layout.js';

const PAGE_ENTRIES = 16384;
const LITTLE_ENDIAN_HOST = new Uint8Array(Uint32Array.of(1).buffer)[0] === 1;
const BS = DEFAULT_BLOCK_SIZE;

/** Runs of guest blocks [first, count] in the order they were given file slots 0, 1, 2, ... */
type BlockRuns = [number, number][];

function parseOptions(o: Record<string, string>): { isStatic: boolean; preallocateFull: boolean } {
  checkKnownOptions('vdi', o, VDI_CREATE_OPTIONS);
  const isStatic = parseBoolOption(o.static, 'static', false);
  const prealloc = o.preallocation ?? 'off';
  if (!['off', 'metadata', 'falloc', 'full'].includes(prealloc)) {
    throw new UsageError(`Invalid preallocation mode '${prealloc}' for vdi (use off, metadata, falloc or full)`);
  }
  if (prealloc !== 'off' && prealloc !== 'metadata' && !isStatic) {
    throw new UsageError(`preallocation=${prealloc} needs static=on for vdi`);
  }
  return { isStatic, preallocateFull: prealloc === 'full' };
}

/**
 * Writes a VDI 1.1 with 1 MiB blocks. Static: every block in order, header and map written
 * first (so a pipe works). Dynamic: blocks appended as data arrives; the block map is kept in
 * pages allocated on first use, so a sparse multi-TiB image costs a few pages of memory.
 */
export class VdiWriter implements DiskWriter {
  readonly clusterSize = BS;
  readonly sequentialOnly: boolean;
  readonly blocks: number;
  private readonly pages = new Map<number, Uint32Array>();
  private allocated = 0;
  /** Allocation order, for checkpoints: one run per stretch of consecutive blocks. */
  private readonly order: BlockRuns = [];
  private readonly offData: number;
  private readonly uuidCreate = newUuid();
  private readonly uuidModify = newUuid();

  private constructor(
    private readonly sink: ByteSink,
    readonly virtualSize: number,
    private readonly isStatic: boolean,
    private readonly preallocateFull: boolean,
  ) {
    this.sequentialOnly = sink.sequential;
    this.blocks = Math.ceil(virtualSize / BS);
    this.offData = Math.ceil((HEADER_AREA + this.blocks * 4) / DATA_ALIGN) * DATA_ALIGN;
  }

  static async create(path: string, virtualSize: number, options: CreateOptions): Promise<VdiWriter> {
    const { isStatic, preallocateFull } = parseOptions(options.options);
    if (!Number.isSafeInteger(virtualSize) || virtualSize < 0 || Math.ceil(virtualSize / BS) > MAX_BLOCKS) {
      throw new UsageError(`Unsupported VDI image size ${virtualSize} (at most ${MAX_BLOCKS} blocks of 1 MiB)`);
    }
    if (virtualSize % 512 !== 0) {
      throw new UsageError(`a VDI's size must be a multiple of 512 bytes (${virtualSize} requested)`);
    }
    const sink = openSink(path);
    if (sink.sequential && !isStatic) {
      await sink.abort();
      throw new UnsupportedFeatureError(
        'a dynamic VDI cannot be streamed to a pipe (its block map precedes the data); use -o static=on',
        path,
      );
    }
    const writer = new VdiWriter(sink, virtualSize, isStatic, preallocateFull);
    if (isStatic) {
      try {
        await writer.writeMetadata();
      } catch (err) {
        await sink.abort();
        throw err;
      }
    }
    return writer;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new VmferryError(
        `write of ${length} bytes at ${offset} is outside the virtual size ${this.virtualSize}`,
        this.sink.name,
      );
    }
  }

  private entry(block: number): number {
    if (this.isStatic) return block;
    const page = this.pages.get(Math.floor(block / PAGE_ENTRIES));
    return page ? page[block % PAGE_ENTRIES]! : BLOCK_FREE;
  }

  private allocate(block: number): number {
    const p = Math.floor(block / PAGE_ENTRIES);
    let page = this.pages.get(p);
    if (!page) {
      page = new Uint32Array(PAGE_ENTRIES).fill(BLOCK_FREE);
      this.pages.set(p, page);
    }
    const index = this.allocated++;
    page[block % PAGE_ENTRIES] = index;
    const last = this.order.at(-1);
    if (last && last[0] + last[1] === block) last[1]++;
    else this.order.push([block, 1]);
    return index;
  }

  /**
   * Flushes the data written so far; the state is the block map as runs (the header and map are
   * only written at finish, so nothing in the file needs rewriting on resume).
   */
  async checkpoint(): Promise<unknown> {
    const mark = await markFile(this.sink, this.offData, 'vdi');
    return seal({ format: 'vdi', blocks: this.blocks, allocated: this.allocated, order: this.order, ...mark });
  }

  /** Continues a checkpointed output: the file is cut back to its checkpointed length. */
  static async resume(path: string, virtualSize: number, options: CreateOptions, state: unknown): Promise<VdiWriter> {
    const { isStatic, preallocateFull } = parseOptions(options.options);
    const s = unseal(state, 'vdi', path);
    const bad = (why: string) => new UsageError(`the vdi checkpoint state does not fit this output (${why})`, path);
    if (
      !Number.isSafeInteger(virtualSize) ||
      virtualSize < 0 ||
      virtualSize % 512 !== 0 ||
      Math.ceil(virtualSize / BS) > MAX_BLOCKS
    )
      throw new UsageError(`Unsupported VDI image size ${virtualSize}`, path);
    const blocks = Math.ceil(virtualSize / BS);
    if (s.format !== 'vdi' || s.blocks !== blocks) throw bad('format or size');
    if (!Number.isSafeInteger(s.allocated) || !Array.isArray(s.order)) throw bad('malformed');
    const offData = Math.ceil((HEADER_AREA + blocks * 4) / DATA_ALIGN) * DATA_ALIGN;
    // Validate the whole map before touching the file: a refused state leaves the file as it was.
    const pages = new Map<number, Uint32Array>();
    const order: BlockRuns = [];
    let index = 0;
    for (const run of s.order as unknown[]) {
      if (!Array.isArray(run) || run.length !== 2) throw bad('malformed run');
      const [first, count] = run as [unknown, unknown];
      if (!Number.isSafeInteger(first) || !Number.isSafeInteger(count)) throw bad('malformed run');
      const f = first as number;
      const c = count as number;
      if (f < 0 || c < 1 || f + c > blocks) throw bad('block outside the disk');
      for (let b = f; b < f + c; b++) {
        const p = Math.floor(b / PAGE_ENTRIES);
        let page = pages.get(p);
        if (!page) {
          page = new Uint32Array(PAGE_ENTRIES).fill(BLOCK_FREE);
          pages.set(p, page);
        }
        if (page[b % PAGE_ENTRIES] !== BLOCK_FREE) throw bad('a block allocated twice');
        page[b % PAGE_ENTRIES] = index++;
      }
      order.push([f, c]);
    }
    if (index !== s.allocated || (isStatic && index !== 0)) throw bad('allocation count');
    const limit = offData + (isStatic ? virtualSize : index * BS);
    if (!Number.isSafeInteger(s.length) || (s.length as number) > limit) throw bad('length past the written blocks');
    const sink = adoptMarked(path, s, offData, 'vdi');
    const w = new VdiWriter(sink, virtualSize, isStatic, preallocateFull);
    for (const [p, page] of pages) w.pages.set(p, page);
    w.order.push(...order);
    w.allocated = index;
    return w;
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkRange(offset, data.length);
    if (this.isStatic) {
      await this.sink.write(data, this.offData + offset);
      return;
    }
    // Pieces that land next to each other in the file go out as one write.
    let runStart = -1;
    let runPos = 0;
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const block = Math.floor(pos / BS);
      const inBlock = pos - block * BS;
      const n = Math.min(data.length - done, BS - inBlock);
      let index = this.entry(block);
      if (index === BLOCK_FREE) index = this.allocate(block);
      const filePos = this.offData + index * BS + inBlock;
      if (runStart >= 0 && runPos + (done - runStart) !== filePos) {
        await this.sink.write(data.subarray(runStart, done), runPos);
        runStart = -1;
      }
      if (runStart < 0) {
        runStart = done;
        runPos = filePos;
      }
      done += n;
    }
    if (runStart >= 0) await this.sink.write(data.subarray(runStart), runPos);
  }

  async zero(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    if (this.isStatic) {
      if (this.preallocateFull) await this.writeZeros(offset, length);
      return;
    }
    // Free blocks read as zeros; only blocks already holding data need explicit zeros.
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const block = Math.floor(pos / BS);
      const p = Math.floor(block / PAGE_ENTRIES);
      const page = this.pages.get(p);
      // Free blocks are skipped in a tight scan of the map (a sparse terabyte is a million blocks).
      const stop = Math.min((p + 1) * PAGE_ENTRIES, Math.ceil(end / BS));
      const next = page
        ? p * PAGE_ENTRIES + firstOtherThan(page, BLOCK_FREE, block - p * PAGE_ENTRIES, stop - p * PAGE_ENTRIES)
        : stop;
      if (next > block) {
        pos = Math.min(end, next * BS);
        continue;
      }
      const n = Math.min(end - pos, (block + 1) * BS - pos);
      const index = this.entry(block);
      if (index !== BLOCK_FREE) {
        // A block is allocated at the end of the file: past the furthest write it reads as zeros already.
        const filePos = this.offData + index * BS + (pos - block * BS);
        const written = Math.min(n, this.sink.untouchedFrom - filePos);
        if (written > 0) await this.writeZeros(pos, written);
      }
      pos += n;
    }
  }

  private async writeZeros(offset: number, length: number): Promise<void> {
    const zeros = Buffer.alloc(Math.min(length, BS));
    for (let p = offset; p < offset + length; p += zeros.length) {
      await this.write(p, zeros.subarray(0, Math.min(zeros.length, offset + length - p)));
    }
  }

  private async writeMetadata(): Promise<void> {
    const header = encodeHeader({
      imageType: this.isStatic ? VDI_TYPE_FIXED : VDI_TYPE_NORMAL,
      flags: 0,
      comment: '',
      offBlocks: HEADER_AREA,
      offData: this.offData,
      cylinders: 0,
      heads: 0,
      sectors: 0,
      sectorSize: 512,
      diskSize: this.virtualSize,
      blockSize: BS,
      blockExtra: 0,
      blocks: this.blocks,
      blocksAllocated: this.isStatic ? this.blocks : this.allocated,
      uuidCreate: this.uuidCreate,
      uuidModify: this.uuidModify,
      uuidLinkage: Buffer.alloc(16),
      uuidParentModify: Buffer.alloc(16),
    });
    await this.sink.write(header, 0);
    const free = Buffer.alloc(PAGE_ENTRIES * 4, 0xff);
    const buf = Buffer.allocUnsafe(PAGE_ENTRIES * 4);
    for (let first = 0; first < this.blocks; first += PAGE_ENTRIES) {
      const count = Math.min(PAGE_ENTRIES, this.blocks - first);
      const page = this.pages.get(first / PAGE_ENTRIES);
      let out: Buffer;
      if (this.isStatic) {
        for (let i = 0; i < count; i++) buf.writeUInt32LE(first + i, i * 4);
        out = buf;
      } else if (page && LITTLE_ENDIAN_HOST) {
        // The page's own bytes are the on-disk little-endian entries (a million entries per TiB).
        out = Buffer.from(page.buffer, page.byteOffset, page.byteLength);
      } else if (page) {
        for (let i = 0; i < count; i++) buf.writeUInt32LE(page[i]!, i * 4);
        out = buf;
      } else out = free;
      await this.sink.write(out.subarray(0, count * 4), HEADER_AREA + first * 4);
    }
  }

  async finish(): Promise<void> {
    try {
      if (!this.isStatic) await this.writeMetadata();
      // The header area up to the data, then the data (static: all blocks; dynamic: the used ones).
      const dataBlocks = this.isStatic ? this.blocks : this.allocated;
      await this.sink.setLength(this.offData + dataBlocks * BS);
      await this.sink.commit();
    } catch (err) {
      await this.abort();
      throw err;
    }
  }

  async abort(): Promise<void> {
    await this.sink.abort();
  }
}
