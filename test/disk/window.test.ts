/**
 * Mapped read windows (readWindow + FileSource.read): the bytes are the file's, whatever path the
 * read takes (mapped when aligned, copied otherwise), and writing into a window never reaches the
 * source file. The expected bytes come from node's own readFileSync, not from the code under test.
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { nativeHelper } from '../../src/disk/native.js';
import { FileSource, readWindow } from '../../src/disk/source.js';
import { sha256, tmpDir } from '../helpers/index.js';
import { patternBuffer } from '../helpers/pattern.js';

const MiB = 1024 * 1024;

function sourceFile(size: number): string {
  const path = join(tmpDir('vmferry-window-'), 'src.raw');
  writeFileSync(path, patternBuffer(size, 7));
  return path;
}

test('the native helper is built (CI builds it; without it windows are plain buffers)', () => {
  assert.ok(nativeHelper(), 'native/build/Release/vmferry_native.node was not built');
});

test('reads into a window return the file bytes: aligned, unaligned, reused, at the end of the file', async () => {
  const size = 3 * MiB + 1234; // the last page is partial
  const path = sourceFile(size);
  const expected = readFileSync(path);
  const src = FileSource.open(path);
  const win = readWindow(MiB);
  try {
    // Page aligned (mapped), then unaligned (copied) into the same window, then aligned again.
    for (const [pos, len] of [
      [0, MiB],
      [4096 * 3, 65536],
      [1000, 70000],
      [MiB, MiB],
      [2 * MiB + 8192, size - 2 * MiB - 8192], // up to the last byte of the file
      [2 * MiB + 4096, 512],
    ]) {
      const got = await src.read(pos!, len!, win.subarray(0, len));
      assert.equal(sha256(got), sha256(expected.subarray(pos!, pos! + len!)), `read at ${pos} of ${len}`);
    }
    // A window subarray at a page-aligned offset inside it maps too; one at an odd offset copies.
    for (const at of [65536, 3]) {
      const got = await src.read(8192, 4096, win.subarray(at, at + 4096));
      assert.equal(sha256(got), sha256(expected.subarray(8192, 8192 + 4096)));
    }
    // The aligned reads above took the mapped path: the helper maps such a range, and refuses an
    // unaligned one (which then took the copying path).
    assert.equal(nativeHelper()!.mapFile(win, src.fd, 4096, 4096), true);
    assert.equal(nativeHelper()!.mapFile(win, src.fd, 1000, 4096), false);
    // Past the end of the file: zeros, as for any read (never a mapped page beyond EOF).
    const tail = await src.read(size - 100, 4096, win.subarray(0, 4096));
    assert.equal(sha256(tail.subarray(0, 100)), sha256(expected.subarray(size - 100)));
    assert.ok(tail.subarray(100).every((b) => b === 0));
  } finally {
    await src.close();
  }
});

test('writing into a mapped window changes neither the source file nor later reads', async () => {
  const path = sourceFile(2 * MiB);
  const before = sha256(readFileSync(path));
  const src = FileSource.open(path);
  const win = readWindow(MiB);
  try {
    const got = await src.read(0, MiB, win);
    got.fill(0xee, 0, 4096);
    assert.equal(sha256(readFileSync(path)), before);
    const again = await src.read(0, MiB, readWindow(MiB));
    assert.equal(sha256(again), sha256(readFileSync(path).subarray(0, MiB)));
  } finally {
    await src.close();
  }
});
