import { closeSync, constants, read as fsRead, fstatSync, openSync, type Stats } from 'node:fs';
import { CorruptImageError, IoError, ioError, VmferryError } from './errors.js';
import { nativeHelper } from './native.js';

/** Positioned reads of some bytes: a file, an OVA member, an HTTP range endpoint, an NBD export. */
export interface ByteSource {
  readonly name: string;
  readonly size: number;
  /** Reads exactly `length` bytes; bytes past the end read as zeros (`readExact` refuses them). */
  read(position: number, length: number, into?: Buffer): Promise<Buffer>;
  close(): Promise<void>;
}

/** One pread on the thread pool: the number of bytes read (0 at the end of the file). */
export function preadOnce(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fsRead(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/** Memory of the buffers readWindow made: FileSource.read maps file pages into them. */
const windows = new WeakSet<ArrayBufferLike>();

/** Where a stretch of a window's memory maps a file: bytes [start, end) of the window are the source's at position. */
interface MappedRange {
  start: number;
  end: number;
  source: FileSource;
  position: number;
}

/** The file ranges each window maps since it was last handed out (see forgetMappings). */
const mappings = new WeakMap<ArrayBufferLike, MappedRange[]>();

/**
 * Drops what a window is known to map. Its owner calls this before it reuses the window for a new
 * read: code that writes into a window (a reader filling zeros) does not say so, and a stale
 * record would name file bytes that are no longer what the memory holds.
 */
export function forgetMappings(window: Buffer): void {
  mappings.delete(window.buffer);
}

/**
 * The file bytes `data` (a view of a window) maps, when all of it lies in one range that
 * FileSource.read mapped since the window's last forgetMappings: an output can then copy them
 * file to file (sink.ts) instead of from memory.
 */
export function mappedOrigin(data: Buffer): { source: FileSource; position: number } | null {
  const ranges = mappings.get(data.buffer);
  if (!ranges) return null;
  const start = data.byteOffset;
  const end = start + data.length;
  for (const r of ranges) {
    if (r.start <= start && end <= r.end) return { source: r.source, position: r.position + (start - r.start) };
  }
  return null;
}

function recordMapping(into: Buffer, length: number, source: FileSource | null, position: number): void {
  const start = into.byteOffset;
  const end = start + length;
  const kept: MappedRange[] = [];
  // Whatever part of an earlier range this read does not cover still maps what it did.
  for (const r of mappings.get(into.buffer) ?? []) {
    if (r.end <= start || r.start >= end) kept.push(r);
    else {
      if (r.start < start) kept.push({ ...r, end: start });
      if (r.end > end) kept.push({ start: end, end: r.end, source: r.source, position: r.position + (end - r.start) });
    }
  }
  if (source !== null) kept.push({ start, end, source, position });
  mappings.set(into.buffer, kept);
}

/**
 * A read buffer for bulk copies. With the native helper, reading a regular file into it maps the
 * file's pages there (copy-on-write) instead of copying them: the data then crosses memory once,
 * on its way to the output, instead of twice. Otherwise an ordinary buffer.
 */
export function readWindow(length: number): Buffer {
  const native = nativeHelper();
  if (!native) return Buffer.allocUnsafeSlow(length);
  const buf = native.mapWindow(length);
  windows.add(buf.buffer);
  return buf;
}

/** A file opened read-only: a source image is never written to. */
export class FileSource implements ByteSource {
  private closed = false;
  /** Copies still reading from the descriptor (an output's file-to-file copies): close waits for them. */
  private readonly users = new Set<Promise<void>>();
  private constructor(
    readonly name: string,
    readonly fd: number,
    readonly size: number,
    readonly stats: Stats,
  ) {}

  static open(path: string): FileSource {
    let fd: number;
    try {
      fd = openSync(path, constants.O_RDONLY);
    } catch (err) {
      throw ioError(err, path);
    }
    const stats = fstatSync(fd);
    if (stats.isDirectory()) {
      closeSync(fd);
      throw new IoError('Is a directory', path);
    }
    return new FileSource(path, fd, stats.size, stats);
  }

  async read(position: number, length: number, into?: Buffer): Promise<Buffer> {
    // Only whole-file ranges: a mapped page wholly past the end of the file would fault on access
    // (SIGBUS). For the same reason a source must not be truncated while it is copied, which would
    // make any copy of it wrong anyway.
    if (into && windows.has(into.buffer)) {
      if (this.stats.isFile() && position + length <= this.size && length > 0) {
        if (nativeHelper()!.mapFile(into, this.fd, position, length)) {
          recordMapping(into, length, this, position);
          return into.subarray(0, length);
        }
      }
      recordMapping(into, length, null, 0);
    }
    const buf = into ?? Buffer.allocUnsafe(length);
    let done = 0;
    try {
      while (done < length) {
        const n = await preadOnce(this.fd, buf, done, length - done, position + done);
        if (n === 0) break;
        done += n;
      }
    } catch (err) {
      throw ioError(err, this.name);
    }
    if (done < length) buf.fill(0, done, length);
    return buf;
  }

  /** Keeps the descriptor open until `work` (which must not reject) is done with it. */
  holdOpen(work: Promise<void>): void {
    this.users.add(work);
    work.then(() => this.users.delete(work));
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // A closed number could be reused by the next open, and a copy would read that file instead.
    while (this.users.size > 0) await Promise.all(this.users);
    closeSync(this.fd);
  }
}

/** Reads a structure that must lie wholly inside the source; a truncated file is corrupt. */
export async function readExact(
  source: ByteSource,
  position: number,
  length: number,
  what: string,
  into?: Buffer,
): Promise<Buffer> {
  if (!Number.isSafeInteger(position) || position < 0 || length < 0 || position + length > source.size) {
    throw new CorruptImageError(
      `${what} at offset ${position} (${length} bytes) lies beyond the end of the file (${source.size} bytes); the image is truncated or corrupt`,
      source.name,
    );
  }
  return source.read(position, length, into);
}

/** A source viewed through a window, e.g. an OVA member or a partition. */
export class SliceSource implements ByteSource {
  constructor(
    private readonly inner: ByteSource,
    private readonly start: number,
    readonly size: number,
    readonly name: string = inner.name,
  ) {
    if (start < 0 || start + size > inner.size) {
      throw new VmferryError(`slice [${start}, ${start + size}) lies outside ${inner.size} bytes`, inner.name);
    }
  }
  async read(position: number, length: number, into?: Buffer): Promise<Buffer> {
    const buf = into ?? Buffer.allocUnsafe(length);
    const inside = Math.max(0, Math.min(length, this.size - position));
    if (inside > 0) await this.inner.read(this.start + position, inside, buf.subarray(0, inside));
    if (inside < length) buf.fill(0, inside, length);
    return buf;
  }
  async close(): Promise<void> {}
}
