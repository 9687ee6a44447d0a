import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { VmferryError } from '../disk/errors.js';
import type { CodecSpec } from '../disk/types.js';
import type { CompressDone, CompressJob } from './compress-worker.js';

export interface Compressed {
  /** The chunk that was sent, back from the worker (same memory). */
  chunk: Buffer;
  /** One output per range, views into `output`. */
  outputs: Buffer[];
  /** The memory behind `outputs`: hand it to release() once the outputs are written. */
  output: Buffer;
}

interface Pending {
  resolve: (r: Compressed) => void;
  reject: (e: Error) => void;
}

/**
 * A pool of worker threads, one per core, compressing units of data chunks. Jobs go to the least
 * busy worker; chunks move to the worker and back without copies, and output memory is recycled
 * (release()), so a long conversion allocates a few buffers once instead of a gigabyte of
 * garbage the collector would let pile up.
 */
export class CompressPool {
  private readonly workers: { worker: Worker; busy: number }[] = [];
  private readonly pending = new Map<number, Pending>();
  private readonly spare: ArrayBuffer[] = [];
  private nextId = 1;

  constructor(readonly size = Math.max(1, availableParallelism())) {
    for (let i = 0; i < size; i++) {
      const worker = new Worker(new URL('./compress-worker.js', import.meta.url));
      const slot = { worker, busy: 0 };
      worker.on('message', (done: CompressDone) => {
        slot.busy--;
        // An idle pool must not keep the process alive; a busy one must (the caller awaits it).
        if (slot.busy === 0) worker.unref();
        if (done.unused) this.spare.push(done.unused);
        const p = this.pending.get(done.id);
        if (!p) return;
        this.pending.delete(done.id);
        if (done.error) return p.reject(new VmferryError(`compression failed: ${done.error}`));
        const out = Buffer.from(done.output);
        const outputs: Buffer[] = [];
        let start = 0;
        for (const end of done.ends) {
          outputs.push(out.subarray(start, end));
          start = end;
        }
        p.resolve({ chunk: Buffer.from(done.chunk), outputs, output: out });
      });
      worker.on('error', (err) => {
        for (const p of this.pending.values()) p.reject(err);
        this.pending.clear();
        slot.busy = 0;
        worker.unref();
      });
      worker.unref();
      this.workers.push(slot);
    }
  }

  /**
   * Compresses `ranges` of `chunk`. The chunk's memory moves to the worker and back: the caller
   * gets it again in the result and must not touch the buffer it passed in meanwhile.
   */
  compress(spec: CodecSpec, chunk: Buffer, ranges: [number, number][]): Promise<Compressed> {
    // A Buffer may be a view into a larger pooled ArrayBuffer: give the worker exactly this chunk.
    const own =
      chunk.byteOffset === 0 && chunk.byteLength === chunk.buffer.byteLength
        ? (chunk.buffer as ArrayBuffer)
        : chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.byteLength);
    const slot = this.workers.reduce((a, b) => (b.busy < a.busy ? b : a));
    const id = this.nextId++;
    if (slot.busy++ === 0) slot.worker.ref();
    const spare = this.spare.pop();
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      const job: CompressJob = { id, spec, chunk: own as ArrayBuffer, ranges, spare };
      slot.worker.postMessage(job, spare ? [own as ArrayBuffer, spare] : [own as ArrayBuffer]);
    });
  }

  /** Gives an output's memory back for later jobs; the caller must not use it afterwards. */
  release(output: Buffer): void {
    const ab = output.buffer as ArrayBuffer;
    if (output.byteOffset === 0 && this.spare.length < this.size * 4) this.spare.push(ab);
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.worker.terminate()));
  }
}
