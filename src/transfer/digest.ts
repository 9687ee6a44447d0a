/**
 * The whole-content digest both ends of a transfer compare: independent of format, chunking and
 * allocation. The guest content is cut into 1 MiB blocks; an all-zero block counts as zero
 * whether it is a hole, a zero extent or stored zeros. The digest is SHA-256 over the sequence
 * "Z<count>;" for each run of zero blocks and "D<sha256 of block>" for each other block, so a
 * petabyte of holes costs one update.
 */
import { createHash, type Hash } from 'node:crypto';
import { flatExtents } from '../disk/chain.js';
import type { DiskReader } from '../disk/types.js';
import { isZero } from '../disk/zero.js';

export const DIGEST_BLOCK = 1024 * 1024;

export class ContentDigest {
  private readonly hash: Hash = createHash('sha256');
  private zeroRun = 0;
  /** Guest bytes accounted for so far. */
  position = 0;

  /** `length` bytes of zeros (a multiple of the block size, or the disk's tail). */
  addZeros(length: number): void {
    this.zeroRun += Math.ceil(length / DIGEST_BLOCK);
    this.position += length;
  }

  /** Whole blocks of content (the last may be the disk's short tail). */
  addData(buf: Buffer): void {
    for (let s = 0; s < buf.length; s += DIGEST_BLOCK) {
      const e = Math.min(buf.length, s + DIGEST_BLOCK);
      if (isZero(buf, s, e)) {
        this.zeroRun++;
        continue;
      }
      this.flushZeros();
      this.hash.update('D');
      this.hash.update(createHash('sha256').update(buf.subarray(s, e)).digest());
    }
    this.position += buf.length;
  }

  private flushZeros(): void {
    if (this.zeroRun > 0) this.hash.update(`Z${this.zeroRun};`);
    this.zeroRun = 0;
  }

  digest(): string {
    this.flushZeros();
    return this.hash.digest('hex');
  }
}

/** A piece of the disk cut on block boundaries: data blocks to read, or blocks known to be zero. */
export interface BlockPiece {
  kind: 'data' | 'zero';
  start: number;
  end: number;
}

/**
 * The disk as pieces aligned to `align` (a multiple of DIGEST_BLOCK): an aligned block holding any
 * data extent is data; data pieces are at most `maxData` bytes. Ascending, covering [from, size).
 */
export async function* blockPieces(reader: DiskReader, align: number, maxData: number, from = 0): AsyncGenerator<BlockPiece> {
  const size = reader.virtualSize;
  const st: { cur: BlockPiece | null } = { cur: null };
  const push = function* (kind: 'data' | 'zero', start: number, end: number): Generator<BlockPiece> {
    if (end <= start) return;
    const cur = st.cur;
    if (cur && cur.kind === kind && cur.end === start) cur.end = end;
    else {
      if (cur) yield cur;
      st.cur = { kind, start, end };
    }
    let c = st.cur!;
    while (c.kind === 'data' && c.end - c.start > maxData) {
      yield { kind: 'data', start: c.start, end: c.start + maxData };
      c = { kind: 'data', start: c.start + maxData, end: c.end };
      st.cur = c;
    }
  };
  // Blocks already claimed as data (an extent ending inside a block makes the whole block data).
  let dataUntil = from;
  for await (const ext of flatExtents(reader, from, size)) {
    const extEnd = ext.offset + ext.length;
    if (ext.kind === 'data') {
      const s = Math.max(dataUntil, Math.floor(ext.offset / align) * align);
      const e = Math.min(size, Math.ceil(extEnd / align) * align);
      if (s > dataUntil) yield* push('zero', dataUntil, s);
      yield* push('data', Math.max(s, dataUntil), e);
      dataUntil = Math.max(dataUntil, e);
    }
  }
  if (dataUntil < size) yield* push('zero', dataUntil, size);
  if (st.cur) yield st.cur;
}

/**
 * The content digest of the first `length` bytes of a disk (all of it by default), read through
 * its extent map (holes are not read). A target format may round the size up (VHD's geometry):
 * bytes past `length` must then read as zeros, else the digest is marked so it cannot match.
 */
export async function contentDigest(
  reader: DiskReader,
  length = reader.virtualSize,
  maxRead = 8 * DIGEST_BLOCK,
): Promise<string> {
  const d = new ContentDigest();
  let tailClean = reader.virtualSize >= length;
  for await (const p of blockPieces(reader, DIGEST_BLOCK, maxRead)) {
    const end = Math.min(p.end, length);
    if (p.start < end) {
      if (p.kind === 'zero') d.addZeros(end - p.start);
      else d.addData(await reader.read(p.start, end - p.start));
    }
    if (p.end > length && p.kind === 'data' && tailClean) {
      const from = Math.max(p.start, length);
      if (!isZero(await reader.read(from, p.end - from))) tailClean = false;
    }
  }
  return tailClean ? d.digest() : `${d.digest()}+size-or-tail-differs`;
}
