import { mergeExtents } from '../../disk/chain.js';
import { VmferryError } from '../../disk/errors.js';
import { nativeHelper } from '../../disk/native.js';
import { FileSource } from '../../disk/source.js';
import type { DiskReader, Extent, FormatDetails } from '../../disk/types.js';

/** A raw image: the file is the disk. Holes (SEEK_HOLE) are reported as zero extents. */
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
    // A file with every block allocated has no holes to look for.
    if (!native || !st.isFile() || st.blocks * 512 >= st.size) {
      yield { offset: from, length: end - from, kind: 'data' };
      return;
    }
    yield* mergeExtents(this.holeMap(native, from, end), from, end);
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
