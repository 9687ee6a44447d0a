import { availableParallelism } from 'node:os';
import { Worker } from 'node:worker_threads';
import { VmferryError } from '../disk/errors.js';
import { restoreV8Flags } from '../disk/native.js';
import type { CodecSpec, PackedUnit } from '../disk/types.js';
import type { CompressDone, CompressJob, DecodeUnit, DecompressDone, DecompressJob } from './compress-worker.js';

export interface Compressed {
  /** The chunk that was sent, back from the worker (same memory). */
  chunk: Buffer;
  /** One output per range, views into `output`. */
  outputs: Buffer[];
  /** The memory behind `outputs`: hand it to release() once the outputs are written. */
  output: Buffer;
}

type Pending =
  | { kind: 'compress'; resolve: (r: Compressed) => void; reject: (e: Error) => void }
  | { kind: 'decompress'; units: PackedUnit[]; resolve: (chunk: Buffer) => void; reject: (e: Error) => void };

/** A job waiting for a worker: the message and the memory it moves. */
interface Queued {
  message: CompressJob | DecompressJob;
  transfer: ArrayBuffer[];
}

/**
 * A pool of worker threads, one per core, compressing units of data chunks for writers and
 * decoding readers' packed units into chunks. Each worker holds one job at a time and takes the
 * next from a shared queue when it is done: jobs differ widely in cost (random data compresses
 * several times slower than text), and jobs queued per worker left one worker idle while the
 * other worked through the slow ones (a 1 TiB disk alternating 1 MiB of random data with 1 MiB
 * of text: one worker busy 4.1 s, the other 1.3 s). Chunks move to the worker and back without
 * copies, and output memory is recycled (release()), so a long conversion allocates a few
 * buffers once instead of a gigabyte of garbage the collector would let pile up.
 */
export class CompressPool {
  private readonly workers: { worker: Worker; busy: number }[] = [];
  private readonly queue: Queued[] = [];
  private readonly pending = new Map<number, Pending>();
  private readonly spare: ArrayBuffer[] = [];
  /** Memory for packed input, back from the workers after each decompress job. */
  private readonly spareIn: ArrayBuffer[] = [];
  private nextId = 1;

  constructor(readonly size = Math.max(1, availableParallelism())) {
    restoreV8Flags();
    for (let i = 0; i < size; i++) {
      const worker = new Worker(new URL('./compress-worker.js', import.meta.url));
      const slot = { worker, busy: 0 };
      worker.on('message', (done: CompressDone | DecompressDone) => {
        slot.busy--;
        this.dispatch();
        // An idle pool must not keep the process alive; a busy one must (the caller awaits it).
        if (slot.busy === 0) worker.unref();
        if (done.kind === 'decompress') return this.decompressed(done);
        if (done.unused) this.spare.push(done.unused);
        const p = this.pending.get(done.id);
        if (p?.kind !== 'compress') return;
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
        this.queue.length = 0;
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
    const own = ownMemory(chunk);
    const id = this.nextId++;
    const spare = this.spare.pop();
    return new Promise((resolve, reject) => {
      this.pending.set(id, { kind: 'compress', resolve, reject });
      this.enqueue({ message: { id, spec, chunk: own, ranges, spare }, transfer: spare ? [own, spare] : [own] });
    });
  }

  /**
   * Decodes `units` (guest offsets; `base` is the guest offset of chunk[0]) into their places in
   * `chunk`. The chunk's memory moves to the worker and back, as with compress(): the result is the
   * same memory, filled. A unit that does not decode rejects with that unit's corrupt() error.
   */
  decompress(chunk: Buffer, base: number, units: PackedUnit[]): Promise<Buffer> {
    const own = ownMemory(chunk);
    const list: DecodeUnit[] = [];
    // Units read into one block of their own memory travel with it; others are gathered by copy.
    const shared = units[0]!.packed.buffer;
    const move = units.every((u) => u.movable && u.packed.buffer === shared);
    let packed: ArrayBuffer | undefined;
    let view: Buffer | undefined;
    if (move) packed = shared as ArrayBuffer;
    else {
      let total = 0;
      for (const u of units) total += u.packed.length;
      view = this.packedMemory(total);
      packed = view.buffer as ArrayBuffer;
    }
    let pos = 0;
    for (const u of units) {
      let start = u.packed.byteOffset;
      if (view) {
        start = pos;
        u.packed.copy(view, pos);
        pos += u.packed.length;
      }
      list.push({
        codec: u.codec,
        start,
        end: start + u.packed.length,
        at: u.offset - base,
        skip: u.skip,
        length: u.length,
        size: u.size,
        minSize: u.minSize,
      });
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { kind: 'decompress', units, resolve, reject });
      const message: DecompressJob = { kind: 'decompress', id, chunk: own, packed: packed!, units: list };
      this.enqueue({ message, transfer: [own, packed!] });
    });
  }

  /**
   * Memory for a reader's packed bytes (readPacked's `memory`): a block back from an earlier job
   * when one is large enough, else a new one with room to spare. Fresh blocks for every chunk cost
   * page faults on each and made the collector run for their external memory (dense 1 GiB stream
   * VMDK: 86 scavenges).
   */
  packedMemory(bytes: number): Buffer {
    const i = this.spareIn.findIndex((ab) => ab.byteLength >= bytes);
    const ab = i >= 0 ? this.spareIn.splice(i, 1)[0]! : new ArrayBuffer(bytes + (bytes >> 3));
    return Buffer.from(ab, 0, bytes);
  }

  private decompressed(done: DecompressDone): void {
    const p = this.pending.get(done.id);
    if (p?.kind !== 'decompress') return;
    if (this.spareIn.length < this.size * 4) this.spareIn.push(done.packed);
    this.pending.delete(done.id);
    const f = done.failed;
    if (done.error) p.reject(new VmferryError(`decompression failed: ${done.error}`));
    else if (f) p.reject(p.units[f.index]!.corrupt(f.reason !== undefined ? { reason: f.reason } : { decoded: f.decoded ?? 0 }));
    else p.resolve(Buffer.from(done.chunk));
  }

  private enqueue(job: Queued): void {
    this.queue.push(job);
    this.dispatch();
  }

  /** Hands queued jobs to idle workers, in order; a worker with a job is kept referenced. */
  private dispatch(): void {
    for (const slot of this.workers) {
      if (this.queue.length === 0) return;
      if (slot.busy > 0) continue;
      const job = this.queue.shift()!;
      slot.busy++;
      slot.worker.ref();
      slot.worker.postMessage(job.message, job.transfer);
    }
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

/** A Buffer may be a view into a larger pooled ArrayBuffer: give the worker exactly this memory. */
function ownMemory(chunk: Buffer): ArrayBuffer {
  return (
    chunk.byteOffset === 0 && chunk.byteLength === chunk.buffer.byteLength
      ? chunk.buffer
      : chunk.buffer.slice(chunk.byteOffset, chunk.byteOffset + chunk.byteLength)
  ) as ArrayBuffer;
}
