import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
let crypto: typeof import('node:crypto') | undefined;
let zlib: typeof import('node:zlib') | undefined;

/**
 * node:crypto, loaded on first use: its import costs about 8 ms of every start-up, and most runs
 * (a convert to qcow2 or raw) never need a random id or a digest.
 */
export function nodeCrypto(): typeof import('node:crypto') {
  crypto ??= require('node:crypto') as typeof import('node:crypto');
  return crypto;
}

/** node:zlib, loaded on first use (only compressed output needs it on the main thread). */
export function nodeZlib(): typeof import('node:zlib') {
  zlib ??= require('node:zlib') as typeof import('node:zlib');
  return zlib;
}
