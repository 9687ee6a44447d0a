/**
 * Stream-optimized VMDK sources through the pipeline: grains are handed over undecoded
 * (readPacked) and inflated on the worker pool. Inputs are made by qemu-img and judged by
 * qemu-img (compare, map); the damaged grains are patched in by hand.
 */
import assert from 'node:assert/strict';
import { closeSync, existsSync, ftruncateSync, openSync, readdirSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { deflateSync } from 'node:zlib';
import { storedInto } from '../../src/convert/compress-worker.js';
import '../../src/formats/index.js';
import { openImage } from '../../src/disk/registry.js';
import { patternBuffer, qemuImg, run, tmpDir, vmferry } from '../helpers/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const GRAIN = 64 * KiB;
/** Guest offset of the grain the tests rewrite (inside a run of compressible data). */
const TARGET = 5 * MiB + 3 * GRAIN;

/** 12 MiB: incompressible, compressible and hole runs, more chunks than the read-ahead holds. */
function sourceRaw(dir: string): string {
  const path = join(dir, 'src.raw');
  const fd = openSync(path, 'w');
  ftruncateSync(fd, 12 * MiB);
  writeSync(fd, patternBuffer(4 * MiB, 7), 0, 4 * MiB, 0);
  writeSync(fd, Buffer.alloc(3 * MiB, 'grain text, compressible; '), 0, 3 * MiB, 4 * MiB);
  // [7, 8) MiB stays a hole
  writeSync(fd, patternBuffer(4 * MiB, 8), 0, 4 * MiB, 8 * MiB);
  closeSync(fd);
  return path;
}

function streamVmdk(dir: string): string {
  const out = join(dir, 'src.vmdk');
  qemuImg('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', sourceRaw(dir), out);
  return out;
}

/** File offset of the grain marker for guest offset `guest` (markers: lba u64, size u32, then the stream). */
function findMarker(file: Buffer, guest: number): number {
  const lba = BigInt(guest / 512);
  for (let at = 512; at + 12 <= file.length; at += 512) {
    if (file.readBigUInt64LE(at) === lba && file.readUInt32LE(at + 8) > 0 && file[at + 12] === 0x78) return at;
  }
  throw new Error(`no grain marker for guest offset ${guest}`);
}

test('stream VMDK made by qemu-img -> qcow2 (plain and -c): equal to the source, grains decoded on the pool', async () => {
  const dir = tmpDir();
  const src = streamVmdk(dir);
  // The reader does hand the grains over undecoded (else the pool path is not what is tested).
  const reader = await openImage(src, {});
  try {
    assert.ok(reader.readPacked);
    const units = await reader.readPacked(4 * MiB, MiB, Buffer.alloc(MiB));
    assert.equal(units.length, MiB / GRAIN);
    assert.ok(units.every((u) => u.codec === 'inflate' && u.packed.length < GRAIN / 4));
    // qemu stores incompressible grains as stored deflate blocks: those take the copy path
    // (storedInto) instead of inflate, and the comparisons below judge its bytes.
    const random = await reader.readPacked(0, MiB, Buffer.alloc(MiB));
    const chunk = Buffer.alloc(GRAIN);
    for (const u of random) {
      const unit = {
        codec: 'inflate' as const,
        start: 0,
        end: u.packed.length,
        at: 0,
        skip: 0,
        length: GRAIN,
        size: GRAIN,
        minSize: GRAIN,
      };
      assert.ok(storedInto(u.packed, unit, chunk), 'an incompressible grain is a stored stream');
    }
  } finally {
    await reader.close();
  }
  for (const extra of [[], ['-c']]) {
    const out = join(dir, `out${extra.join('')}.qcow2`);
    const r = vmferry('convert', ...extra, '-O', 'qcow2', src, out);
    assert.equal(r.code, 0, r.stderr);
    qemuImg('compare', '-f', 'vmdk', '-F', 'qcow2', src, out);
    qemuImg('check', out);
  }
});

test('a compressed grain that inflates to zeros stays unallocated in the output', () => {
  const dir = tmpDir();
  const src = streamVmdk(dir);
  const file = readFileSync(src);
  const at = findMarker(file, TARGET);
  const zeros = deflateSync(Buffer.alloc(GRAIN));
  assert.ok(zeros.length <= file.readUInt32LE(at + 8));
  file.writeUInt32LE(zeros.length, at + 8);
  zeros.copy(file, at + 12);
  writeFileSync(src, file);
  // qemu-img reads the patched grain as zeros: the source now differs from the raw there.
  const raw = join(dir, 'src.raw');
  assert.equal(run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'vmdk', raw, src]).code, 1);
  const out = join(dir, 'out.qcow2');
  const r = vmferry('convert', '-O', 'qcow2', src, out);
  assert.equal(r.code, 0, r.stderr);
  qemuImg('compare', '-f', 'vmdk', '-F', 'qcow2', src, out);
  const map = JSON.parse(qemuImg('map', '--output=json', out)) as { start: number; length: number; data: boolean }[];
  const covering = map.find((m) => m.start <= TARGET && TARGET + GRAIN <= m.start + m.length);
  assert.ok(covering, JSON.stringify(map));
  assert.equal(covering.data, false);
  // Its neighbours are data.
  const before = map.find((m) => m.start <= TARGET - GRAIN && TARGET - GRAIN < m.start + m.length);
  assert.equal(before?.data, true);
});

test('a corrupt grain in the middle: one clear error line, no output file', () => {
  const dir = tmpDir();
  const src = streamVmdk(dir);
  const file = readFileSync(src);
  const at = findMarker(file, TARGET);
  // Keep the zlib header, damage the deflate data after it.
  file.fill(0xff, at + 14, at + 40);
  writeFileSync(src, file);
  const outDir = join(dir, 'out');
  const before = readdirSync(dir).length;
  const out = join(dir, 'out.qcow2');
  const r = vmferry('convert', '-O', 'qcow2', src, out);
  assert.notEqual(r.code, 0);
  const lines = r.stderr.trim().split('\n');
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0]!, new RegExp(`src\\.vmdk.*compressed grain at offset ${at} does not inflate`));
  assert.doesNotMatch(r.stderr, /\n\s+at /);
  assert.equal(existsSync(out), false);
  assert.equal(existsSync(outDir), false);
  assert.equal(readdirSync(dir).length, before, readdirSync(dir).join(' '));
});
