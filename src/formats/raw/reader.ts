import { mergeExtents } from '../../disk/chain.js';
import { VmferryError } from '../../disk/errors.js';
import { nativeHelper } from '../../disk/native.js';
import { FileSource } from '../../disk/source.js';
import type { DiskReader, Extent, FormatDetails } from '../../disk/types.js';

/**
 * A raw image: the file is the disk. Holes (SEEK_HOLE) and unwritten extents (preallocated, such
 * as the journal mkfs.ext4 reserves) are reported as zero extents.
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
    // Unwritten extents read as zeros, but once their pages are cached (after any read of them)
    // SEEK_DATA reports them as data: asked for separately, so they are neither read nor copied.
    const unwritten = native.unwritten(this.source.fd, from, end) ?? [];
    // A file with every block allocated has no holes to look for.
    const mapped: Iterable<Extent> =
      st.blocks * 512 >= st.size ? [{ offset: from, length: end - from, kind: 'data' }] : this.holeMap(native, from, end);
    yield* mergeExtents(unwritten.length > 0 ? zeroUnwritten(mapped, unwritten) : mapped, from, end);
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

/** Data extents with the unwritten ranges (ascending [start, end) pairs) inside them made zero. */
function* zeroUnwritten(extents: Iterable<Extent>, unwritten: number[]): Generator<Extent> {
  let k = 0;
  for (const e of extents) {
    if (e.kind !== 'data') {
      yield e;
      continue;
    }
    const end = e.offset + e.length;
    let pos = e.offset;
    while (k < unwritten.length && unwritten[k + 1]! <= pos) k += 2;
    for (let j = k; j < unwritten.length && unwritten[j]! < end; j += 2) {
      const zs = Math.max(pos, unwritten[j]!);
      const ze = Math.min(end, unwritten[j + 1]!);
      if (zs > pos) yield { offset: pos, length: zs - pos, kind: 'data' };
      if (ze > zs) yield { offset: zs, length: ze - zs, kind: 'zero' };
      pos = Math.max(pos, ze);
    }
    if (pos < end) yield { offset: pos, length: end - pos, kind: 'data' };
  }
}
