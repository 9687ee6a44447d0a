/** Worker thread: compresses units of a chunk with the codec the writer asked for. */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { parentPort } from 'node:worker_threads';
import { deflateRawSync, deflateSync } from 'node:zlib';
import { compress as zstdCompress } from 'zstd-napi';
import type { CodecSpec } from '../disk/types.js';

export interface CompressJob {
  id: number;
  spec: CodecSpec;
  chunk: ArrayBuffer;
  /** [start, end) byte ranges of the chunk to compress, one output each. */
  ranges: [number, number][];
  /** Output memory from an earlier job, to write into when it is large enough. */
  spare?: ArrayBuffer;
}

export interface CompressDone {
  id: number;
  chunk: ArrayBuffer;
  output: ArrayBuffer;
  /** End offset of each unit's output inside `output`. */
  ends: number[];
  /** The spare the job brought when it was too small: back to the pool. */
  unused?: ArrayBuffer;
  error?: string;
}

function compressOne(spec: CodecSpec, data: Buffer): Buffer {
  switch (spec.codec) {
    case 'deflate-raw':
      return deflateRawSync(data, { level: spec.level, windowBits: spec.windowBits ?? 15, memLevel: spec.memLevel ?? 8 });
    case 'zlib':
      return deflateSync(data, { level: spec.level, windowBits: spec.windowBits ?? 15, memLevel: spec.memLevel ?? 8 });
    case 'zstd':
      return zstdCompress(data, spec.level === undefined ? undefined : { compressionLevel: spec.level });
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

parentPort?.on('message', (job: CompressJob) => {
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
