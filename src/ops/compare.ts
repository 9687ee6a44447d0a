import { type FlatExtent, flatExtents } from '../disk/chain.js';
import type { DiskReader } from '../disk/types.js';
import { isZero } from '../disk/zero.js';

export interface CompareResult {
  identical: boolean;
  /** The first differing guest offset, when not identical. */
  offset?: number;
  /** qemu-img compare's wording. */
  message: string;
}

/** Pulls extents one at a time so two maps can be walked side by side. */
class ExtentCursor {
  private current: FlatExtent | null = null;
  private readonly it: AsyncIterator<FlatExtent>;
  constructor(reader: DiskReader) {
    this.it = flatExtents(reader)[Symbol.asyncIterator]();
  }
  /** The extent containing `pos` (extents are contiguous and ascending). */
  async at(pos: number): Promise<FlatExtent> {
    while (!this.current || this.current.offset + this.current.length <= pos) {
      const next = await this.it.next();
      if (next.done) throw new Error(`extent map ended before ${pos}`);
      this.current = next.value;
    }
    return this.current;
  }
}

const CHUNK = 4 * 1024 * 1024;

/** Finds the first differing byte in [from, to) of two readers; -1 when equal. */
async function firstDifference(a: DiskReader, b: DiskReader, to: number): Promise<number> {
  const ca = new ExtentCursor(a);
  const cb = new ExtentCursor(b);
  const bufA = Buffer.allocUnsafe(CHUNK);
  const bufB = Buffer.allocUnsafe(CHUNK);
  let pos = 0;
  while (pos < to) {
    const ea = await ca.at(pos);
    const eb = await cb.at(pos);
    const end = Math.min(to, ea.offset + ea.length, eb.offset + eb.length);
    if (ea.kind === 'zero' && eb.kind === 'zero') {
      pos = end;
      continue;
    }
    while (pos < end) {
      const n = Math.min(CHUNK, end - pos);
      const da = ea.kind === 'zero' ? null : await a.read(pos, n, bufA.subarray(0, n));
      const db = eb.kind === 'zero' ? null : await b.read(pos, n, bufB.subarray(0, n));
      const at = diffOffset(da, db, n);
      if (at >= 0) return pos + at;
      pos += n;
    }
  }
  return -1;
}

function diffOffset(a: Buffer | null, b: Buffer | null, n: number): number {
  if (a && b) {
    if (a.equals(b)) return -1;
    for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
    return -1;
  }
  const only = (a ?? b)!;
  if (isZero(only, 0, n)) return -1;
  for (let i = 0; i < n; i++) if (only[i] !== 0) return i;
  return -1;
}

/** Where in [from, size) the reader first holds a non-zero byte; -1 when all zero. */
async function firstNonZero(r: DiskReader, from: number): Promise<number> {
  const buf = Buffer.allocUnsafe(CHUNK);
  for await (const e of flatExtents(r, from)) {
    if (e.kind === 'zero') continue;
    for (let pos = e.offset; pos < e.offset + e.length; pos += CHUNK) {
      const n = Math.min(CHUNK, e.offset + e.length - pos);
      const data = await r.read(pos, n, buf.subarray(0, n));
      const at = diffOffset(data, null, n);
      if (at >= 0) return pos + at;
    }
  }
  return -1;
}

/**
 * qemu-img compare: identical when the guest content is equal; images of different sizes are
 * identical if the larger one's extra part is all zeros, unless `strict`.
 */
export async function compareImages(a: DiskReader, b: DiskReader, strict = false): Promise<CompareResult> {
  if (strict && a.virtualSize !== b.virtualSize) {
    return { identical: false, message: 'Strict mode: Image size mismatch!' };
  }
  const common = Math.min(a.virtualSize, b.virtualSize);
  let at = await firstDifference(a, b, common);
  if (at < 0 && a.virtualSize !== b.virtualSize) {
    const larger = a.virtualSize > b.virtualSize ? a : b;
    at = await firstNonZero(larger, common);
  }
  if (at >= 0) {
    // qemu-img names the 512-byte sector where the first difference lies.
    const sector = Math.floor(at / 512) * 512;
    return { identical: false, offset: sector, message: `Content mismatch at offset ${sector}!` };
  }
  const warning = a.virtualSize !== b.virtualSize ? 'Warning: Image size mismatch!\n' : '';
  return { identical: true, message: `${warning}Images are identical.` };
}
