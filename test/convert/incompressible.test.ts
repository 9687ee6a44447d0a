/**
 * Units that deflate cannot shrink are stored without the search (compress-worker.ts). The
 * judges: node's zlib (inflate, and the Adler-32 its own deflate writes), and qemu-img for the
 * images and for how large they should be.
 */
import assert from 'node:assert/strict';
import { statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { constants, deflateSync, gzipSync, inflateRawSync, inflateSync, unzipSync } from 'node:zlib';
import {
  adler32,
  adler32Js,
  looksIncompressible,
  looksIncompressibleJs,
  storedDeflate,
  storedInto,
} from '../../src/convert/compress-worker.js';
import { nativeHelper } from '../../src/disk/native.js';
import { qemuImg, tmpDir, vmferry } from '../helpers/index.js';
import { patternBuffer } from '../helpers/pattern.js';

const KiB = 1024;
const MiB = 1024 * KiB;

test('stored deflate streams inflate to their input, raw and zlib-wrapped, at any length and alignment', () => {
  const big = patternBuffer(300 * KiB, 21);
  for (const at of [0, 1, 2, 3, 4]) {
    for (const len of [0, 1, 3, 4095, 65535, 65536, 65537, 131070, 200000]) {
      const data = big.subarray(at, at + len);
      assert.ok(inflateRawSync(storedDeflate(data, false)).equals(data), `raw ${at}+${len}`);
      assert.ok(inflateSync(storedDeflate(data, true)).equals(data), `zlib ${at}+${len}`);
      // zlib's own deflate ends its stream with the Adler-32 of the input.
      const z = deflateSync(data, { level: 0 });
      assert.equal(adler32(data), z.readUInt32BE(z.length - 4), `adler32 ${at}+${len}`);
      assert.equal(adler32Js(data), z.readUInt32BE(z.length - 4), `adler32Js ${at}+${len}`);
    }
  }
});

test('stored zlib streams decode straight into the chunk exactly as inflate decodes them; anything else is left to inflate', () => {
  const random = patternBuffer(64 * KiB, 33);
  const text = Buffer.alloc(64 * KiB, 'a grain of text that deflate shrinks; ');
  const unit = (packed: Buffer, length: number, at = 100) => ({
    codec: 'inflate' as const,
    start: 7,
    end: 7 + packed.length,
    at,
    skip: 0,
    length,
    size: 64 * KiB,
    minSize: 0,
  });
  const dictionary = Buffer.from('dict');
  // [name, stream, whether every block is a stored one]; what the bytes are is zlib's decoding.
  const cases: [string, Buffer, boolean, (packed: Buffer) => Buffer][] = [
    ['zlib level 0 (only stored blocks)', deflateSync(random, { level: 0 }), true, inflateSync],
    [
      'zlib level 0 with flushes',
      deflateSync(random, { level: 0, chunkSize: 4096, flush: constants.Z_FULL_FLUSH }),
      true,
      inflateSync,
    ],
    ['ours', storedDeflate(random, true), true, inflateSync],
    ['ours, one byte', storedDeflate(random.subarray(0, 1), true), true, inflateSync],
    ['compressed blocks', deflateSync(text), false, inflateSync],
    ['gzip wrapper', gzipSync(random, { level: 0 }), false, unzipSync],
    ['preset dictionary', deflateSync(random, { level: 0, dictionary }), false, (packed) => inflateSync(packed, { dictionary })],
  ];
  for (const [name, packed, stored, decode] of cases) {
    const expected = decode(packed);
    const framed = Buffer.concat([Buffer.alloc(7, 0xee), packed, Buffer.alloc(3, 0xee)]);
    const chunk = Buffer.alloc(100 + expected.length + 50, 0x11);
    assert.equal(storedInto(framed, unit(packed, expected.length), chunk), stored, name);
    if (stored) assert.ok(chunk.subarray(100, 100 + expected.length).equals(expected), `${name}: the bytes`);
  }
  // Damaged or not the size asked for: left to inflate, which then reports it.
  const good = storedDeflate(random, true);
  const badSum = Buffer.from(good);
  badSum[badSum.length - 1]! ^= 1;
  const badLen = Buffer.from(good);
  badLen[4]! ^= 1; // NLEN no longer the complement of LEN
  const chunk = Buffer.alloc(70 * KiB);
  assert.equal(storedInto(badSum, { ...unit(badSum, random.length), start: 0, end: badSum.length }, chunk), false);
  assert.equal(storedInto(badLen, { ...unit(badLen, random.length), start: 0, end: badLen.length }, chunk), false);
  assert.equal(storedInto(good, { ...unit(good, random.length - 1), start: 0, end: good.length }, chunk), false);
  assert.equal(storedInto(good, { ...unit(good, random.length), start: 0, end: good.length - 5 }, chunk), false);
});

test('Adler-32 sums stay exact where they grow fastest: long runs of 0xff', () => {
  // 0xff bytes make both sums grow as fast as they can, the case the periodic modulo is for.
  for (const len of [5551, 5552, 5553, 65536, 300 * KiB]) {
    const data = Buffer.alloc(len, 0xff);
    const z = deflateSync(data, { level: 0 });
    assert.equal(adler32(data), z.readUInt32BE(z.length - 4), `adler32 ${len}`);
    assert.equal(adler32Js(data), z.readUInt32BE(z.length - 4), `adler32Js ${len}`);
  }
  // The native sum takes 16 bytes a step: every length around a step and a reduction, at every
  // alignment, against zlib's own trailer.
  const random = patternBuffer(70 * KiB, 23);
  for (const len of [0, 1, 15, 16, 17, 31, 5551, 5552, 5553, 5568, 11104, 65535, 65536, 70000]) {
    for (const at of [0, 1, 7, 15]) {
      const data = random.subarray(at, at + len);
      const z = deflateSync(data, { level: 0 });
      assert.equal(adler32(data), z.readUInt32BE(z.length - 4), `adler32 ${len} at ${at}`);
    }
  }
});

test('only units without redundancy are taken as incompressible', () => {
  const random = patternBuffer(64 * KiB, 22);
  assert.equal(looksIncompressible(random), true);
  assert.equal(looksIncompressible(Buffer.alloc(64 * KiB, 'ordinary text, as a file system holds it; ')), false);
  assert.equal(looksIncompressible(Buffer.alloc(64 * KiB)), false);
  // Flat byte histogram, but every 4 KiB the same: deflate's matches shrink it to almost nothing.
  assert.equal(looksIncompressible(Buffer.concat(Array(16).fill(random.subarray(0, 4 * KiB)))), false);
  // Random bytes with a text half: deflate saves a lot on the half.
  const half = Buffer.concat([random.subarray(0, 32 * KiB), Buffer.alloc(32 * KiB, 'abc ')]);
  assert.equal(looksIncompressible(half), false);
  assert.ok(deflateSync(half).length < 0.6 * half.length);
  // Too short to judge.
  assert.equal(looksIncompressible(random.subarray(0, 2 * KiB)), false);
});

test('the native check decides as the JavaScript one, at every length and alignment', () => {
  const native = nativeHelper();
  assert.ok(native, 'the native helper is built by npm ci');
  const random = patternBuffer(256 * KiB, 25);
  const text = Buffer.alloc(256 * KiB, 'a line of a log file, 2026-11-26 10:00:00 INFO ok\n');
  const inputs = [
    random,
    text,
    gzipSync(text),
    gzipSync(patternBuffer(200 * KiB, 26)),
    Buffer.concat([random.subarray(0, 128 * KiB), text.subarray(0, 128 * KiB)]),
    Buffer.concat(Array(16).fill(random.subarray(0, 4 * KiB))),
    Buffer.alloc(64 * KiB),
  ];
  let incompressible = 0;
  for (const input of inputs) {
    for (const at of [0, 1, 3, 61]) {
      for (const len of [4095, 4096, 65536, 65537, 200 * KiB]) {
        const data = input.subarray(at, at + len);
        const js = looksIncompressibleJs(data);
        assert.equal(native.looksIncompressible(data), js, `input ${inputs.indexOf(input)} at ${at} length ${data.length}`);
        if (js) incompressible++;
      }
    }
  }
  // Both answers occur, so the comparison covers both branches.
  assert.ok(incompressible > 10);
  assert.equal(looksIncompressible, native.looksIncompressible);
  assert.equal(adler32, native.adler32);
});

test('incompressible data compresses (qcow2 -c, zlib and zstd; streamOptimized VMDK) to what qemu-img makes of it', () => {
  const dir = tmpDir('vmferry-incompressible-');
  const src = join(dir, 'src.raw');
  // Random data, text, and random data again: both kinds of unit in one image.
  writeFileSync(
    src,
    Buffer.concat([patternBuffer(8 * MiB, 23), Buffer.alloc(4 * MiB, 'text that compresses well; '), patternBuffer(4 * MiB, 24)]),
  );
  for (const [name, args] of [
    ['zlib.qcow2', ['-c', '-O', 'qcow2']],
    ['zstd.qcow2', ['-c', '-O', 'qcow2', '-o', 'compression_type=zstd']],
    ['stream.vmdk', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']],
  ] as const) {
    const ours = join(dir, `ours-${name}`);
    const theirs = join(dir, `qemu-${name}`);
    const r = vmferry('convert', ...args, src, ours);
    assert.equal(r.code, 0, r.stderr);
    qemuImg('convert', ...args, src, theirs);
    qemuImg('compare', '-q', src, ours);
    qemuImg('check', ours);
    const ratio = statSync(ours).size / statSync(theirs).size;
    assert.ok(ratio <= 1.02, `${name}: ${statSync(ours).size} bytes against qemu-img's ${statSync(theirs).size}`);
  }
});
