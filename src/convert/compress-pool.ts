import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { VmferryError } from '../disk/errors.js';
import type { CodecSpec } from '../disk/types.js';
import type { CompressDone, CompressJob } from './compress-worker.js';

interface Pending {
  resolve: (r: { chunk: Buffer; outputs: Buffer[] }) => void;
  reject: (e: Error) => void;
}

/**
 * A pool of worker threads, one per core, compressing units of data chunks. Jobs go to the least
 * busy worker; results come back with the chunk (transferred, not copied, both ways).
 */
export class CompressPool {
  private readonly workers: { worker: Worker; busy: number }[] = [];
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;

  constructor(readonly size = Math.max(1, availableParallelism())) {
    for (let i = 0; i < size; i++) {
      const worker = new Worker(new URL('./compress-worker.js', import.meta.url));
      const slot = { worker, busy: 0 };
      worker.on('message', (done: CompressDone) => {
        slot.busy--;
        // An idle pool must not keep the process alive; a busy one must (the caller awaits it).
        if (slot.busy === 0) worker.unref();
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
        p.resolve({ chunk: Buffer.from(done.chunk), outputs });
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
  compress(spec: CodecSpec, chunk: Buffer, ranges: [number, number][]): Promise<{ chunk: Buffer; outputs: Buffer[] }> {
    // A Buffer may be a view into a larger pooled ArrayBuffer: give the worker exactly this chunk.
    const own =
      chunk.byteOffset === 0 && chunk.byteLength === chunk.buffer.byteLength
        ? (chunk.buffer as ArrayBuffer)
        : chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.byteLength);
    const slot = this.workers.reduce((a, b) => (b.busy < a.busy ? b : a));
    const id = this.nextId++;
    if (slot.busy++ === 0) slot.worker.ref();
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      const job: CompressJob = { id, spec, chunk: own as ArrayBuffer, ranges };
      slot.worker.postMessage(job, [own as ArrayBuffer]);
    });
  }

  async close(): Promise<void> {
    await Promise.all(this.workers.map((w) => w.worker.terminate()));
  }
}
