import { realpathSync, statSync } from 'node:fs';
import { dirname, isAbsolute, relative, resolve, sep } from 'node:path';
import { MissingFileError, UnsafeReferenceError } from './errors.js';

export interface ReferenceRules {
  /** The user allowed references that leave the image's folder. */
  allowExternalFiles?: boolean;
}

/** What kind of reference it is, for the error line ("backing file", "extent", "parent"). */
export type ReferenceRole = string;

const URL_LIKE = /^[a-z][a-z0-9+.-]*:/i;

/**
 * Resolves a file name that an image stores (backing file, extent, data file, parent locator)
 * next to the image. Refused unless allowed: absolute paths, `..`, symlinks leading out of the
 * folder. Always refused: URLs, `json:` specs, device nodes, FIFOs, directories.
 */
export function resolveReference(imagePath: string, reference: string, role: ReferenceRole, rules: ReferenceRules): string {
  const fail = (why: string) => new UnsafeReferenceError(`${role} '${reference}' ${why}`, imagePath);
  if (reference.length === 0) throw fail('is empty');
  if (reference.includes('\0')) throw fail('contains a NUL byte');
  if (URL_LIKE.test(reference) && !/^[a-zA-Z]:[\\/]/.test(reference)) {
    throw fail('is a URL or protocol specification, which vmferry never follows');
  }
  const folder = dirname(resolve(imagePath));
  const allowed = rules.allowExternalFiles === true;
  if (!allowed) {
    if (isAbsolute(reference) || /^[a-zA-Z]:[\\/]/.test(reference) || reference.startsWith('\\')) {
      throw fail("is an absolute path outside the image's folder; pass --allow-external-files to follow it");
    }
    if (reference.split(/[\\/]/).includes('..')) {
      throw fail("leaves the image's folder (..); pass --allow-external-files to follow it");
    }
  }
  const target = resolve(folder, reference);
  let real: string;
  try {
    real = realpathSync(target);
  } catch {
    throw new MissingFileError(`${role} '${reference}' not found (looked for ${target})`, imagePath);
  }
  if (!allowed) {
    const realFolder = realpathSync(folder);
    const rel = relative(realFolder, real);
    if (rel === '' || rel.startsWith(`..${sep}`) || rel === '..' || isAbsolute(rel)) {
      throw fail("is a symbolic link leading out of the image's folder; pass --allow-external-files to follow it");
    }
  }
  const st = statSync(real);
  if (!st.isFile()) {
    throw fail(st.isDirectory() ? 'is a directory' : 'is not a regular file (device node, FIFO or socket)');
  }
  return real;
}
