/**
 * The byte-moving part of warm sync: a sparse raw working file per disk (pwrite anywhere, fsync,
 * reopened as-is after a kill), ranges copied into it from a DiskReader (an NBD export) with
 * read-ahead and an optional rate limit, and the fallback for sources without dirty tracking:
 * compare chunk digests of source and working copy, copy only the chunks that differ.
 */
import { createHash } from 'node:crypto';
import { closeSync, fstatSync, fsyncSync, ftruncateSync, openSync, readSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { ioError } from '../../disk/errors.js';
import { writeAllSync } from '../../disk/sink.js';
import type { DiskReader } from '../../disk/types.js';
import { isZero } from '../../disk/zero.js';

const MiB = 1024 * 1024;

/** A raw working copy of a guest disk: sparse, written in place, durable after sync(). */
export class WorkFile {
  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly size: number,
  ) {}

  static open(path: string, size: number): WorkFile {
    let fd: number;
    try {
      fd = openSync(path, 'a+');
      closeSync(fd);
      fd = openSync(path, 'r+');
      if (fstatSync(fd).size !== size) ftruncateSync(fd, size);
    } catch (err) {
      throw ioError(err, path);
    }
    return new WorkFile(path, fd, size);
  }

  /** In steps of WRITE_STEP: one write(2) of a whole 4 MiB chunk was several times slower here (sink.ts). */
  write(offset: number, data: Buffer): void {
    writeAllSync(this.fd, data, offset);
  }

  read(offset: number, length: number, into: Buffer = Buffer.allocUnsafe(length)): Buffer {
    let done = 0;
    while (done < length) {
      const n = readSync(this.fd, into, done, length - done, offset + done);
      if (n === 0) {
        into.fill(0, done, length);
        break;
      }
      done += n;
    }
    return into;
  }

  sync(): void {
    fsyncSync(this.fd);
  }

  close(): void {
    closeSync(this.fd);
  }
}

export interface Range {
  offset: number;
  length: number;
}

export interface CopyStats {
  /** Guest bytes copied (read from the source, written to the working file). */
  bytes: number;
  /** Ranges (extents or dirty runs) the source named. */
  ranges: number;
  seconds: number;
}

export interface CopyOptions {
  /** Largest single read, bytes. */
  chunk?: number;
  /** Reads kept in flight. */
  depth?: number;
  /** Bytes per second at most (0 or undefined: unlimited). */
  rateLimit?: number;
  /** Do not write chunks that read as all zeros (the working file is still zero there). */
  skipZeroes?: boolean;
  /** Also hands every piece (zeros included) to this sink, e.g. an open target writer. */
  also?: (offset: number, data: Buffer) => Promise<void>;
  /** Called in ascending order as each piece is written: everything below `end` of this range set is done. */
  onWritten?: (end: number, bytes: number) => void;
}

/** Copies `ranges` (ascending) from `source` into `work`. */
export async function copyRanges(
  source: DiskReader,
  work: WorkFile,
  ranges: AsyncIterable<Range> | Iterable<Range>,
  o: CopyOptions = {},
): Promise<CopyStats> {
  const chunk = o.chunk ?? 4 * MiB;
  const depth = o.depth ?? 4;
  const started = process.hrtime.bigint();
  let bytes = 0;
  let count = 0;
  const queue: { offset: number; length: number; data: Promise<Buffer> }[] = [];
  const drainOne = async () => {
    const piece = queue.shift()!;
    const data = await piece.data;
    if (!(o.skipZeroes && isZero(data, 0, data.length))) work.write(piece.offset, data);
    if (o.also) await o.also(piece.offset, data);
    bytes += piece.length;
    o.onWritten?.(piece.offset + piece.length, bytes);
    if (o.rateLimit && o.rateLimit > 0) {
      const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
      const due = bytes / o.rateLimit;
      if (due > elapsed) await sleep((due - elapsed) * 1000);
    }
  };
  try {
    for await (const r of ranges as AsyncIterable<Range>) {
      count++;
      for (let p = r.offset; p < r.offset + r.length; p += chunk) {
        const n = Math.min(chunk, r.offset + r.length - p);
        const data = source.read(p, n);
        data.catch(() => {});
        queue.push({ offset: p, length: n, data });
        if (queue.length >= depth) await drainOne();
      }
    }
    while (queue.length > 0) await drainOne();
  } finally {
    for (const q of queue) q.data.catch(() => {});
  }
  return { bytes, ranges: count, seconds: Number(process.hrtime.bigint() - started) / 1e9 };
}

export interface DigestSyncStats extends CopyStats {
  /** Chunks compared. */
  chunks: number;
  /** Chunks whose digests differed (copied). */
  changedChunks: number;
  /** Bytes read from the source to compare (its data extents; zero stretches are not read). */
  comparedBytes: number;
}

/**
 * The fallback for sources without dirty tracking: reads every chunk of `source`, compares its
 * SHA-256 with the working copy's chunk, and writes only the chunks that differ.
 */
export async function syncByDigest(
  source: DiskReader,
  work: WorkFile,
  o: { chunk?: number; rateLimit?: number } = {},
): Promise<DigestSyncStats> {
  const chunk = o.chunk ?? MiB;
  const started = process.hrtime.bigint();
  let changed = 0;
  let chunks = 0;
  let bytes = 0;
  let compared = 0;
  const mine = Buffer.allocUnsafe(chunk);
  const digest = (b: Buffer) => createHash('sha256').update(b).digest();
  const throttle = async () => {
    if (o.rateLimit && o.rateLimit > 0) {
      const elapsed = Number(process.hrtime.bigint() - started) / 1e9;
      const due = compared / o.rateLimit;
      if (due > elapsed) await sleep((due - elapsed) * 1000);
    }
  };
  // Stretches the source maps as zero or unallocated are not read from it: the working copy's
  // chunk (read locally) only has to be zero there too. Data stretches are compared by digest.
  for await (const e of source.extents()) {
    for (let p = e.offset; p < e.offset + e.length; p += chunk) {
      const n = Math.min(chunk, e.offset + e.length - p);
      chunks++;
      const ours = work.read(p, n, mine.subarray(0, n));
      if (e.kind !== 'data') {
        if (!isZero(ours, 0, n)) {
          work.write(p, Buffer.alloc(n));
          changed++;
          bytes += n;
        }
        continue;
      }
      const theirs = await source.read(p, n);
      compared += n;
      if (!digest(theirs).equals(digest(ours))) {
        work.write(p, theirs);
        changed++;
        bytes += n;
      }
      await throttle();
    }
  }
  work.sync();
  return {
    bytes,
    ranges: changed,
    seconds: Number(process.hrtime.bigint() - started) / 1e9,
    chunks,
    changedChunks: changed,
    comparedBytes: compared,
  };
}

/** SHA-256 of a working file's first `length` bytes. */
export function workDigest(work: WorkFile, length = work.size): string {
  const h = createHash('sha256');
  const buf = Buffer.allocUnsafe(4 * MiB);
  for (let p = 0; p < length; p += buf.length) {
    const n = Math.min(buf.length, length - p);
    h.update(work.read(p, n, buf.subarray(0, n)));
  }
  return h.digest('hex');
}
