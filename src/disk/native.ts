import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The optional C helper (native/): allocated and unwritten extents (FIEMAP), SEEK_DATA/SEEK_HOLE, hole punching, mapped read windows, file-to-file copies, preallocation, zero tests (on the calling thread or the pool), Adler-32, CRC-32C, the incompressibility test, V8 flags. */
export interface NativeHelper {
  /** Next data (which = 0) or hole (which = 1) offset at or after `offset`; -1 when none. */
  seek(fd: number, offset: number, which: 0 | 1): number;
  /**
   * The file's first allocated extents within [from, to) (at most 256: ask again from the last
   * end; an empty answer means none is left), as flat [start, end, written, ...] triples in order:
   * written 1 for data, 0 for an unwritten extent (allocated, reading as zeros); the gaps are holes.
   * Null when the file system cannot say (no FIEMAP). Dirty pages are written back first, so data
   * written into an unwritten extent, or not yet allocated, is never missed.
   */
  allocation(fd: number, from: number, to: number): number[] | null;
  punchHole(fd: number, offset: number, length: number): boolean;
  /** Page-aligned private memory that mapFile can point at a file's pages. */
  mapWindow(length: number): Buffer;
  /**
   * Maps file bytes [offset, offset + length) copy-on-write over buffer[0, length); false when the
   * buffer or offset is not page aligned or the kernel refuses (read the ordinary way then).
   */
  mapFile(buffer: Buffer, fd: number, offset: number, length: number): boolean;
  /**
   * A file-to-file copy on the thread pool: [bytes copied, errno]; errno 0 with fewer bytes than
   * asked means the source ended. The caller writes what is left itself. viaKernel: by
   * copy_file_range; otherwise read into a small per-thread buffer and written from it.
   */
  copyRange(
    srcFd: number,
    srcPos: number,
    dstFd: number,
    dstPos: number,
    length: number,
    viaKernel: boolean,
  ): Promise<[number, number]>;
  /**
   * Writes the whole buffer at `position` on the thread pool, 256 KiB a write(2) (see sink.ts,
   * WRITE_STEP): [bytes written, errno]. The caller writes what is left itself.
   * preallocate: the range's whole blocks are allocated first, as preallocate does.
   */
  writeAt(fd: number, buffer: Buffer, position: number, preallocate: boolean): Promise<[number, number]>;
  /** Whether copy_file_range into this file can share blocks or copy on a server (btrfs, xfs, nfs...), where copyRange should use it. */
  offloadsCopies(fd: number): boolean;
  /**
   * Allocates the whole blocks of a range about to be overwritten as unwritten extents (reading as
   * zero), so the write does not reserve delayed allocation page by page. Best effort.
   */
  preallocate(fd: number, offset: number, length: number): void;
  /** 1 when the file's bytes [position, position + length) are all zero, 0 when not, -1 when unreadable. */
  zeroAt(fd: number, position: number, length: number): number;
  /**
   * zeroAt for each cluster of [position, position + length) on the thread pool: one flag per
   * cluster (1 zero, 0 data); the first cluster is `first` bytes long, the others `unit` (the last
   * may be shorter). Null when some bytes cannot be read.
   */
  zeroMap(fd: number, position: number, length: number, first: number, unit: number): Promise<Buffer | null>;
  /** CRC-32C (Castagnoli) of the bytes, continuing `crc` (0 to start). */
  crc32c(data: Uint8Array, crc: number): number;
  /** Sets V8 flags for this process, as on node's command line (V8's own SetFlagsFromString). */
  setV8Flags(flags: string): void;
  /** Ends the process with `code` at once, without Node's teardown (_exit). */
  exitNow(code: number): never;
  /** The V8 data of a code cache file (cli/code-cache.ts), or null when missing, damaged or for another version of the chunk. */
  readCodeCache(path: string, chunkSize: number, chunkMtimeMs: number): Buffer | null;
  /** The Adler-32 (RFC 1950) of the bytes. */
  adler32(data: Buffer): number;
  /** compress-worker.ts's looksIncompressible in C. */
  looksIncompressible(data: Buffer): boolean;
}

let cached: NativeHelper | null | undefined;

/** Null when the helper was not built; callers then use portable code. */
export function nativeHelper(): NativeHelper | null {
  if (cached !== undefined) return cached;
  try {
    // process.dlopen, not require: the same load without require's resolution of the path (0.4 ms
    // of every start). import.meta.dirname (Node 20.11 on; a plain path in the CLI bundle) spares
    // parsing import.meta.url, whose URL code Node compiles on first use (0.3 to 0.6 ms).
    const addon = { exports: {} as NativeHelper };
    const here = import.meta.dirname ?? dirname(fileURLToPath(import.meta.url));
    process.dlopen(addon, join(here, '../../../native/build/Release/vmferry_native.node'));
    cached = addon.exports;
  } catch {
    cached = null;
  }
  return cached;
}

let flagsToRestore: string | null = null;
let flagsRestored = false;

/**
 * Sets V8 flags for the main thread's run (false without the native helper); restoreV8Flags()
 * puts `defaults` back. Worker threads have to start under V8's own flags: Node gives a new worker
 * its built-in modules from a code cache that V8 keys by the flags, and under other flags each
 * worker compiled them afresh (45 to 50 ms of CPU per worker on dense stream VMDK -> qcow2).
 */
export function setV8FlagsUntilWorkers(flags: string, defaults: string): boolean {
  const native = nativeHelper();
  if (!native) return false;
  native.setV8Flags(flags);
  flagsToRestore = defaults;
  return true;
}

/** V8's own flags again, before a worker thread starts (see setV8FlagsUntilWorkers). */
export function restoreV8Flags(): void {
  if (flagsToRestore === null) return;
  nativeHelper()?.setV8Flags(flagsToRestore);
  flagsToRestore = null;
  flagsRestored = true;
}

/** Whether restoreV8Flags has put V8's own flags back in this process. */
export function v8FlagsRestored(): boolean {
  return flagsRestored;
}
