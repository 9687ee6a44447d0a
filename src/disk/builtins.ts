import { closeSync, openSync, readSync } from 'node:fs';
import { createRequire } from 'node:module';

/** Made on first use: createRequire parses import.meta.url, whose URL code Node compiles then. */
let requireHere: NodeJS.Require | undefined;
let crypto: typeof import('node:crypto') | undefined;
let zlib: typeof import('node:zlib') | undefined;

function requireBuiltin<T>(name: string): T {
  requireHere ??= createRequire(import.meta.url);
  return requireHere(name) as T;
}

/**
 * node:crypto, loaded on first use: its import costs about 8 ms of every start-up, and most runs
 * (a convert to qcow2 or raw) never need a random id or a digest.
 */
export function nodeCrypto(): typeof import('node:crypto') {
  crypto ??= requireBuiltin<typeof import('node:crypto')>('node:crypto');
  return crypto;
}

/** node:zlib, loaded on first use (only compressed output needs it on the main thread). */
export function nodeZlib(): typeof import('node:zlib') {
  zlib ??= requireBuiltin<typeof import('node:zlib')>('node:zlib');
  return zlib;
}

/**
 * `n` random bytes from the kernel's generator (/dev/urandom), as node:crypto's randomBytes gives
 * them, without importing node:crypto (5 to 8 ms of a start-up that otherwise needs it only for a
 * new image's random id). node:crypto where the device cannot be read.
 */
export function randomBytes(n: number): Buffer {
  const out = Buffer.alloc(n);
  try {
    const fd = openSync('/dev/urandom', 'r');
    try {
      if (readSync(fd, out, 0, n, null) === n) return out;
    } finally {
      closeSync(fd);
    }
  } catch {
    // no such device here
  }
  return nodeCrypto().randomBytes(n);
}
