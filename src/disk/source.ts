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

function preadOnce(fd: number, buf: Buffer, off: number, len: number, pos: number): Promise<number> {
  return new Promise((resolve, reject) => {
    fsRead(fd, buf, off, len, pos, (err, n) => (err ? reject(err) : resolve(n)));
  });
}

/** Memory of the buffers readWindow made: FileSource.read maps file pages into them. */
const windows = new WeakSet<ArrayBufferLike>();

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
    if (into && windows.has(into.buffer) && this.stats.isFile() && position + length <= this.size && length > 0) {
      if (nativeHelper()!.mapFile(into, this.fd, position, length)) return into.subarray(0, length);
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

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
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
