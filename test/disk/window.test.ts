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
import { repoRoot, runOk, sha256, tmpDir, underStrace } from '../helpers/index.js';
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

/**
 * 512 KiB of zeros with one non-zero byte in each of these places: the first 4 KiB read, the later
 * large reads, the last byte, and a byte whose 64-byte step is only partly inside a range asked about.
 */
const MARKED_SIZE = 512 * 1024;
function markedFile(prefix: string): string {
  const content = Buffer.alloc(MARKED_SIZE);
  for (const m of [17, 4096, 70000, 200000, MARKED_SIZE - 1]) content[m] = 0x5a;
  const path = join(tmpDir(prefix), 'zeros.raw');
  writeFileSync(path, content);
  return path;
}

test('zeroMap flags each cluster of a range as zeroAt judges it, and refuses unreadable ranges', async () => {
  const native = nativeHelper()!;
  const size = MARKED_SIZE;
  const path = markedFile('vmferry-zero-map-');
  const src = FileSource.open(path);
  try {
    const bytes = readFileSync(path);
    // [position, length, first cluster's length, later clusters' length]: whole and partial first
    // and last clusters, clusters smaller than the 4 KiB first read, and one cluster for it all.
    for (const [pos, len, first, unit] of [
      [0, size, 65536, 65536],
      [1000, size - 1000, 3096, 4096],
      [18, 300000, 100, 65536],
      [4097, 200000, 512, 512],
      [0, size, size, 65536],
      [300000, size - 300000, 1 << 20, 1 << 20],
    ] as const) {
      const expected: number[] = [];
      for (let s = 0; s < len; s = s === 0 ? Math.min(first, len) : Math.min(s + unit, len)) {
        const e = s === 0 ? Math.min(first, len) : Math.min(s + unit, len);
        expected.push(bytes.subarray(pos + s, pos + e).every((b) => b === 0) ? 1 : 0);
      }
      const flags = await native.zeroMap(src.fd, pos, len, first, unit);
      assert.ok(flags, `[${pos}, ${pos + len})`);
      assert.deepEqual([...flags], expected, `[${pos}, ${pos + len}) in ${first}, then ${unit}`);
      assert.ok(expected.includes(0) || len < 70000, 'the layout crosses data');
    }
    // Bytes past the end of the file cannot be read: the caller must look at them itself.
    assert.equal(await native.zeroMap(src.fd, size - 4096, 8192, 4096, 4096), null);
    assert.throws(() => native.zeroMap(src.fd, 0, 4096, 0, 4096), TypeError);
  } finally {
    await src.close();
  }
});

test('zeroAt tells zero file ranges from data anywhere in them, and unreadable ones', async () => {
  const native = nativeHelper()!;
  const size = MARKED_SIZE;
  const path = markedFile('vmferry-zero-at-');
  const src = FileSource.open(path);
  try {
    // Every range is judged against the bytes node's readFileSync sees.
    const bytes = readFileSync(path);
    for (const [pos, len] of [
      [0, size],
      [18, 4078],
      [18, 4079],
      [4097, 65903],
      [4097, 65904],
      [70001, 129999],
      [70001, 130000],
      [200001, size - 200002],
      [200001, size - 200001],
      [300000, 1],
      [size - 1, 1],
      [0, 0],
    ] as const) {
      const expected = bytes.subarray(pos, pos + len).every((b) => b === 0) ? 1 : 0;
      assert.equal(native.zeroAt(src.fd, pos, len), expected, `[${pos}, ${pos + len})`);
    }
    // Past the end of the file nothing can be read: the caller must look at the bytes itself.
    assert.equal(native.zeroAt(src.fd, size, 4096), -1);
    assert.equal(native.zeroAt(src.fd, size - 10, 4096), 0);
  } finally {
    await src.close();
  }
});

/** Pages of `path` in the page cache, as util-linux's fincore counts them. */
function cachedPages(path: string): number {
  return Number(runOk('fincore', ['--bytes', '--noheadings', '--raw', '--output', 'PAGES', path]).trim());
}

test('mapping a window asks the kernel to read ahead only pages that are not cached yet', () => {
  const dir = tmpDir('vmferry-window-');
  const path = join(dir, 'src.raw');
  writeFileSync(path, patternBuffer(8 * MiB, 9));
  // Written back, then dropped from the cache (dd's nocache), as fincore confirms.
  runOk('sync', [path]);
  runOk('dd', [`if=${path}`, 'iflag=nocache', 'count=0', 'status=none']);
  assert.equal(cachedPages(path), 0, 'the file left the page cache');
  const native = join(repoRoot, 'dist/src/disk/native.js');
  // Two 4 MiB windows over the cold file, then the same two once every page has been read.
  const script = `
    import { openSync, readFileSync } from 'node:fs';
    import { nativeHelper } from ${JSON.stringify(native)};
    const n = nativeHelper(), fd = openSync(${JSON.stringify(path)}, 'r'), win = n.mapWindow(4 << 20);
    n.mapFile(win, fd, 0, 4 << 20); n.mapFile(win, fd, 4 << 20, 4 << 20);
    readFileSync(${JSON.stringify(path)});
    process.stdout.write('cached\\n');
    n.mapFile(win, fd, 0, 4 << 20); n.mapFile(win, fd, 4 << 20, 4 << 20);`;
  const { calls } = underStrace(dir, 'madvise,write', ['--input-type=module', '-e', script]);
  const marker = calls.findIndex((l) => l.includes('"cached\\n"'));
  assert.ok(marker > 0, 'the script ran');
  const willNeed = (lines: string[]) => lines.filter((l) => /madvise\(.*, 4194304, MADV_WILLNEED\)/.test(l)).length;
  assert.equal(willNeed(calls.slice(0, marker)), 2, 'each cold window is read ahead');
  assert.equal(willNeed(calls.slice(marker)), 0, 'cached windows are not');
});
