import { availableParallelism } from 'node:os';
import { flatExtents } from '../disk/chain.js';
import { nativeHelper } from '../disk/native.js';
import { lendWrites, WriteLoan } from '../disk/sink.js';
import { forgetMappings, mappedOrigin, readWindow } from '../disk/source.js';
import type { CompressedUnit, DiskReader, DiskWriter, Extent } from '../disk/types.js';
import { isZero } from '../disk/zero.js';
import type { CompressPool } from './compress-pool.js';

export interface CopyProgress {
  /** Guest bytes dealt with so far (zero ranges count as soon as they are recorded). */
  done: number;
  total: number;
}

export interface CopyOptions {
  /** Largest read, bytes; rounded to the writer's cluster size. */
  chunkSize?: number;
  onProgress?: (p: CopyProgress) => void;
  /**
   * The target's backing image (convert -B): clusters equal to it are left unallocated, and
   * zeros over its data are written as explicit zeros.
   */
  baseline?: DiskReader;
  /** Walk only the source's own layer (its backing is the baseline): unallocated stays unallocated. */
  topLayerOnly?: boolean;
  /** Worker threads for compressing writers and packed reads (one per core when not given). */
  pool?: CompressPool;
  /** How many chunks may be read (and decoded, compressed) ahead of the writer. */
  readAhead?: number;
}

export interface CopyStats {
  virtualSize: number;
  dataBytes: number;
  zeroBytes: number;
}

/**
 * Largest read for plain copies. Their bytes go file to file (see sink.ts), so
 * the size sets how often a window is remapped and a copy handed to a thread. Measured on the
 * bench (dense raw -> qcow2, 5 runs each): 1 MiB 0.79 s, 4 MiB 0.68 s, 16 MiB 0.70 s.
 */
const DEFAULT_CHUNK = 4 * 1024 * 1024;
/** Compressing writers: the unit of work sent to a worker thread (amortises the message cost; the
 * read-ahead window holds a few of them, in and out, so it also sets the memory used). */
const DEFAULT_COMPRESS_CHUNK = 2 * 1024 * 1024;

/**
 * Pieces up to this long from a mapped window have their zero test here, on the main thread
 * (zeroAt: a data cluster costs one 64-byte read), not on the thread pool (zeroMap): a pool job's
 * round trip cost more than the test. huge raw -> vdi (256 pieces of 1 MiB): 0.191 s, 0.179 s
 * with this; huge raw -> qcow2 0.280 s, 0.264 s (14 alternating runs).
 */
const ZERO_TEST_HERE_UP_TO = 1024 * 1024;

type UnitKind = 'data' | 'zero' | 'same';

/** What the writer is told to do for one piece of the disk, in order. */
type WriteOp =
  | { kind: 'write'; offset: number; data: Buffer }
  | { kind: 'compressed'; units: CompressedUnit[] }
  | { kind: 'zero'; offset: number; length: number };

interface Processed {
  ops: WriteOp[];
  /** Guest bytes this piece covers, for progress. */
  covered: number;
  /** The read buffer, back to the free list once the ops are written. */
  buffer?: Buffer;
  /** Compressed output memory, back to the pool once the ops are written. */
  output?: Buffer;
}

type Piece =
  | { kind: 'data'; offset: number; length: number }
  | { kind: 'zero'; offset: number; length: number }
  | { kind: 'skip'; length: number };

/**
 * Copies guest content from a reader to a writer. Data is read in cluster-aligned chunks, several
 * ahead of the writer; all-zero clusters become zero() calls, never data; for compressing writers
 * the clusters are compressed on worker threads while later chunks are read, and handed to the
 * writer in ascending order. Readers that can hand over compressed units undecoded (readPacked)
 * have them decoded on the same workers, so a compressed source is inflated on every core.
 * Memory stays at about (readAhead + 1) chunks whatever the disk size.
 */
export async function copyDisk(reader: DiskReader, writer: DiskWriter, options: CopyOptions = {}): Promise<CopyStats> {
  const unit = Math.max(512, writer.clusterSize);
  const compressing = writer.compression !== undefined && writer.writeCompressed !== undefined;
  const wanted = options.chunkSize ?? (compressing ? DEFAULT_COMPRESS_CHUNK : DEFAULT_CHUNK);
  const chunk = Math.max(unit, Math.floor(wanted / unit) * unit);
  // Created on first use (a source without compressed units may never need it; a plain copy
  // does not even load worker_threads), but at once for a compressing writer: the workers then
  // start while the first chunks are read.
  let pool: CompressPool | null = options.pool ?? null;
  // Cast, not annotated: TS would narrow an annotated null to `null` for the finally block below, not
  // seeing getPool assign it.
  let starting = null as Promise<CompressPool> | null;
  const getPool = (): Promise<CompressPool> => {
    if (pool) return Promise.resolve(pool);
    starting ??= import('./compress-pool.js').then((m) => {
      pool = new m.CompressPool();
      return pool;
    });
    return starting;
  };
  if (compressing) getPool().catch(() => {});
  // Read buffers are reused: fresh memory for every chunk costs page faults, and the collector
  // lets hundreds of megabytes of it pile up. Large writes from them are lent to the output (they
  // run several at a time), so a buffer is taken again only once its writes have settled.
  const loan = new WriteLoan();
  const free: { buffer: Buffer; settled: Promise<void> }[] = [];
  // A plain copy reads into mapped windows (the source's pages are mapped, not copied); memory
  // that travels to a worker thread must be ordinary.
  const mapped = !compressing && !reader.readPacked;
  const takeBuffer = async (): Promise<Buffer> => {
    const reused = free.shift();
    if (!reused) return mapped ? readWindow(chunk) : Buffer.allocUnsafeSlow(chunk);
    await reused.settled;
    if (mapped) forgetMappings(reused.buffer);
    return reused.buffer;
  };
  // Packed bytes are read into memory the workers hand back (once the pool runs).
  const packedMemory = (bytes: number): Buffer => pool?.packedMemory(bytes) ?? Buffer.allocUnsafeSlow(bytes);
  const workers = options.pool?.size ?? availableParallelism();
  const depth = options.readAhead ?? (compressing || reader.readPacked ? workers * 2 + 2 : 4);
  const stats: CopyStats = { virtualSize: reader.virtualSize, dataBytes: 0, zeroBytes: 0 };
  const baseline = options.baseline;
  let done = 0;

  const processPiece = async (piece: Piece): Promise<Processed> => {
    if (piece.kind === 'skip') return { ops: [], covered: piece.length };
    if (piece.kind === 'zero') {
      const ops: WriteOp[] = baseline
        ? await zerosOverBaseline(baseline, piece.offset, piece.offset + piece.length)
        : [{ kind: 'zero', offset: piece.offset, length: piece.length }];
      return { ops, covered: piece.length };
    }
    let buffer = await takeBuffer();
    if (reader.readPacked) {
      const units = await reader.readPacked(piece.offset, piece.length, buffer.subarray(0, piece.length), packedMemory);
      // The decoded chunk is the same memory, back from the worker.
      if (units.length > 0) buffer = await (await getPool()).decompress(buffer, piece.offset, units);
    } else await reader.read(piece.offset, piece.length, buffer.subarray(0, piece.length));
    const data = buffer.subarray(0, piece.length);
    const base = baseline ? await readBaseline(baseline, piece.offset, piece.length) : null;
    const flags = mapped && !base && data.length > ZERO_TEST_HERE_UP_TO ? await zeroFlagsInFile(data, piece.offset, unit) : null;
    const runs = flags
      ? runsFromFlags(piece.offset, data.length, unit, flags)
      : classify(piece.offset, data, base, unit, mapped ? isZeroInFile : isZero);
    if (!compressing || !runs.some((r) => r.kind === 'data')) {
      return { ops: runsToOps(piece.offset, data, runs), covered: piece.length, buffer };
    }
    // Each data cluster is compressed on its own: that is what the formats store.
    const ranges: [number, number][] = [];
    for (const r of runs) {
      if (r.kind !== 'data') continue;
      for (let s = r.start; s < r.end; s = nextBoundary(piece.offset, s, unit, r.end))
        ranges.push([s, nextBoundary(piece.offset, s, unit, r.end)]);
    }
    // The whole buffer travels (its own memory, so it moves to the worker instead of being copied).
    const { chunk: back, outputs, output } = await (await getPool()).compress(writer.compression!, buffer, ranges);
    const ops: WriteOp[] = [];
    let k = 0;
    for (const r of runs) {
      if (r.kind === 'zero') ops.push({ kind: 'zero', offset: piece.offset + r.start, length: r.end - r.start });
      if (r.kind !== 'data') continue;
      const units: CompressedUnit[] = [];
      for (; k < ranges.length && ranges[k]![0] < r.end; k++) {
        const [s, e] = ranges[k]!;
        units.push({ offset: piece.offset + s, raw: back.subarray(s, e), packed: outputs[k]! });
      }
      ops.push({ kind: 'compressed', units });
    }
    return { ops, covered: piece.length, buffer: back, output };
  };

  const window: Promise<Processed>[] = [];
  const pieces = splitPieces(options.topLayerOnly ? reader.extents() : flatExtents(reader), chunk, unit)[Symbol.asyncIterator]();
  let exhausted = false;
  const refill = async () => {
    while (!exhausted && window.length < depth) {
      const next = await pieces.next();
      if (next.done) {
        exhausted = true;
        break;
      }
      const p = processPiece(next.value);
      // Failures surface when this piece's turn comes; until then keep them from being "unhandled".
      p.catch(() => {});
      window.push(p);
    }
  };
  try {
    await refill();
    while (window.length > 0) {
      const result = await window.shift()!;
      await refill();
      await applyOps(writer, result.ops, loan, stats);
      done += result.covered;
      const settled = loan.settled();
      if (result.buffer) free.push({ buffer: result.buffer, settled });
      if (result.output) {
        const { output } = result;
        settled.then(() => pool!.release(output));
      }
      options.onProgress?.({ done, total: reader.virtualSize });
    }
  } finally {
    if (!options.pool) {
      // A pool still starting is closed once it has started.
      const started = pool ?? (starting ? await starting.catch(() => null) : null);
      await started?.close();
    }
  }
  return stats;
}

/**
 * Hands one piece's ops to the writer, in order. A function of its own, not part of copyDisk's
 * loop: V8 compiles whatever runs hot, and it spent 53 ms of the second core compiling copyDisk
 * with this inlined (huge raw -> vdi, whose 513 pieces make the loop hot).
 */
async function applyOps(writer: DiskWriter, ops: WriteOp[], loan: WriteLoan, stats: CopyStats): Promise<void> {
  for (const op of ops) {
    if (op.kind === 'write') {
      await lendWrites(loan, () => writer.write(op.offset, op.data));
      stats.dataBytes += op.data.length;
    } else if (op.kind === 'compressed') {
      await lendWrites(loan, () => writer.writeCompressed!(op.units));
      for (const u of op.units) stats.dataBytes += u.raw.length;
    } else {
      await writer.zero(op.offset, op.length);
      stats.zeroBytes += op.length;
    }
  }
}

/** Extents cut into chunk-sized pieces whose ends fall on the writer's cluster boundaries. */
async function* splitPieces(extents: AsyncIterable<Extent>, chunk: number, unit: number): AsyncGenerator<Piece> {
  for await (const ext of extents) {
    if (ext.kind === 'unallocated') {
      // Only with topLayerOnly: the target's backing supplies these bytes.
      yield { kind: 'skip', length: ext.length };
      continue;
    }
    if (ext.kind === 'zero') {
      yield { kind: 'zero', offset: ext.offset, length: ext.length };
      continue;
    }
    const end = ext.offset + ext.length;
    let pos = ext.offset;
    while (pos < end) {
      const alignedEnd = Math.min(end, (Math.floor(pos / unit) + Math.floor(chunk / unit)) * unit);
      const len = alignedEnd > pos ? alignedEnd - pos : Math.min(end - pos, unit - (pos % unit));
      yield { kind: 'data', offset: pos, length: len };
      pos += len;
    }
  }
}

/** Index in the chunk of the next cluster boundary after `i` (guest offsets), capped at `end`. */
function nextBoundary(base: number, i: number, unit: number, end: number): number {
  return Math.min(end, (Math.floor((base + i) / unit) + 1) * unit - base);
}

/** The baseline's bytes at [pos, pos + len), zeros past its end. */
async function readBaseline(baseline: DiskReader, pos: number, len: number): Promise<Buffer> {
  const out = Buffer.allocUnsafe(len);
  const inside = Math.max(0, Math.min(len, baseline.virtualSize - pos));
  if (inside > 0) await baseline.read(pos, inside, out.subarray(0, inside));
  out.fill(0, inside);
  return out;
}

/** A zero range over a backing image: explicit zeros only where the backing has data. */
async function zerosOverBaseline(baseline: DiskReader, from: number, to: number): Promise<WriteOp[]> {
  const ops: WriteOp[] = [];
  const limit = Math.min(to, baseline.virtualSize);
  if (limit <= from) return ops;
  for await (const be of flatExtents(baseline, from, limit)) {
    if (be.kind === 'data') ops.push({ kind: 'zero', offset: be.offset, length: be.length });
  }
  return ops;
}

interface Run {
  kind: UnitKind;
  start: number;
  end: number;
}

/**
 * isZero for a window mapped from source files: the cluster is looked at in its file (native
 * zeroAt) rather than through the window. Touching the window faults its pages in, and its next
 * remapping has to unmap them again: on the os disk that was 60 ms of the main thread's time,
 * against 20 ms of small reads. Bytes the window does not map from one file are scanned.
 */
function isZeroInFile(buf: Buffer, start: number, end: number): boolean {
  const native = nativeHelper();
  const origin = native ? mappedOrigin(buf.subarray(start, end)) : null;
  const r = origin ? native!.zeroAt(origin.source.fd, origin.position, end - start) : -1;
  return r === -1 ? isZero(buf, start, end) : r === 1;
}

/**
 * The zero test of a whole piece that one source file maps, run on the thread pool (native
 * zeroMap): one call per piece instead of one zeroAt per cluster on the main thread, which then
 * goes on reading and queueing copies (for pieces over ZERO_TEST_HERE_UP_TO). Null when the piece
 * maps no single file range, or its bytes could not be read (the caller tests the clusters itself).
 */
async function zeroFlagsInFile(data: Buffer, pos: number, unit: number): Promise<Buffer | null> {
  const native = nativeHelper();
  const origin = native ? mappedOrigin(data) : null;
  if (!origin) return null;
  const flags = native!.zeroMap(origin.source.fd, origin.position, data.length, nextBoundary(pos, 0, unit, data.length), unit);
  // The descriptor must stay open while the pool reads it, even if the copy fails meanwhile.
  origin.source.holdOpen(
    flags.then(
      () => {},
      () => {},
    ),
  );
  return flags;
}

/**
 * The data and zero runs of a `length`-byte piece at guest offset `pos` from zeroMap's flags (one
 * per cluster, 1 for zero; the first covers up to the first cluster boundary). Found a run at a
 * time with indexOf: a call per cluster made this loop and classify's hot enough to be compiled
 * (12 ms of a second core on the os disk, whose 4,000 clusters fall in 70 runs).
 */
function runsFromFlags(pos: number, length: number, unit: number, flags: Buffer): Run[] {
  const first = nextBoundary(pos, 0, unit, length);
  const offsetOf = (k: number) => (k === 0 ? 0 : Math.min(length, first + (k - 1) * unit));
  const runs: Run[] = [];
  for (let k = 0; k < flags.length; ) {
    const zero = flags[k] === 1;
    const next = flags.indexOf(zero ? 0 : 1, k + 1);
    const stop = next === -1 ? flags.length : next;
    runs.push({ kind: zero ? 'zero' : 'data', start: offsetOf(k), end: stop === flags.length ? length : offsetOf(stop) });
    k = stop;
  }
  return runs;
}

/** Splits `data` (at guest offset `pos`) into runs of data / zero / same-as-baseline clusters. */
function classify(
  pos: number,
  data: Buffer,
  base: Buffer | null,
  unit: number,
  zeroTest: (buf: Buffer, start: number, end: number) => boolean,
): Run[] {
  const runs: Run[] = [];
  let i = 0;
  while (i < data.length) {
    const next = nextBoundary(pos, i, unit, data.length);
    let kind: UnitKind;
    if (base && data.compare(base, i, next, i, next) === 0) kind = 'same';
    else if (zeroTest(data, i, next)) kind = 'zero';
    else kind = 'data';
    const last = runs[runs.length - 1];
    if (last && last.kind === kind) last.end = next;
    else runs.push({ kind, start: i, end: next });
    i = next;
  }
  return runs;
}

function runsToOps(pos: number, data: Buffer, runs: Run[]): WriteOp[] {
  const ops: WriteOp[] = [];
  for (const r of runs) {
    if (r.kind === 'data') ops.push({ kind: 'write', offset: pos + r.start, data: data.subarray(r.start, r.end) });
    else if (r.kind === 'zero') ops.push({ kind: 'zero', offset: pos + r.start, length: r.end - r.start });
  }
  return ops;
}
