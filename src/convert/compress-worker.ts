/**
 * Worker thread: compresses units of a chunk with the codec the writer asked for, or decodes a
 * reader's packed units into their places in a chunk.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { parentPort } from 'node:worker_threads';
import { deflateRawSync, deflateSync, inflateRawSync, inflateSync } from 'node:zlib';
import { nativeHelper } from '../disk/native.js';
import type { CodecSpec, PackedCodec } from '../disk/types.js';
// Loaded on first use (zstd jobs only): its native binding would add to every worker's start-up.
import { zstd } from '../disk/zstd.js';

export interface CompressJob {
  kind?: undefined;
  id: number;
  spec: CodecSpec;
  chunk: ArrayBuffer;
  /** [start, end) byte ranges of the chunk to compress, one output each. */
  ranges: [number, number][];
  /** Output memory from an earlier job, to write into when it is large enough. */
  spare?: ArrayBuffer;
}

export interface CompressDone {
  kind?: undefined;
  id: number;
  chunk: ArrayBuffer;
  output: ArrayBuffer;
  /** End offset of each unit's output inside `output`. */
  ends: number[];
  /** The spare the job brought when it was too small: back to the pool. */
  unused?: ArrayBuffer;
  error?: string;
}

/** One packed unit of a decompress job; offsets into the job's chunk and packed memory. */
export interface DecodeUnit {
  codec: PackedCodec;
  /** The stored bytes: packed[start, end). */
  start: number;
  end: number;
  /** Decoded bytes [skip, skip + length) go to chunk[at, at + length). */
  at: number;
  skip: number;
  length: number;
  size: number;
  minSize: number;
}

export interface DecompressJob {
  kind: 'decompress';
  id: number;
  chunk: ArrayBuffer;
  packed: ArrayBuffer;
  units: DecodeUnit[];
}

export interface DecompressDone {
  kind: 'decompress';
  id: number;
  chunk: ArrayBuffer;
  packed: ArrayBuffer;
  /** The first unit that did not decode, and why. */
  failed?: { index: number; reason?: string; decoded?: number };
  error?: string;
}

function decodeOne(u: DecodeUnit, src: Buffer): Buffer {
  switch (u.codec) {
    case 'inflate':
      // One output chunk of a whole unit: no concatenation of 16 KiB pieces afterwards.
      return inflateSync(src, { maxOutputLength: u.size, chunkSize: u.size + 1024 });
    case 'inflate-raw':
      return inflateRawSync(src, { finishFlush: 2 /* Z_SYNC_FLUSH: tolerate a cut-short end */, maxOutputLength: u.size });
    case 'zstd': {
      const out = zstd().decompress(src);
      return out.length > u.size ? out.subarray(0, u.size) : out;
    }
  }
}

function decompressJob(job: DecompressJob): DecompressDone {
  const chunk = Buffer.from(job.chunk);
  const packed = Buffer.from(job.packed);
  const done: DecompressDone = { kind: 'decompress', id: job.id, chunk: job.chunk, packed: job.packed };
  for (let i = 0; i < job.units.length; i++) {
    const u = job.units[i]!;
    if (u.codec === 'inflate' && u.skip === 0 && u.length >= u.minSize && storedInto(packed, u, chunk)) continue;
    let out: Buffer;
    try {
      out = decodeOne(u, packed.subarray(u.start, u.end));
    } catch (err) {
      done.failed = { index: i, reason: (err as Error).message };
      return done;
    }
    if (out.length < u.minSize) {
      done.failed = { index: i, decoded: out.length };
      return done;
    }
    // Past the decoded end (up to minSize's allowance, the unit's size) the unit reads as zeros.
    const have = Math.max(0, Math.min(u.length, out.length - u.skip));
    if (have > 0) out.copy(chunk, u.at, u.skip, u.skip + have);
    if (have < u.length) chunk.fill(0, u.at + have, u.at + u.length);
    sinceGc += out.length;
  }
  return done;
}

/**
 * Decodes a zlib stream whose deflate blocks all store their bytes (what deflate emits for
 * incompressible data, and what storedDeflate writes) straight into chunk[u.at, u.at + u.length):
 * a copy and an Adler-32 instead of inflate's copy into a buffer of its own and a second copy into
 * the chunk. On dense 1 GiB of such grains inflate took 0.4 s of the workers' time. False, with
 * nothing decided, when a block is compressed, the stream does not decode to exactly u.length
 * bytes, or its checksum differs: inflate then decodes it or says what is wrong.
 */
export function storedInto(packed: Buffer, u: DecodeUnit, chunk: Buffer): boolean {
  const cmf = packed[u.start];
  const flg = packed[u.start + 1];
  // Deflate, no preset dictionary, header check.
  if (cmf === undefined || flg === undefined || (cmf & 0x0f) !== 8 || flg & 0x20 || ((cmf << 8) | flg) % 31 !== 0) {
    return false;
  }
  let pos = u.start + 2;
  let out = 0;
  for (;;) {
    if (pos + 5 > u.end) return false;
    const head = packed[pos]!;
    // A stored block (type 00) starts on a byte boundary after a stored block, and the first one at
    // the stream's first byte; the header's remaining five bits are padding.
    if ((head & 0x06) !== 0) return false;
    const len = packed.readUInt16LE(pos + 1);
    if ((len ^ 0xffff) !== packed.readUInt16LE(pos + 3) || pos + 5 + len > u.end || out + len > u.length) return false;
    packed.copy(chunk, u.at + out, pos + 5, pos + 5 + len);
    out += len;
    pos += 5 + len;
    if (head & 1) break;
  }
  if (out !== u.length || pos + 4 > u.end) return false;
  return packed.readUInt32BE(pos) === adler32(chunk.subarray(u.at, u.at + out));
}

const histogram = new Uint32Array(256);
const SAMPLE_STRIDE = 4;
/** Open-addressed table of sampled word positions (-1: empty), for the repeat check. */
const seenAt = new Int32Array(4096);

/**
 * True when deflate cannot shrink `data` by more than a fraction of a percent: its bytes are near
 * uniformly distributed (order-0 entropy of every 4th byte over 7.95 bits per byte, as random or
 * already-compressed data is) and no sampled 4-byte word repeats (deflate's matches would find
 * repeated content even where the byte histogram is flat). Such units are stored (see
 * storedDeflate) instead of being searched for matches at about 45 MB/s per core for nothing.
 */
export const looksIncompressible: (data: Buffer) => boolean = nativeHelper()?.looksIncompressible ?? looksIncompressibleJs;

/** looksIncompressible where the native helper is not built (and the reference its test holds it to). */
export function looksIncompressibleJs(data: Buffer): boolean {
  const n = data.length;
  if (n < 4096) return false;
  histogram.fill(0);
  let samples = 0;
  for (let i = 0; i < n; i += SAMPLE_STRIDE, samples++) histogram[data[i]!]!++;
  let bits = 0;
  for (let b = 0; b < 256; b++) {
    const c = histogram[b]!;
    if (c > 0) bits -= c * Math.log2(c / samples);
  }
  if (bits / samples < 7.95) return false;
  seenAt.fill(-1);
  for (let i = 0, count = 0; i + 4 <= n && count < 2048; i += 61, count++) {
    const word = data.readInt32LE(i);
    let slot = Math.imul(word, 0x9e3779b1) >>> 20;
    while (seenAt[slot] !== -1) {
      if (data.readInt32LE(seenAt[slot]!) === word) return false;
      slot = (slot + 1) & 4095;
    }
    seenAt[slot] = i;
  }
  return true;
}

const STORED_BLOCK = 65535;

/**
 * `data` as a deflate stream of stored blocks (RFC 1951 3.2.4), raw or with the zlib wrapper
 * (RFC 1950: header for the fastest level, Adler-32 trailer). It decodes with any inflater and is
 * what deflate itself falls back to for incompressible input, only without the search.
 */
export function storedDeflate(data: Buffer, zlibWrapper: boolean): Buffer {
  const blocks = Math.max(1, Math.ceil(data.length / STORED_BLOCK));
  const head = zlibWrapper ? 2 : 0;
  const out = Buffer.allocUnsafe(head + blocks * 5 + data.length + (zlibWrapper ? 4 : 0));
  let pos = 0;
  if (zlibWrapper) {
    out[pos++] = 0x78;
    out[pos++] = 0x01;
  }
  for (let b = 0; b < blocks; b++) {
    const start = b * STORED_BLOCK;
    const len = Math.min(STORED_BLOCK, data.length - start);
    out[pos] = b === blocks - 1 ? 1 : 0;
    out.writeUInt16LE(len, pos + 1);
    out.writeUInt16LE(~len & 0xffff, pos + 3);
    data.copy(out, pos + 5, start, start + len);
    pos += 5 + len;
  }
  if (zlibWrapper) out.writeUInt32BE(adler32(data), pos);
  return out;
}

/** Adler-32 (RFC 1950 8.2): the native helper's where it is built. */
export const adler32: (data: Buffer) => number = nativeHelper()?.adler32 ?? adler32Js;

/** Adler-32 in JS, four bytes a step where the memory is aligned for it (and the reference its test holds it to). */
export function adler32Js(data: Buffer): number {
  let a = 1;
  let b = 0;
  let i = 0;
  const n = data.length;
  if (data.byteOffset % 4 === 0) {
    const words = new Int32Array(data.buffer, data.byteOffset, n >>> 2);
    // 256 words a run keeps both sums far inside int32 before the modulo.
    for (let w = 0; w < words.length; ) {
      const end = Math.min(words.length, w + 256);
      for (; w < end; w++) {
        const x = words[w]!;
        const b0 = x & 255;
        const b1 = (x >>> 8) & 255;
        const b2 = (x >>> 16) & 255;
        const b3 = x >>> 24;
        b = (b + 4 * a + 4 * b0 + 3 * b1 + 2 * b2 + b3) | 0;
        a = (a + b0 + b1 + b2 + b3) | 0;
      }
      a %= 65521;
      b %= 65521;
    }
    i = words.length * 4;
  }
  while (i < n) {
    const end = Math.min(n, i + 1024);
    for (; i < end; i++) {
      a = (a + data[i]!) | 0;
      b = (b + a) | 0;
    }
    a %= 65521;
    b %= 65521;
  }
  return ((b << 16) | a) >>> 0;
}

const EMPTY = Buffer.alloc(0);

function compressOne(spec: CodecSpec, data: Buffer): Buffer {
  switch (spec.codec) {
    case 'deflate-raw':
      if (looksIncompressible(data)) return storedDeflate(data, false);
      return deflateRawSync(data, { level: spec.level, windowBits: spec.windowBits ?? 15, memLevel: spec.memLevel ?? 8 });
    case 'zlib':
      if (looksIncompressible(data)) return storedDeflate(data, true);
      return deflateSync(data, { level: spec.level, windowBits: spec.windowBits ?? 15, memLevel: spec.memLevel ?? 8 });
    case 'zstd':
      if (spec.passIncompressible && looksIncompressible(data)) return EMPTY;
      return zstd().compress(data, spec.level === undefined ? undefined : { compressionLevel: spec.level });
  }
}

/**
 * Every unit leaves a few short-lived native buffers behind; the collector counts them only
 * loosely and lets hundreds of megabytes pile up before it runs. A young-generation collection
 * every few megabytes of output keeps the worker small, at a cost of well under 1%.
 */
function exposeGc(): ((options?: { type: 'minor' | 'major' }) => void) | undefined {
  // V8 flags are process-wide: left on, as another worker may be reading it at the same moment.
  setFlagsFromString('--expose-gc');
  try {
    return runInNewContext('gc');
  } catch {
    return undefined;
  }
}
const gc = exposeGc();
const GC_EVERY = 8 * 1024 * 1024;
let sinceGc = 0;

parentPort?.on('message', (job: CompressJob | DecompressJob) => {
  if (job.kind === 'decompress') {
    let done: DecompressDone;
    try {
      done = decompressJob(job);
    } catch (err) {
      done = { kind: 'decompress', id: job.id, chunk: job.chunk, packed: job.packed, error: String(err) };
    }
    parentPort!.postMessage(done, [job.chunk, job.packed]);
    if (gc && sinceGc >= GC_EVERY) {
      sinceGc = 0;
      gc({ type: 'minor' });
    }
    return;
  }
  const chunk = Buffer.from(job.chunk);
  try {
    const outs = job.ranges.map(([s, e]) => compressOne(job.spec, chunk.subarray(s, e)));
    const total = outs.reduce((n, b) => n + b.length, 0);
    let output: ArrayBuffer;
    let unused: ArrayBuffer | undefined;
    if (job.spare && job.spare.byteLength >= total) output = job.spare;
    else {
      unused = job.spare;
      // Room for incompressible data's small growth, so this memory can serve later jobs too.
      output = new ArrayBuffer(Math.max(total, chunk.length + (chunk.length >> 6) + 4096));
    }
    const view = Buffer.from(output);
    const ends: number[] = [];
    let pos = 0;
    for (const b of outs) {
      b.copy(view, pos);
      pos += b.length;
      ends.push(pos);
    }
    const done: CompressDone = { id: job.id, chunk: job.chunk, output, ends, unused };
    parentPort!.postMessage(done, unused ? [job.chunk, output, unused] : [job.chunk, output]);
    sinceGc += total;
    if (gc && sinceGc >= GC_EVERY) {
      sinceGc = 0;
      gc({ type: 'minor' });
    }
  } catch (err) {
    const done: CompressDone = {
      id: job.id,
      chunk: job.chunk,
      output: new ArrayBuffer(0),
      ends: [],
      unused: job.spare,
      error: String(err),
    };
    parentPort!.postMessage(done, job.spare ? [job.chunk, job.spare] : [job.chunk]);
  }
});
