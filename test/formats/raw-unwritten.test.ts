/**
 * How a raw file's extents are found. Unwritten extents (allocated by fallocate, reading as zeros)
 * are zero extents, even once their pages are cached and SEEK_DATA reports them as data; data
 * written into such an extent and not yet written back is still data; where FIEMAP is missing
 * (tmpfs), SEEK_DATA/SEEK_HOLE find the holes. Judges: the layout the test itself made with
 * util-linux fallocate, e2fsprogs' filefrag, and qemu-img (compare, and map).
 */
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, mkdtempSync, openSync, readFileSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { type TestContext, test } from 'node:test';
import { nativeHelper } from '../../src/disk/native.js';
import { openImage } from '../../src/disk/registry.js';
import type { Extent } from '../../src/disk/types.js';
import '../../src/formats/index.js';
import { allocatedRanges } from '../helpers/images.js';
import { qemuImg, runOk, tmpDir, vmferryBin } from '../helpers/index.js';
import { patternBuffer } from '../helpers/pattern.js';

const MiB = 1024 * 1024;

/** 8 MiB: pattern data at [0, 1) and [7, 8) MiB, a hole between, and [2, 6) MiB fallocated. */
function preallocatedRaw(dir: string): string {
  const path = join(dir, 'prealloc.raw');
  const fd = openSync(path, 'w');
  writeSync(fd, patternBuffer(MiB, 21), 0, MiB, 0);
  writeSync(fd, patternBuffer(MiB, 22), 0, MiB, 7 * MiB);
  closeSync(fd);
  runOk('fallocate', ['--offset', String(2 * MiB), '--length', String(4 * MiB), path]);
  return path;
}

/** The output's data ranges, as qemu-img maps them. */
function qemuDataRanges(path: string): [number, number][] {
  const map = JSON.parse(qemuImg('map', '--output=json', path)) as { start: number; length: number; data: boolean }[];
  return map.filter((e) => e.data).map((e) => [e.start, e.start + e.length]);
}

const overlaps = (ranges: [number, number][], from: number, to: number) => ranges.some(([s, e]) => s < to && from < e);

/**
 * preallocatedRaw in a new temp folder; null (the test skipped) where that folder's file system
 * reports no unwritten extents (ext4, xfs and btrfs do; tmpfs does not) or the helper is not built.
 */
function fixture(t: TestContext): { dir: string; path: string } | null {
  const dir = tmpDir('vmferry-unwritten-');
  const path = preallocatedRaw(dir);
  const native = nativeHelper();
  const fd = openSync(path, 'r');
  try {
    const allocation = native?.allocation(fd, 0, 8 * MiB);
    if (allocation?.some((v, i) => i % 3 === 2 && v === 0)) return { dir, path };
  } finally {
    closeSync(fd);
  }
  t.skip('the temp folder is on a file system without FIEMAP (or the native helper is not built)');
  return null;
}

test('unwritten extents read once (cached) still map and convert as zeros', async (t) => {
  const made = fixture(t);
  if (!made) return;
  const { dir, path } = made;
  // Cache the extent's pages: ext4's SEEK_DATA then reports it as data (what made copies read it).
  assert.ok(
    readFileSync(path)
      .subarray(2 * MiB, 6 * MiB)
      .every((b) => b === 0),
  );
  const reader = await openImage(path, {});
  try {
    const extents: Extent[] = [];
    for await (const e of reader.extents()) extents.push(e);
    const zeroAt = (pos: number) => extents.some((e) => e.kind === 'zero' && e.offset <= pos && pos < e.offset + e.length);
    for (let pos = 2 * MiB; pos < 6 * MiB; pos += MiB) assert.ok(zeroAt(pos), `the fallocated MiB at ${pos} maps as zero`);
    const dataAt = (pos: number) => extents.some((e) => e.kind === 'data' && e.offset <= pos && pos < e.offset + e.length);
    assert.ok(dataAt(0) && dataAt(7 * MiB + 4096), 'the written MiBs map as data');
  } finally {
    await reader.close();
  }
  const out = join(dir, 'out.qcow2');
  runOk(process.execPath, [vmferryBin, 'convert', '-O', 'qcow2', path, out]);
  qemuImg('compare', '-f', 'raw', '-F', 'qcow2', path, out);
  assert.ok(!overlaps(qemuDataRanges(out), 2 * MiB, 6 * MiB), 'no cluster of the fallocated range is stored');
});

test('data written into an unwritten extent and not yet written back is copied', async (t) => {
  const made = fixture(t);
  if (!made) return;
  const { dir, path } = made;
  // Only in the page cache: the extent stays flagged unwritten until write-back converts it.
  const fd = openSync(path, 'r+');
  writeSync(fd, patternBuffer(64 * 1024, 23), 0, 64 * 1024, 3 * MiB + 8192);
  closeSync(fd);
  const out = join(dir, 'out.qcow2');
  runOk(process.execPath, [vmferryBin, 'convert', '-O', 'qcow2', path, out]);
  qemuImg('compare', '-f', 'raw', '-F', 'qcow2', path, out);
  assert.ok(overlaps(qemuDataRanges(out), 3 * MiB + 8192, 3 * MiB + 8192 + 64 * 1024), 'the written piece is stored');
});

test('extents past one FIEMAP batch (600 of them) are all listed, data and unwritten, as filefrag lists them', (t) => {
  const native = nativeHelper();
  if (!native) {
    t.skip('the native helper is not built');
    return;
  }
  const path = join(tmpDir('vmferry-unwritten-'), 'many.raw');
  const fd = openSync(path, 'w');
  try {
    // 300 written 64 KiB pieces, each followed by 64 KiB made an unwritten extent.
    for (let i = 0; i < 300; i++) {
      writeSync(fd, patternBuffer(64 * 1024, 40 + i), 0, 64 * 1024, i * 256 * 1024);
      native.preallocate(fd, i * 256 * 1024 + 128 * 1024, 64 * 1024);
    }
  } finally {
    closeSync(fd);
  }
  const rd = openSync(path, 'r');
  try {
    // Asked for batch by batch, as the raw reader does: at most 256 extents an answer.
    const found: number[] = [];
    for (let pos = 0; pos < 300 * 256 * 1024; ) {
      const batch = native.allocation(rd, pos, 300 * 256 * 1024);
      if (batch === null) {
        t.skip('the temp folder is on a file system without FIEMAP');
        return;
      }
      if (batch.length === 0) break;
      assert.ok(batch.length <= 256 * 3, `${batch.length / 3} extents in one answer`);
      found.push(...batch);
      pos = batch.at(-2)!;
    }
    const expected = allocatedRanges(path);
    assert.equal(
      expected.filter(([, , written]) => written === 0).length,
      300,
      'filefrag lists the 300 unwritten extents the test made',
    );
    assert.deepEqual(found, expected.flat());
  } finally {
    closeSync(rd);
  }
});

test('without FIEMAP (tmpfs) holes are found by SEEK_DATA and SEEK_HOLE, as qemu-img maps them', async (t) => {
  const native = nativeHelper();
  const dir = mkdtempSync('/dev/shm/vmferry-seek-');
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, 'sparse.raw');
  const fd = openSync(path, 'w');
  try {
    ftruncateSync(fd, 16 * MiB);
    for (const at of [0, 3 * MiB + 4096, 9 * MiB, 16 * MiB - 8192]) writeSync(fd, patternBuffer(8192, at), 0, 8192, at);
    if (!native || native.allocation(fd, 0, 16 * MiB) !== null) {
      t.skip('/dev/shm answers FIEMAP here (or the native helper is not built): the seek path is not the one taken');
      return;
    }
  } finally {
    closeSync(fd);
  }
  const reader = await openImage(path, {});
  const data: [number, number][] = [];
  try {
    for await (const e of reader.extents()) if (e.kind === 'data') data.push([e.offset, e.offset + e.length]);
  } finally {
    await reader.close();
  }
  const map = JSON.parse(qemuImg('map', '--output=json', '-f', 'raw', path)) as {
    start: number;
    length: number;
    data: boolean;
  }[];
  assert.deepEqual(
    data,
    map.filter((e) => e.data).map((e) => [e.start, e.start + e.length]),
  );
  assert.equal(data.length, 4);
});
