/** CRC-32C (Castagnoli, reflected polynomial 0x82f63b78), as VHDX checksums use it. */
import { nativeHelper } from '../../disk/native.js';

/** Built on first use: with the native helper they are never needed, and building them took 0.3 ms of every start. */
let tables: Uint32Array[] | undefined;

function buildTables(): Uint32Array[] {
  const t0 = new Uint32Array(256);
  for (let i = 0; i < 256; i++) {
    let c = i;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
    t0[i] = c >>> 0;
  }
  // Slicing-by-4 tables: four bytes per step.
  const built = [t0];
  for (let n = 1; n < 4; n++) {
    const prev = built[n - 1]!;
    const t = new Uint32Array(256);
    for (let i = 0; i < 256; i++) t[i] = ((prev[i]! >>> 8) ^ t0[prev[i]! & 0xff]!) >>> 0;
    built.push(t);
  }
  return built;
}

/**
 * Continues a CRC-32C over `data` (start with crc = 0): in the native helper when it is built
 * (SSE4.2; in JS, the region tables and log of opening or creating a vhdx took 5 ms), else here.
 */
export function crc32c(data: Uint8Array, crc = 0): number {
  const native = nativeHelper();
  return native ? native.crc32c(data, crc) : crc32cPortable(data, crc);
}

/** The portable CRC-32C (slicing by 4), also the reference the native one is tested against. */
export function crc32cPortable(data: Uint8Array, crc = 0): number {
  tables ??= buildTables();
  const [t0, t1, t2, t3] = tables as [Uint32Array, Uint32Array, Uint32Array, Uint32Array];
  let c = ~crc >>> 0;
  let i = 0;
  const n = data.length;
  for (; i + 4 <= n; i += 4) {
    c ^= data[i]! | (data[i + 1]! << 8) | (data[i + 2]! << 16) | (data[i + 3]! << 24);
    c = t3[c & 0xff]! ^ t2[(c >>> 8) & 0xff]! ^ t1[(c >>> 16) & 0xff]! ^ t0[c >>> 24]!;
  }
  for (; i < n; i++) c = t0[(c ^ data[i]!) & 0xff]! ^ (c >>> 8);
  return ~c >>> 0;
}

/** CRC-32C of `buf` computed with the 4-byte checksum field at `at` taken as zero. */
export function crc32cWithZeroField(buf: Buffer, at: number): number {
  let c = crc32c(buf.subarray(0, at));
  c = crc32c(new Uint8Array(4), c);
  return crc32c(buf.subarray(at + 4), c);
}

/** Writes the checksum of `buf` into its field at `at` (little-endian). */
export function stampCrc32c(buf: Buffer, at: number): void {
  buf.writeUInt32LE(0, at);
  buf.writeUInt32LE(crc32c(buf), at);
}
