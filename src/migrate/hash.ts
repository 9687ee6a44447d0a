/**
 * Guest-content digests through the disk plane: SHA-256 of the bytes a guest sees, computed from
 * the flattened extent map (zero ranges are fed from one shared zero buffer, never read from disk).
 * The same digest `sha256sum` gives for `qemu-img convert -O raw` of the image.
 */
import { createHash } from 'node:crypto';
import { flatExtents } from '../disk/chain.js';
import type { DiskReader } from '../disk/types.js';

const CHUNK = 4 * 1024 * 1024;
const ZEROS = Buffer.alloc(CHUNK);

export interface ContentDigest {
  sha256: string;
  /** Bytes hashed (the guest-visible length). */
  length: number;
  /** Bytes read as data (the rest were zero or holes). */
  dataBytes: number;
}

/**
 * SHA-256 of the first `length` bytes of the guest content (default: all of it). When `length` is
 * shorter than the disk (a target rounded up, as for Azure), the rest is checked too: `tailIsZero`
 * says whether it reads as zeros.
 */
export async function contentDigest(
  reader: DiskReader,
  options: { length?: number; onBytes?: (n: number) => void } = {},
): Promise<ContentDigest & { tailIsZero: boolean }> {
  const length = Math.min(options.length ?? reader.virtualSize, reader.virtualSize);
  const hash = createHash('sha256');
  const buf = Buffer.allocUnsafe(CHUNK);
  let dataBytes = 0;
  for await (const ext of flatExtents(reader, 0, length)) {
    for (let pos = ext.offset; pos < ext.offset + ext.length; ) {
      const n = Math.min(CHUNK, ext.offset + ext.length - pos);
      if (ext.kind === 'zero') hash.update(ZEROS.subarray(0, n));
      else {
        hash.update(await reader.read(pos, n, buf.subarray(0, n)));
        dataBytes += n;
      }
      pos += n;
      options.onBytes?.(n);
    }
  }
  let tailIsZero = true;
  if (length < reader.virtualSize) {
    for await (const ext of flatExtents(reader, length, reader.virtualSize)) {
      if (ext.kind === 'zero') continue;
      for (let pos = ext.offset; pos < ext.offset + ext.length && tailIsZero; ) {
        const n = Math.min(CHUNK, ext.offset + ext.length - pos);
        const data = await reader.read(pos, n, buf.subarray(0, n));
        if (!data.equals(ZEROS.subarray(0, n))) tailIsZero = false;
        pos += n;
      }
    }
  }
  return { sha256: hash.digest('hex'), length, dataBytes, tailIsZero };
}

/** Bytes of guest content stored as data (the rest are zeros or holes), through the chain. */
export async function allocatedBytes(reader: DiskReader): Promise<number> {
  let n = 0;
  for await (const ext of flatExtents(reader)) if (ext.kind === 'data') n += ext.length;
  return n;
}
