import { mergeExtents } from '../../disk/chain.js';
import { VmferryError } from '../../disk/errors.js';
import { nativeHelper } from '../../disk/native.js';
import { FileSource } from '../../disk/source.js';
import type { DiskReader, Extent, FormatDetails } from '../../disk/types.js';

/**
 * A raw image: the file is the disk. Holes and unwritten extents (preallocated, such as the journal
 * mkfs.ext4 reserves) are reported as zero extents.
 */
export class RawReader implements DiskReader {
  readonly format = 'raw';
  readonly details: FormatDetails = {};
  readonly virtualSize: number;

  private constructor(
    readonly filename: string,
    private readonly source: FileSource,
  ) {
    this.virtualSize = source.size;
  }

  static async open(path: string): Promise<RawReader> {
    return new RawReader(path, FileSource.open(path));
  }

  async *extents(from = 0, to = this.virtualSize): AsyncGenerator<Extent> {
    const end = Math.min(to, this.virtualSize);
    if (from >= end) return;
    const native = nativeHelper();
    const st = this.source.stats;
    if (!native || !st.isFile()) {
      yield { offset: from, length: end - from, kind: 'data' };
      return;
    }
    // FIEMAP says which extents hold data and which are unwritten (reading as zeros, though once
    // their pages are cached SEEK_DATA calls them data), 256 extents a call. Without it,
    // SEEK_DATA/SEEK_HOLE; a first answer that is empty for a file with blocks is not trusted
    // either (a file system that lists nothing).
    const first = native.allocation(this.source.fd, from, end);
    let mapped: Iterable<Extent>;
    if (first && (first.length > 0 || st.blocks === 0)) mapped = this.allocationMap(native, first, from, end);
    else if (st.blocks * 512 >= st.size) mapped = [{ offset: from, length: end - from, kind: 'data' }];
    else mapped = this.holeMap(native, from, end);
    yield* mergeExtents(mapped, from, end);
  }

  /** Extents of [from, end) from allocation's batches of [start, end, written] triples: holes and unwritten extents are zero. */
  private *allocationMap(
    native: NonNullable<ReturnType<typeof nativeHelper>>,
    first: number[],
    from: number,
    end: number,
  ): Generator<Extent> {
    let pos = from;
    for (let batch: number[] | null = first; batch !== null && batch.length > 0; ) {
      for (let i = 0; i < batch.length; i += 3) {
        const start = batch[i]!;
        const stop = batch[i + 1]!;
        if (start > pos) yield { offset: pos, length: start - pos, kind: 'zero' };
        yield { offset: start, length: stop - start, kind: batch[i + 2] === 1 ? 'data' : 'zero' };
        pos = stop;
      }
      if (pos >= end) return;
      batch = native.allocation(this.source.fd, pos, end);
      // FIEMAP failing half-way: the rest by SEEK_DATA/SEEK_HOLE.
      if (batch === null) {
        yield* this.holeMap(native, pos, end);
        return;
      }
    }
    if (pos < end) yield { offset: pos, length: end - pos, kind: 'zero' };
  }

  private *holeMap(native: NonNullable<ReturnType<typeof nativeHelper>>, from: number, end: number): Generator<Extent> {
    let pos = from;
    while (pos < end) {
      const data = native.seek(this.source.fd, pos, 0);
      if (data < 0 || data >= end) {
        yield { offset: pos, length: end - pos, kind: 'zero' };
        return;
      }
      if (data > pos) yield { offset: pos, length: data - pos, kind: 'zero' };
      let hole = native.seek(this.source.fd, data, 1);
      if (hole < 0 || hole > end) hole = end;
      yield { offset: data, length: hole - data, kind: 'data' };
      pos = hole;
    }
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new VmferryError(
        `read of ${length} bytes at ${offset} is outside the virtual size ${this.virtualSize}`,
        this.filename,
      );
    }
    return this.source.read(offset, length, into);
  }

  async close(): Promise<void> {
    await this.source.close();
  }
}
