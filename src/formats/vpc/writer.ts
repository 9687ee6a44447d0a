import { closeSync, openSync, readSync, statSync } from 'node:fs';
import { basename, resolve } from 'node:path';
import { adoptMarked, markFile, seal, unseal } from '../../disk/checkpoint.js';
import { UnsupportedFeatureError, UsageError, VmferryError } from '../../disk/errors.js';
import { checkKnownOptions, parseBoolOption } from '../../disk/options.js';
import { firstOtherThan } from '../../disk/scan.js';
import { AtomicFileSink, type ByteSink, openSink } from '../../disk/sink.js';
import type { CreateOptions, DiskWriter, OpenOptions } from '../../disk/types.js';
import {
  BAT_UNUSED,
  bitmapSize,
  DEFAULT_BLOCK_SIZE,
  DISK_DIFFERENCING,
  DISK_DYNAMIC,
  DISK_FIXED,
  DYN_HEADER_SIZE,
  encodeDynHeader,
  encodeFooter,
  FOOTER_SIZE,
  MAX_VHD_SIZE,
  newImageGeometry,
  newUniqueId,
  type ParentLocator,
  SECTOR,
  type VhdFooter,
  VMFERRY_CREATOR,
  VPC_CREATE_OPTIONS,
  vhdTimestamp,
} from './layout.js';
import { VpcReader } from './reader.js';

const BAT_OFFSET = FOOTER_SIZE + DYN_HEADER_SIZE;
const FULL = Buffer.alloc(0);
/** Stands in for a sink while a resumed writer's tables are checked (never written to). */
class NullSink implements ByteSink {
  readonly sequential = false;
  readonly untouchedFrom = 0;
  constructor(readonly name: string) {}
  async write(): Promise<void> {
    throw new Error('NullSink is never written');
  }
  async setLength(): Promise<void> {}
  async flush(): Promise<void> {}
  async commit(): Promise<void> {}
  async abort(): Promise<void> {}
}

/** Granularity of differencing writes: 8 sectors, one byte of the sector bitmap. */
const GRAIN = 4096;
/** The granularity of VpcWriter.written: 32 units per 2 MiB block. */
const WRITTEN_UNIT = DEFAULT_BLOCK_SIZE / 32;

interface Plan {
  diskType: number;
  size: number;
  cylinders: number;
  heads: number;
  sectorsPerTrack: number;
  preallocateFull: boolean;
  parent?: { reader: VpcReader; path: string };
}

/** The -o options every vpc output shares: subformat, force_size, preallocation (checked together). */
function parseOptions(o: Record<string, string>): { subformat: 'dynamic' | 'fixed'; forceSize: boolean; prealloc: string } {
  checkKnownOptions('vpc', o, VPC_CREATE_OPTIONS);
  const subformat = o.subformat ?? 'dynamic';
  if (subformat !== 'dynamic' && subformat !== 'fixed') {
    throw new UsageError(`Invalid subformat '${subformat}' for vpc (use dynamic or fixed)`);
  }
  const forceSize = parseBoolOption(o.force_size, 'force_size', false);
  const prealloc = o.preallocation ?? 'off';
  if (prealloc !== 'off' && !(prealloc === 'full' && subformat === 'fixed')) {
    throw new UsageError(`Invalid preallocation mode '${prealloc}' for vpc (off, or full with subformat=fixed)`);
  }
  return { subformat, forceSize, prealloc };
}

/**
 * Writes a fixed VHD (data, then the footer) or a dynamic/differencing one (footer copy, header,
 * BAT, locators, then blocks appended as data arrives, each a sector bitmap plus the block).
 * Memory: the BAT (4 bytes per block) plus the bitmaps of partly written differencing blocks.
 */
export class VpcWriter implements DiskWriter {
  readonly clusterSize: number;
  readonly sequentialOnly: boolean;
  readonly virtualSize: number;
  private readonly bat: Uint32Array;
  /**
   * Per allocated block, one bit per 64 KiB that was ever written: a block is allocated past the
   * end of the file, so the rest of it reads as zeros already and zero() need not write there
   * (a 1 MiB piece of data at the start of a block otherwise costs 1 MiB of written zeros).
   */
  private readonly written: Uint32Array;
  private readonly bitmapBytes: number;
  private readonly fullBitmap: Buffer;
  private readonly bitmaps = new Map<number, Buffer>();
  private readonly firstBlockSector: number;
  private nextSector: number;
  private readonly locators: ParentLocator[] = [];
  private readonly locatorData: { offset: number; data: Buffer }[] = [];
  private readBackFd: number | null = null;
  private readonly uniqueId = newUniqueId();
  private readonly timestamp = vhdTimestamp();
  /** Allocation order, for checkpoints: runs [first block, count] of consecutive blocks. */
  private readonly order: [number, number][] = [];

  private constructor(
    private readonly sink: ByteSink,
    private readonly plan: Plan,
  ) {
    this.virtualSize = plan.size;
    this.sequentialOnly = sink.sequential;
    const dynamic = plan.diskType !== DISK_FIXED;
    this.clusterSize = dynamic ? DEFAULT_BLOCK_SIZE : 4096;
    const entries = dynamic ? Math.ceil(plan.size / DEFAULT_BLOCK_SIZE) : 0;
    this.bat = new Uint32Array(entries).fill(BAT_UNUSED);
    this.written = new Uint32Array(entries);
    this.bitmapBytes = bitmapSize(DEFAULT_BLOCK_SIZE);
    this.fullBitmap = Buffer.alloc(this.bitmapBytes, 0xff);
    let next = BAT_OFFSET + Math.ceil((entries * 4) / SECTOR) * SECTOR;
    if (plan.parent) {
      const rel = `.\\${basename(plan.parent.path)}`;
      const abs = resolve(plan.parent.path);
      for (const [code, text] of [
        ['W2ru', rel],
        ['W2ku', abs],
      ] as const) {
        const data = Buffer.from(text, 'utf16le');
        const space = Math.ceil(data.length / SECTOR) * SECTOR;
        this.locators.push({ platformCode: code, dataSpace: space, dataLength: data.length, dataOffset: next });
        this.locatorData.push({ offset: next, data });
        next += space;
      }
    }
    this.firstBlockSector = next / SECTOR;
    this.nextSector = this.firstBlockSector;
  }

  /** -o options of a vpc without a parent: subformat, geometry, preallocation. */
  private static plainPlan(path: string, virtualSize: number, o: Record<string, string>): Plan {
    const { subformat, forceSize, prealloc } = parseOptions(o);
    if (o.backing_fmt !== undefined && o.backing_file === undefined) throw new UsageError('backing_fmt needs backing_file');
    const g = newImageGeometry(virtualSize, forceSize);
    if (g.size > MAX_VHD_SIZE) {
      throw new UsageError(`a VHD holds at most ${MAX_VHD_SIZE} bytes (2040 GiB); ${virtualSize} requested`, path);
    }
    return { diskType: subformat === 'fixed' ? DISK_FIXED : DISK_DYNAMIC, ...g, preallocateFull: prealloc === 'full' };
  }

  static async create(path: string, virtualSize: number, options: CreateOptions): Promise<VpcWriter> {
    const o = options.options;
    const { subformat, forceSize, prealloc } = parseOptions(o);
    let parent: Plan['parent'];
    let size = virtualSize;
    if (o.backing_file !== undefined) {
      if (subformat !== 'dynamic') throw new UsageError('a vpc differencing disk (backing_file) cannot be fixed');
      if (o.backing_fmt !== undefined && o.backing_fmt !== 'vpc' && o.backing_fmt !== 'vhd') {
        throw new UsageError(`the parent of a differencing VHD must be a VHD, not ${o.backing_fmt}`);
      }
      const reader = await VpcReader.open(o.backing_file, { noBacking: true } satisfies OpenOptions);
      if (size !== 0 && size !== reader.virtualSize) {
        await reader.close();
        throw new UsageError(
          `a differencing VHD has its parent's size (${reader.virtualSize} bytes), not ${size}; omit the size`,
        );
      }
      size = reader.virtualSize;
      parent = { reader, path: o.backing_file };
    } else if (o.backing_fmt !== undefined) {
      throw new UsageError('backing_fmt needs backing_file');
    }
    const g = parent
      ? {
          size,
          cylinders: parent.reader.footer.cylinders,
          heads: parent.reader.footer.heads,
          sectorsPerTrack: parent.reader.footer.sectorsPerTrack,
        }
      : newImageGeometry(size, forceSize);
    if (g.size > MAX_VHD_SIZE) {
      await parent?.reader.close();
      throw new UsageError(`a VHD holds at most ${MAX_VHD_SIZE} bytes (2040 GiB); ${size} requested`);
    }
    let sink: ByteSink;
    try {
      sink = openSink(path);
    } catch (err) {
      await parent?.reader.close();
      throw err;
    }
    const diskType = parent ? DISK_DIFFERENCING : subformat === 'fixed' ? DISK_FIXED : DISK_DYNAMIC;
    if (sink.sequential && diskType !== DISK_FIXED) {
      await sink.abort();
      await parent?.reader.close();
      throw new UnsupportedFeatureError(
        'a dynamic VHD cannot be streamed to a pipe (its block table precedes the data); use -o subformat=fixed',
        path,
      );
    }
    return new VpcWriter(sink, { diskType, ...g, preallocateFull: prealloc === 'full', parent });
  }

  private get dynamic(): boolean {
    return this.plan.diskType !== DISK_FIXED;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new VmferryError(
        `write of ${length} bytes at ${offset} is outside the virtual size ${this.virtualSize}`,
        this.sink.name,
      );
    }
  }

  async write(offset: number, data: Buffer): Promise<void> {
    this.checkRange(offset, data.length);
    if (!this.dynamic) {
      await this.sink.write(data, offset);
      return;
    }
    let done = 0;
    while (done < data.length) {
      const pos = offset + done;
      const block = Math.floor(pos / DEFAULT_BLOCK_SIZE);
      const inBlock = pos - block * DEFAULT_BLOCK_SIZE;
      const n = Math.min(data.length - done, DEFAULT_BLOCK_SIZE - inBlock);
      await this.writeInBlock(block, inBlock, data.subarray(done, done + n));
      done += n;
    }
  }

  async zero(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    if (!this.dynamic) {
      if (this.plan.preallocateFull) await this.writeZeros(offset, length, (p, b) => this.sink.write(b, p));
      return;
    }
    const end = offset + length;
    const differencing = this.plan.diskType === DISK_DIFFERENCING;
    let pos = offset;
    while (pos < end) {
      const block = Math.floor(pos / DEFAULT_BLOCK_SIZE);
      if (!differencing && this.bat[block] === BAT_UNUSED) {
        // Unallocated blocks of a dynamic disk read as zeros: a tight scan to the next allocated
        // one (a sparse terabyte is half a million blocks; the general step cost 26 ms).
        const next = firstOtherThan(this.bat, BAT_UNUSED, block + 1, Math.ceil(end / DEFAULT_BLOCK_SIZE));
        pos = Math.min(end, next * DEFAULT_BLOCK_SIZE);
        continue;
      }
      const inBlock = pos - block * DEFAULT_BLOCK_SIZE;
      const n = Math.min(end - pos, DEFAULT_BLOCK_SIZE - inBlock);
      const allocated = this.bat[block] !== BAT_UNUSED;
      if (differencing) {
        // Zeros must hide the parent: allocate and mark the sectors as present.
        // A fresh block reads as zeros already; partial grains go through writeInBlock.
        const fresh = !allocated;
        if (fresh) await this.allocate(block);
        if (fresh && inBlock % GRAIN === 0 && n % GRAIN === 0) this.markSectors(block, inBlock, n);
        else await this.writeZeros(pos, n, (p, b) => this.writeInBlock(block, p - block * DEFAULT_BLOCK_SIZE, b));
      } else if (allocated) {
        // Only over what was written: the rest of an allocated block reads as zeros already, as
        // does the file past the furthest write (the tail of a unit written in part).
        const base = this.blockDataPos(block);
        for (let u = Math.floor(inBlock / WRITTEN_UNIT); u * WRITTEN_UNIT < inBlock + n; u++) {
          if (!((this.written[block]! >>> u) & 1)) continue;
          const from = Math.max(inBlock, u * WRITTEN_UNIT);
          const to = Math.min(inBlock + n, (u + 1) * WRITTEN_UNIT, this.sink.untouchedFrom - base);
          if (to <= from) continue;
          await this.writeZeros(block * DEFAULT_BLOCK_SIZE + from, to - from, (p, b) =>
            this.writeInBlock(block, p - block * DEFAULT_BLOCK_SIZE, b),
          );
        }
      }
      pos += n;
    }
  }

  private async writeZeros(offset: number, length: number, put: (pos: number, buf: Buffer) => Promise<void>): Promise<void> {
    const zeros = Buffer.alloc(Math.min(length, 1 << 20));
    for (let p = offset; p < offset + length; p += zeros.length) {
      await put(p, zeros.subarray(0, Math.min(zeros.length, offset + length - p)));
    }
  }

  private async allocate(block: number): Promise<void> {
    const sector = this.nextSector;
    if (sector > 0xfffffffe) throw new VmferryError('VHD is full (block offsets exceed 32 bits)', this.sink.name);
    this.bat[block] = sector;
    this.nextSector += (this.bitmapBytes + DEFAULT_BLOCK_SIZE) / SECTOR;
    const last = this.order.at(-1);
    if (last && last[0] + last[1] === block) last[1]++;
    else this.order.push([block, 1]);
    // Dynamic disks: every sector of an allocated block is present (as qemu writes them); their
    // bitmaps are written at finish.
    if (this.plan.diskType === DISK_DIFFERENCING) this.bitmaps.set(block, Buffer.alloc(this.bitmapBytes));
  }

  /**
   * Flushes the data written so far. Dynamic: the state is the BAT as allocation runs (BAT,
   * header and footers are only written at finish). Differencing disks are not resumable: their
   * sector bitmaps live in memory until finish.
   */
  async checkpoint(): Promise<unknown> {
    if (this.plan.diskType === DISK_DIFFERENCING) {
      throw new UsageError('a differencing VHD cannot be checkpointed', this.sink.name);
    }
    const floor = this.dynamic ? this.firstBlockSector * SECTOR : 0;
    const mark = await markFile(this.sink, floor, 'vpc');
    return seal({ format: 'vpc', diskType: this.plan.diskType, size: this.virtualSize, order: this.order, ...mark });
  }

  /** Continues a checkpointed dynamic or fixed VHD: the file is cut back to its checkpointed length. */
  static async resume(path: string, virtualSize: number, options: CreateOptions, state: unknown): Promise<VpcWriter> {
    if (options.options.backing_file !== undefined) throw new UsageError('a differencing VHD cannot be resumed', path);
    const plan = VpcWriter.plainPlan(path, virtualSize, options.options);
    const s = unseal(state, 'vpc', path);
    const bad = (why: string) => new UsageError(`the vpc checkpoint state does not fit this output (${why})`, path);
    if (s.format !== 'vpc' || s.diskType !== plan.diskType || s.size !== plan.size) throw bad('subformat or size');
    if (!Array.isArray(s.order)) throw bad('malformed');
    // Built and checked before the file is touched: a refused state leaves it as it was.
    const probe = new VpcWriter(new NullSink(path), plan);
    const stride = (probe.bitmapBytes + DEFAULT_BLOCK_SIZE) / SECTOR;
    for (const run of s.order as unknown[]) {
      if (!Array.isArray(run) || run.length !== 2 || !Number.isSafeInteger(run[0]) || !Number.isSafeInteger(run[1])) {
        throw bad('malformed run');
      }
      const [first, count] = run as [number, number];
      if (first < 0 || count < 1 || first + count > probe.bat.length) throw bad('block outside the disk');
      for (let b = first; b < first + count; b++) {
        if (probe.bat[b] !== BAT_UNUSED) throw bad('a block allocated twice');
        probe.bat[b] = probe.nextSector;
        probe.nextSector += stride;
      }
      probe.order.push([first, count]);
    }
    if (plan.diskType === DISK_FIXED && probe.order.length > 0) throw bad('subformat');
    const limit = plan.diskType === DISK_FIXED ? plan.size : probe.nextSector * SECTOR;
    if (!Number.isSafeInteger(s.length) || (s.length as number) > limit) throw bad('length past the written blocks');
    const floor = plan.diskType === DISK_FIXED ? 0 : probe.firstBlockSector * SECTOR;
    const w = new VpcWriter(adoptMarked(path, s, floor, 'vpc'), plan);
    w.bat.set(probe.bat);
    // What a killed run wrote into its blocks is not known: all of them count as written.
    for (const [first, count] of probe.order) w.written.fill(0xffffffff, first, first + count);
    w.order.push(...probe.order);
    w.nextSector = probe.nextSector;
    return w;
  }

  private blockDataPos(block: number): number {
    return this.bat[block]! * SECTOR + this.bitmapBytes;
  }

  private async writeInBlock(block: number, inBlock: number, data: Buffer): Promise<void> {
    if (this.bat[block] === BAT_UNUSED) await this.allocate(block);
    if (data.length > 0) {
      const last = Math.floor((inBlock + data.length - 1) / WRITTEN_UNIT);
      for (let u = Math.floor(inBlock / WRITTEN_UNIT); u <= last; u++)
        this.written[block] = (this.written[block]! | (1 << u)) >>> 0;
    }
    const base = this.blockDataPos(block);
    if (this.plan.diskType !== DISK_DIFFERENCING || (inBlock % GRAIN === 0 && data.length % GRAIN === 0)) {
      await this.sink.write(data, base + inBlock);
      if (this.plan.diskType === DISK_DIFFERENCING) this.markSectors(block, inBlock, data.length);
      return;
    }
    // A differencing disk is written in whole 4 KiB grains (one bitmap byte): some readers
    // (libvhdi) mishandle a bitmap byte that is partly set. Complete the edge grains from this
    // image or the parent.
    const start = Math.floor(inBlock / GRAIN) * GRAIN;
    const end = Math.ceil((inBlock + data.length) / GRAIN) * GRAIN;
    const whole = Buffer.alloc(end - start);
    for (let s = start; s < end; s += SECTOR) {
      const inside = s >= inBlock && s + SECTOR <= inBlock + data.length;
      if (!inside) await this.fillSector(block, s, whole.subarray(s - start, s - start + SECTOR));
      if (s === start + GRAIN - SECTOR && end - start > 2 * GRAIN) s = end - GRAIN - SECTOR;
    }
    data.copy(whole, inBlock - start);
    await this.sink.write(whole, base + start);
    this.markSectors(block, start, whole.length);
  }

  private async fillSector(block: number, inBlock: number, out: Buffer): Promise<void> {
    const s = inBlock / SECTOR;
    const bm = this.bitmaps.get(block);
    const present = bm === FULL || (bm !== undefined && ((bm[s >> 3]! >> (7 - (s & 7))) & 1) === 1);
    if (present) {
      if (!(this.sink instanceof AtomicFileSink)) throw new VmferryError('cannot read back a sector from a pipe', this.sink.name);
      await this.sink.drain();
      this.readBackFd ??= openSync(this.sink.tempPath, 'r');
      readSync(this.readBackFd, out, 0, SECTOR, this.blockDataPos(block) + inBlock);
      return;
    }
    const guest = block * DEFAULT_BLOCK_SIZE + inBlock;
    const parent = this.plan.parent!.reader;
    const n = Math.max(0, Math.min(SECTOR, parent.virtualSize - guest));
    if (n > 0) await parent.read(guest, n, out.subarray(0, n));
  }

  private markSectors(block: number, inBlock: number, length: number): void {
    const bm = this.bitmaps.get(block);
    if (bm === undefined || bm === FULL) return;
    const first = Math.floor(inBlock / SECTOR);
    const last = Math.ceil((inBlock + length) / SECTOR);
    for (let s = first; s < last; s++) bm[s >> 3] = bm[s >> 3]! | (0x80 >> (s & 7));
    if (bm.every((b) => b === 0xff)) this.bitmaps.set(block, FULL);
  }

  private footer(): VhdFooter {
    return {
      features: 2,
      formatVersion: 0x00010000,
      dataOffset: this.dynamic ? FOOTER_SIZE : null,
      timestamp: this.timestamp,
      creatorApp: VMFERRY_CREATOR,
      creatorVersion: 0x00010000,
      creatorHostOs: 'Wi2k',
      originalSize: this.virtualSize,
      currentSize: this.virtualSize,
      cylinders: this.plan.cylinders,
      heads: this.plan.heads,
      sectorsPerTrack: this.plan.sectorsPerTrack,
      diskType: this.plan.diskType,
      checksum: 0,
      uniqueId: this.uniqueId,
      savedState: 0,
    };
  }

  async finish(): Promise<void> {
    try {
      const footer = encodeFooter(this.footer());
      if (!this.dynamic) {
        await this.sink.setLength(this.virtualSize);
        await this.sink.write(footer, this.virtualSize);
      } else {
        await this.writeMetadata(footer);
      }
      this.closeReadBack();
      await this.sink.commit();
    } catch (err) {
      await this.abort();
      throw err;
    } finally {
      await this.plan.parent?.reader.close();
    }
  }

  private async writeMetadata(footer: Buffer): Promise<void> {
    // The sectors each block holds. A dynamic disk's are all ones, written here rather than as
    // its blocks are allocated: a small write into the file the copies are writing waits for
    // their hold on it, and the copy stalled (os raw -> vpc: 105 bitmaps, 19 to 26 ms of the
    // main thread's time, up to 3 ms for one).
    if (this.plan.diskType === DISK_DIFFERENCING) {
      for (const [block, bm] of this.bitmaps) {
        await this.sink.write(bm === FULL ? this.fullBitmap : bm, this.bat[block]! * SECTOR);
      }
    } else {
      for (const [first, count] of this.order) {
        for (let b = first; b < first + count; b++) await this.sink.write(this.fullBitmap, this.bat[b]! * SECTOR);
      }
    }
    // Unused entries are all ones, as the fill leaves them: only allocated blocks are encoded
    // (a terabyte's table has half a million entries).
    const bat = Buffer.alloc(Math.ceil((this.bat.length * 4) / SECTOR) * SECTOR, 0xff);
    for (const [first, count] of this.order) {
      for (let b = first; b < first + count; b++) bat.writeUInt32BE(this.bat[b]!, b * 4);
    }
    await this.sink.write(bat, BAT_OFFSET);
    for (const l of this.locatorData) await this.sink.write(l.data, l.offset);
    const parent = this.plan.parent;
    let parentTimestamp = 0;
    if (parent) {
      try {
        parentTimestamp = vhdTimestamp(statSync(parent.path).mtimeMs);
      } catch {
        parentTimestamp = 0;
      }
    }
    const header = encodeDynHeader({
      tableOffset: BAT_OFFSET,
      maxTableEntries: this.bat.length,
      blockSize: DEFAULT_BLOCK_SIZE,
      parentUniqueId: parent ? parent.reader.footer.uniqueId : Buffer.alloc(16),
      parentTimestamp,
      parentName: parent ? basename(parent.path) : '',
      locators: this.locators,
    });
    await this.sink.write(header, FOOTER_SIZE);
    await this.sink.write(footer, 0);
    await this.sink.write(footer, this.nextSector * SECTOR);
  }

  private closeReadBack(): void {
    if (this.readBackFd !== null) {
      closeSync(this.readBackFd);
      this.readBackFd = null;
    }
  }

  async abort(): Promise<void> {
    this.closeReadBack();
    await this.sink.abort();
    await this.plan.parent?.reader.close();
  }
}
