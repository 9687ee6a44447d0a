import {
  closeSync,
  constants,
  write as fsWrite,
  fsyncSync,
  ftruncateSync,
  lstatSync,
  openSync,
  readdir,
  readdirSync,
  renameSync,
  statSync,
  unlinkSync,
  writeSync,
} from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { ioError } from './errors.js';
import { nativeHelper } from './native.js';
import { mappedOrigin, preadOnce } from './source.js';

/** Where a writer's bytes go: a file that appears atomically, or a pipe written in order. */
export interface ByteSink {
  /** The final name the user asked for. */
  readonly name: string;
  /** Only ascending writes (a pipe). */
  readonly sequential: boolean;
  /**
   * No write has reached this offset or beyond, nor did the file hold bytes there when the sink
   * opened it: those bytes read as zeros until written, so a writer need not write zeros there.
   */
  readonly untouchedFrom: number;
  write(data: Buffer, position: number): Promise<void>;
  /** Sets the final length (extends with a hole or, on a pipe, with zeros). */
  setLength(length: number): Promise<void>;
  /** Flush to stable storage; after this only commit() or abort() may follow. */
  flush(): Promise<void>;
  /** Make the result visible under its final name. */
  commit(): Promise<void>;
  /** Remove whatever was written. Safe to call more than once and after commit (then a no-op). */
  abort(): Promise<void>;
}

/**
 * qemu-img's cache modes for an output (-t). Only the flush matters here: every mode but 'unsafe'
 * makes an output durable (fsync of the file and its folder) before it appears under its name;
 * 'unsafe' skips those flushes, as `qemu-img convert` does by default, and leaves it to the kernel's
 * writeback. The rename stays atomic either way.
 */
export const CACHE_MODES = ['none', 'writeback', 'writethrough', 'directsync', 'unsafe'] as const;
export type CacheMode = (typeof CACHE_MODES)[number];

let flushOnCommit = true;
/** Cleared the first time copy_file_range is refused. */
let kernelCopies = true;
/** A background write into bytes [start, end) of an output (a file-to-file copy or a lent write); `done` never rejects. */
interface RunningCopy {
  start: number;
  end: number;
  done: Promise<void>;
}

/** Writes from memory at least this long first preallocate their blocks (the native copies always do). */
const PREALLOCATE_FROM = 1 << 20;

/**
 * Writes up to this long (format metadata: a VHD block's sector bitmap, a grain table) go to the
 * page cache at once, on the calling thread: on the thread pool they queued behind the running
 * copies, and a writer waiting for its bitmap before the block's data stopped the whole copy.
 */
const WRITE_NOW_UP_TO = 64 * 1024;

/** Background writes (file-to-file copies, lent writes) an output runs at a time (libuv's thread pool has four threads). */
const MAX_COPIES = 4;

/**
 * Memory a caller lends to the writes it starts (see lendWrites): those writes run without being
 * waited for, and the memory is the caller's again once settled() resolves.
 */
export class WriteLoan {
  private readonly running = new Set<Promise<void>>();

  /** @internal A lent write; `done` never rejects (a failure is thrown by the sink's next call). */
  add(done: Promise<void>): void {
    this.running.add(done);
    done.then(() => this.running.delete(done));
  }

  /** Resolves once every write lent so far has finished. */
  settled(): Promise<void> {
    return this.running.size === 0 ? Promise.resolve() : Promise.all([...this.running]).then(() => {});
  }
}

let currentLoan: WriteLoan | null = null;

/**
 * Calls `start` and lends `loan` to every file sink write of 1 MiB or more from memory that it
 * starts before its first await: such a write returns once it is queued, up to MAX_COPIES at a
 * time beside the file-to-file copies, instead of when its bytes are in the file. Dense stream
 * VMDK -> qcow2 (1 GiB of decoded grains) took 1.73 s with one pwrite at a time, 1.53 s lent.
 * The caller must leave the memory it passed unchanged until loan.settled(). Only large writes
 * are lent because writers pass their own small scratch buffers through the same call; writes
 * started later (after an await) are waited for as usual.
 */
export function lendWrites<T>(loan: WriteLoan, start: () => Promise<T>): Promise<T> {
  currentLoan = loan;
  try {
    return start();
  } finally {
    currentLoan = null;
  }
}

/** Sets the cache mode of every output this process writes from now on (the library default is durable). */
export function setOutputCacheMode(mode: CacheMode): void {
  flushOnCommit = mode !== 'unsafe';
}

const TEMP_MARK = '.vmferry-tmp-';
const TEMP_PATTERN = /\.vmferry-tmp-(\d+)-[0-9a-f]+$/;
const liveTemps = new Set<string>();

/**
 * 32 random bits in hex for a temp name. Not node:crypto (8 ms of start-up): the name only has to
 * differ from a temp left by a dead process that had the same pid, and O_EXCL refuses a clash.
 */
function tempSuffix(): string {
  return Math.floor(Math.random() * 0x100000000)
    .toString(16)
    .padStart(8, '0');
}

/**
 * The most one write(2) asks for (the native writeAt writes the same steps). A buffered write takes
 * page-cache folios as large as itself, and large ones were slow to get on this project's VMs:
 * writing 1 GiB 256 KiB at a time took 0.17 to 0.24 s, 2 MiB at a time 1.1 to 2.1 s. dense vmdk
 * streamOptimized -> qcow2, whose decoded chunks are written from memory, took 1.5 s after the VM
 * had been idle for 5 s, 0.6 s right after another run, and 0.63 to 0.67 s either way with this.
 */
export const WRITE_STEP = 256 * 1024;

/**
 * Writes all of `buf` at `pos`: in the native helper on the thread pool, 256 KiB a write, its
 * blocks first allocated when `preallocate`; without it, or for what it could not write, through
 * Node (which reports the error).
 */
async function pwrite(fd: number, buf: Buffer, pos: number, preallocate = false): Promise<void> {
  const native = nativeHelper();
  const written = native ? (await native.writeAt(fd, buf, pos, preallocate))[0] : 0;
  if (written === buf.length) return;
  return new Promise((resolve, reject) => {
    const step = (off: number) => {
      fsWrite(fd, buf, off, Math.min(buf.length - off, WRITE_STEP), pos + off, (err, n) => {
        if (err) return reject(err);
        if (off + n < buf.length) return step(off + n);
        resolve();
      });
    };
    step(written);
  });
}

/** Writes all of `buf` at `pos` on the calling thread, WRITE_STEP bytes a write(2) at most. */
export function writeAllSync(fd: number, buf: Buffer, pos: number): void {
  for (let off = 0; off < buf.length; ) off += writeSync(fd, buf, off, Math.min(buf.length - off, WRITE_STEP), pos + off);
}

/** Unlinks `path` when it is a regular file itself (lstat: a symbolic link is left to the rename). */
function removeRegularFile(path: string): void {
  try {
    // A new output's name does not exist yet: no exception for that, the usual case.
    if (lstatSync(path, { throwIfNoEntry: false })?.isFile()) unlinkSync(path);
  } catch {
    // Not there, or not removable: the rename then replaces it or reports why not.
  }
}

/**
 * Copies `length` bytes of file `src` at `srcPos` to `dst` at `dstPos` on the thread pool
 * (copy_file_range where `viaKernel`, see native offloadsCopies), and where the copy is refused
 * (copy_file_range across file systems, an old kernel) or stops short, a read of the rest from the
 * source file and a write of it, which reports the error if there is one.
 */
async function copyFile(
  src: number,
  srcPos: number,
  dst: number,
  dstPos: number,
  length: number,
  viaKernel: boolean,
): Promise<void> {
  const [copied, errno] = await nativeHelper()!.copyRange(src, srcPos, dst, dstPos, length, viaKernel && kernelCopies);
  if (copied === length) return;
  if (viaKernel && errno !== 0 && copied === 0) kernelCopies = false;
  const rest = Buffer.allocUnsafe(length - copied);
  let got = 0;
  while (got < rest.length) {
    const n = await preadOnce(src, rest, got, rest.length - got, srcPos + copied + got);
    if (n === 0) throw new Error('the source file ended during the copy');
    got += n;
  }
  await pwrite(dst, rest, dstPos + copied);
}

/** Whether a process still runs (owners of temp and staging files); EPERM means it does, as another user's. */
export function processAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/**
 * Sweeps of folders this process started (see sweepStaleTemps): a multi-file output (1025
 * extents) sweeps once, not 1025 times.
 */
const sweeps = new Map<string, Promise<void>>();

/**
 * Removes, in the background, the temp files that a killed vmferry left in `dir`: the folder is
 * read on the thread pool, not before the output is opened (a /tmp of 700 names took 1 ms of the
 * start). Outputs wait for it before they commit.
 */
function sweepStaleTemps(dir: string): Promise<void> {
  let sweep = sweeps.get(dir);
  if (!sweep) {
    sweep = new Promise<void>((done) =>
      readdir(dir, (err, names) => {
        if (!err) removeStaleIn(dir, names);
        done();
      }),
    );
    sweeps.set(dir, sweep);
  }
  return sweep;
}

/** Removes temp files that a killed vmferry left in `dir` (their process is gone). */
export function removeStaleTemps(dir: string): string[] {
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return [];
  }
  return removeStaleIn(dir, names);
}

function removeStaleIn(dir: string, names: string[]): string[] {
  const removed: string[] = [];
  for (const name of names) {
    const m = TEMP_PATTERN.exec(name);
    if (!m || processAlive(Number(m[1]))) continue;
    try {
      unlinkSync(join(dir, name));
      removed.push(name);
    } catch {
      // another process may have removed it first
    }
  }
  return removed;
}

/** Unlinks every temp file still open in this process; used by signal handlers. */
export function abortAllTempsSync(): void {
  for (const path of liveTemps) {
    try {
      unlinkSync(path);
    } catch {
      // already gone
    }
  }
  liveTemps.clear();
}

/** Writes to a hidden temp name beside the target and renames it into place when complete. */
export class AtomicFileSink implements ByteSink {
  readonly sequential = false;
  readonly tempPath: string;
  private fd: number | null;
  private state: 'open' | 'flushed' | 'committed' | 'aborted' = 'open';
  /** File-to-file copies still running (see write). */
  private readonly copies: RunningCopy[] = [];
  /** The stale-temp sweep of the output's folder, finished before the output is committed. */
  private sweep: Promise<void> | undefined;
  /**
   * Writes waiting for a place among the copies, woken one per copy that ends. Not Promise.race
   * over the running copies: each copy that ended after another had won a race resolved that
   * race again, which V8 reports to Node, and Node answers with a nextTick each time (147 of
   * them for os raw -> qcow2, 309 for raw -> vpc).
   */
  private readonly placeWaiters: (() => void)[] = [];
  private copyFailure: Error | null = null;
  /** Whether file-to-file copies into this output go by copy_file_range (known once the file is open). */
  private viaKernel = false;
  /** See ByteSink.untouchedFrom: the adopted file's length, then the furthest end of any write. */
  private reach = 0;

  constructor(
    readonly name: string,
    /** Resume: take over this existing temp file (left by a killed process) instead of creating one. */
    adopt?: { tempPath: string; length: number },
  ) {
    const dir = dirname(name);
    if (!adopt) this.sweep = sweepStaleTemps(dir);
    this.tempPath = join(dir, `.${basename(name)}${TEMP_MARK}${process.pid}-${tempSuffix()}`);
    try {
      if (adopt) {
        // Renamed to this process's temp name first, so no stale-temp sweep can remove it.
        renameSync(adopt.tempPath, this.tempPath);
        this.fd = openSync(this.tempPath, constants.O_WRONLY);
        ftruncateSync(this.fd, adopt.length);
        this.reach = adopt.length;
      } else {
        this.fd = openSync(this.tempPath, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o644);
      }
    } catch (err) {
      throw ioError(err, name);
    }
    liveTemps.add(this.tempPath);
    this.viaKernel = nativeHelper()?.offloadsCopies(this.fd) ?? false;
  }

  /** Flushes what was written so far to stable storage and keeps the sink open (checkpoints). */
  async sync(): Promise<void> {
    await this.drain();
    try {
      fsyncSync(this.descriptor);
    } catch (err) {
      throw ioError(err, this.name);
    }
  }

  /** The descriptor, for helpers such as hole punching. */
  get descriptor(): number {
    if (this.fd === null) throw new Error('sink is closed');
    return this.fd;
  }

  get untouchedFrom(): number {
    return this.reach;
  }

  /**
   * Bytes a read window maps from a source file go file to file on the thread pool (copyFile), never
   * through the window's pages: touching those would fault them in, to be unmapped again.
   * Such a copy needs nothing of the caller's memory, so write() returns once it is queued and up
   * to MAX_COPIES run at a time: a copy of a 180 MiB disk spent more time waiting for each of
   * its 200 copies to come back before starting the next than in the copies themselves. Large
   * writes from memory lent by lendWrites run the same way. A later write that overlaps a running
   * one waits for it; flush, sync, setLength and abort wait for all; a failure is thrown by the
   * next call. Small writes (WRITE_NOW_UP_TO) are written at once on the calling thread.
   */
  async write(data: Buffer, position: number): Promise<void> {
    // Taken before any await: only writes started inside lendWrites' call are lent.
    const loan = data.length >= PREALLOCATE_FROM ? currentLoan : null;
    this.throwCopyFailure();
    const end = position + data.length;
    if (end > this.reach) this.reach = end;
    for (const c of [...this.copies]) if (c.start < end && position < c.end) await c.done;
    const origin = mappedOrigin(data);
    if (origin || loan) {
      // Whichever copy ends first frees a place, not the oldest: copies range from 4 KiB to 4 MiB,
      // and waiting for the oldest left threads idle (os raw -> qcow2: 0.127 s, 0.120 s with this).
      while (this.copies.length >= MAX_COPIES) await new Promise<void>((wake) => this.placeWaiters.push(wake));
      const fd = this.descriptor;
      if (origin) {
        const copy = this.track(
          position,
          end,
          copyFile(origin.source.fd, origin.position, fd, position, data.length, this.viaKernel),
        );
        origin.source.holdOpen(copy.done);
      } else {
        loan!.add(this.track(position, end, pwrite(fd, data, position, true)).done);
      }
      return;
    }
    try {
      if (data.length <= WRITE_NOW_UP_TO) {
        writeAllSync(this.descriptor, data, position);
        return;
      }
      await pwrite(this.descriptor, data, position, data.length >= PREALLOCATE_FROM);
    } catch (err) {
      throw ioError(err, this.name);
    }
  }

  /** Runs `work`, which writes bytes [start, end), as one of the sink's background writes (see write). */
  private track(start: number, end: number, work: Promise<void>): RunningCopy {
    const copy: RunningCopy = { start, end, done: Promise.resolve() };
    copy.done = work.then(
      () => this.copyDone(copy),
      (err) => {
        this.copyFailure ??= ioError(err, this.name);
        this.copyDone(copy);
      },
    );
    this.copies.push(copy);
    return copy;
  }

  private copyDone(copy: RunningCopy): void {
    const i = this.copies.indexOf(copy);
    if (i >= 0) this.copies.splice(i, 1);
    this.placeWaiters.shift()?.();
  }

  /** Waits for every running copy (a writer reading its own file back must first); throws the first failure. */
  async drain(): Promise<void> {
    while (this.copies.length > 0) await this.copies[0]!.done;
    this.throwCopyFailure();
  }

  private throwCopyFailure(): void {
    if (this.copyFailure) throw this.copyFailure;
  }

  async setLength(length: number): Promise<void> {
    await this.drain();
    try {
      ftruncateSync(this.descriptor, length);
    } catch (err) {
      throw ioError(err, this.name);
    }
    // Cut bytes read as zeros if the file grows again.
    this.reach = Math.min(this.reach, length);
  }

  async flush(): Promise<void> {
    if (this.state !== 'open') return;
    await this.drain();
    try {
      if (flushOnCommit) fsyncSync(this.descriptor);
      closeSync(this.descriptor);
    } catch (err) {
      throw ioError(err, this.name);
    }
    this.fd = null;
    this.state = 'flushed';
  }

  /** `syncDir` false: the caller syncs the folder once for a group of files (commitAll). */
  async commit(syncDir = true): Promise<void> {
    await this.sweep;
    await this.flush();
    if (this.state !== 'flushed') return;
    try {
      // Renaming over an existing file makes ext4 (auto_da_alloc) start writing the new file's
      // dirty pages back inside rename(): 130 ms for a 180 MiB output here. Without a flush
      // asked for, the old file is removed first, as qemu-img truncates its output at the start.
      if (!flushOnCommit) removeRegularFile(this.name);
      renameSync(this.tempPath, this.name);
      liveTemps.delete(this.tempPath);
      if (syncDir) syncDirectory(dirname(this.name));
    } catch (err) {
      throw ioError(err, this.name);
    }
    this.state = 'committed';
  }

  async abort(): Promise<void> {
    if (this.state === 'committed' || this.state === 'aborted') return;
    // The descriptor must outlive the copies writing through it (a reused number would receive them);
    // their failure no longer matters.
    await this.drain().catch(() => {});
    if (this.fd !== null) {
      try {
        closeSync(this.fd);
      } catch {
        // closing is best effort on the way out
      }
      this.fd = null;
    }
    try {
      unlinkSync(this.tempPath);
    } catch {
      // already gone
    }
    liveTemps.delete(this.tempPath);
    this.state = 'aborted';
  }
}

function syncDirectory(dir: string): void {
  if (flushOnCommit) fsyncDirectory(dir);
}

/** Makes the names in a folder durable (after renames); best effort. */
export function fsyncDirectory(dir: string): void {
  let fd: number | undefined;
  try {
    fd = openSync(dir, constants.O_RDONLY);
    fsyncSync(fd);
  } catch {
    // some file systems refuse fsync on directories; the rename itself is still atomic
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

/** A pipe or character device (stdout): written strictly in order, gaps filled with zeros. */
export class PipeSink implements ByteSink {
  readonly sequential = true;
  private position = 0;
  /** Gaps are sent as zeros (padTo), so only what was written is touched. */
  get untouchedFrom(): number {
    return this.position;
  }
  constructor(
    readonly name: string,
    private readonly fd: number,
  ) {}

  async write(data: Buffer, position: number): Promise<void> {
    if (position < this.position) {
      throw ioError(new Error(`cannot seek backwards on a pipe (to ${position} from ${this.position})`), this.name);
    }
    await this.padTo(position);
    try {
      await pwriteStream(this.fd, data);
    } catch (err) {
      throw ioError(err, this.name);
    }
    this.position += data.length;
  }

  private async padTo(position: number): Promise<void> {
    const zeros = Buffer.alloc(Math.min(1 << 20, Math.max(0, position - this.position)));
    while (this.position < position) {
      const n = Math.min(zeros.length, position - this.position);
      await pwriteStream(this.fd, zeros.subarray(0, n));
      this.position += n;
    }
  }

  async setLength(length: number): Promise<void> {
    await this.padTo(length);
  }
  async flush(): Promise<void> {}
  /** Closes a FIFO this sink opened, so its reader sees end-of-file; stdout stays open. */
  async commit(): Promise<void> {
    this.close();
  }
  async abort(): Promise<void> {
    this.close();
  }
  private closed = false;
  private close(): void {
    if (this.closed || this.fd === 1) return;
    this.closed = true;
    try {
      closeSync(this.fd);
    } catch {
      // already closed
    }
  }
}

function pwriteStream(fd: number, buf: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (off: number) => {
      fsWrite(fd, buf, off, buf.length - off, null, (err, n) => {
        if (err) {
          if ((err as NodeJS.ErrnoException).code === 'EAGAIN') return setTimeout(() => step(off), 5);
          return reject(err);
        }
        if (off + n < buf.length) return step(off + n);
        resolve();
      });
    };
    step(0);
  });
}

/** '-' means standard output; a FIFO or character device is written as a pipe; anything else atomically. */
export function openSink(name: string): ByteSink {
  if (name === '-') return new PipeSink('(stdout)', 1);
  let st: ReturnType<typeof statSync> | undefined;
  try {
    st = statSync(name, { throwIfNoEntry: false });
  } catch {
    st = undefined;
  }
  if (st && (st.isFIFO() || st.isCharacterDevice())) {
    try {
      return new PipeSink(name, openSync(name, constants.O_WRONLY));
    } catch (err) {
      throw ioError(err, name);
    }
  }
  return new AtomicFileSink(name);
}

/** Commits several sinks as one result: all flushed first, then renamed in the given order. */
export async function commitAll(sinks: ByteSink[]): Promise<void> {
  for (const s of sinks) await s.flush();
  const dirs = new Set<string>();
  for (const s of sinks) {
    if (s instanceof AtomicFileSink) {
      await s.commit(false);
      dirs.add(dirname(s.name));
    } else await s.commit();
  }
  for (const d of dirs) syncDirectory(d);
}
