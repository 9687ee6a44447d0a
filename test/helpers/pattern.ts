/**
 * Reproducible incompressible bytes, shared by the tests, the benchmark workloads and the fuzzer's
 * seeds (this module imports nothing, so scripts outside the test runner can use it).
 */

/** Fills `size` bytes with a reproducible pseudo-random pattern (xorshift), seedable. */
export function patternBuffer(size: number, seed = 1): Buffer {
  const buf = Buffer.allocUnsafe(size);
  let x = seed >>> 0 || 1;
  for (let i = 0; i + 4 <= size; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    buf.writeUInt32LE(x, i);
  }
  for (let i = size - (size % 4); i < size; i++) buf[i] = i & 0xff;
  return buf;
}
