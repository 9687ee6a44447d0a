/**
 * Typed errors. Each reaches the user as one line, `vmferry: FILE: problem`, and the exit code
 * documented in README.md. Anything else escaping to the CLI is a bug.
 */
export class VmferryError extends Error {
  /** Process exit code for commands that do not define their own (qemu-img uses 1). */
  readonly exitCode: number = 1;
  constructor(
    message: string,
    /** The file the problem is about, named first on the error line. */
    readonly file?: string,
  ) {
    super(message);
    this.name = new.target.name;
  }
  /** The one line the user sees. */
  describe(): string {
    return this.file ? `${this.file}: ${this.message}` : this.message;
  }
}

/** The image's bytes break the format's rules (bad magic, out-of-range field, truncated table). */
export class CorruptImageError extends VmferryError {}

/** A valid image using a feature vmferry does not implement (unknown incompatible bit, etc.). */
export class UnsupportedFeatureError extends VmferryError {}

/** A reference leaving the image's folder (backing file, extent, data file, parent locator). */
export class UnsafeReferenceError extends VmferryError {}

/** A referenced file (backing file, extent, parent) cannot be found. */
export class MissingFileError extends VmferryError {}

/** Bad command line or option value. */
export class UsageError extends VmferryError {}

/** The format named with -f does not match what the content probes as, or the content is ambiguous. */
export class FormatMismatchError extends VmferryError {}

/** A system-level failure (permission, disk full) while reading or writing. */
export class IoError extends VmferryError {}

/** Wraps Node's fs errors into a one-line IoError naming the file. */
export function ioError(err: unknown, file: string): VmferryError {
  if (err instanceof VmferryError) return err;
  const e = err as NodeJS.ErrnoException;
  const text: Record<string, string> = {
    ENOENT: 'No such file or directory',
    EACCES: 'Permission denied',
    EISDIR: 'Is a directory',
    ENOSPC: 'No space left on device',
    EROFS: 'Read-only file system',
    EEXIST: 'File exists',
    ENOTDIR: 'Not a directory',
    EPERM: 'Operation not permitted',
  };
  if (e?.code === 'ENOENT') return new MissingFileError(text.ENOENT, file);
  const message = (e?.code && text[e.code]) || e?.message || String(err);
  return new IoError(message, file);
}
