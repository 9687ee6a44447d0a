/**
 * Clusters of a raw source that hold written zeros (allocated, so mapped as data) are found zero
 * and left unallocated in the output, whether their piece is tested on the main thread (pieces up
 * to 1 MiB) or on the thread pool (larger ones). Judges: qemu-img map of the output, and compare.
 */
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { qemuImg, runOk, tmpDir, vmferryBin } from '../helpers/index.js';
import { patternBuffer } from '../helpers/pattern.js';

const KiB = 1024;
const MiB = 1024 * KiB;

test('written zero clusters in small and large data extents stay unallocated in a qcow2 output', () => {
  const dir = tmpDir('vmferry-zero-clusters-');
  const src = join(dir, 'zeros-inside.raw');
  const fd = openSync(src, 'w');
  ftruncateSync(fd, 16 * MiB);
  // A 512 KiB extent (one small piece) and an 8 MiB one (two 4 MiB pieces), written whole.
  writeSync(fd, patternBuffer(512 * KiB, 91), 0, 512 * KiB, MiB);
  writeSync(fd, patternBuffer(8 * MiB, 92), 0, 8 * MiB, 4 * MiB);
  // Zeros written over whole clusters inside them.
  const zeroRanges: [number, number][] = [
    [MiB + 128 * KiB, MiB + 256 * KiB],
    [5 * MiB, 5 * MiB + 128 * KiB],
    [9 * MiB + 64 * KiB, 9 * MiB + 192 * KiB],
  ];
  for (const [s, e] of zeroRanges) writeSync(fd, Buffer.alloc(e - s), 0, e - s, s);
  closeSync(fd);
  const out = join(dir, 'out.qcow2');
  runOk(process.execPath, [vmferryBin, 'convert', '-O', 'qcow2', src, out]);
  qemuImg('compare', '-f', 'raw', '-F', 'qcow2', src, out);
  const map = JSON.parse(qemuImg('map', '--output=json', out)) as { start: number; length: number; data: boolean }[];
  const data = map.filter((e) => e.data).map((e) => [e.start, e.start + e.length] as const);
  const covered = (s: number, e: number) => data.some(([a, b]) => a < e && s < b);
  for (const [s, e] of zeroRanges) assert.ok(!covered(s, e), `written zeros at [${s}, ${e}) are stored as data`);
  assert.ok(covered(MiB, MiB + 64 * KiB) && covered(MiB + 256 * KiB, MiB + 512 * KiB), 'the small extent’s data is stored');
  assert.ok(covered(4 * MiB, 5 * MiB) && covered(10 * MiB, 12 * MiB), 'the large extent’s data is stored');
});
