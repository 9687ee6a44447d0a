const ZERO_BLOCK = Buffer.alloc(64 * 1024);

/** True when every byte of `buf[start, end)` is zero. */
export function isZero(buf: Buffer, start = 0, end = buf.length): boolean {
  let pos = start;
  while (pos < end) {
    const n = Math.min(ZERO_BLOCK.length, end - pos);
    if (buf.compare(ZERO_BLOCK, 0, n, pos, pos + n) !== 0) return false;
    pos += n;
  }
  return true;
}

/** A shared read-only buffer of zeros, at least `length` long when that is at most 64 KiB. */
export function zeroBuffer(length: number): Buffer {
  return length <= ZERO_BLOCK.length ? ZERO_BLOCK.subarray(0, length) : Buffer.alloc(length);
}
