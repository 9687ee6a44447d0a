/** Worker thread: compresses units of a chunk with the codec the writer asked for. */
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
}

export interface CompressDone {
  id: number;
  chunk: ArrayBuffer;
  output: ArrayBuffer;
  /** End offset of each unit's output inside `output`. */
  ends: number[];
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

parentPort?.on('message', (job: CompressJob) => {
  const chunk = Buffer.from(job.chunk);
  try {
    const outs = job.ranges.map(([s, e]) => compressOne(job.spec, chunk.subarray(s, e)));
    const total = outs.reduce((n, b) => n + b.length, 0);
    const output = new ArrayBuffer(total);
    const view = Buffer.from(output);
    const ends: number[] = [];
    let pos = 0;
    for (const b of outs) {
      b.copy(view, pos);
      pos += b.length;
      ends.push(pos);
    }
    const done: CompressDone = { id: job.id, chunk: job.chunk, output, ends };
    parentPort!.postMessage(done, [job.chunk, output]);
  } catch (err) {
    const done: CompressDone = { id: job.id, chunk: job.chunk, output: new ArrayBuffer(0), ends: [], error: String(err) };
    parentPort!.postMessage(done, [job.chunk]);
  }
});
