/**
 * Plain copies hand bytes that a read window maps from a source file to the output file by
 * copy_file_range (src/disk/sink.ts). The test checks the bytes that land, with node's own
 * readFileSync and with qemu-img compare as the judges, and strace for which path was taken.
 */
import assert from 'node:assert/strict';
import { pbkdf2 } from 'node:crypto';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { AtomicFileSink } from '../../src/disk/sink.js';
import { FileSource, forgetMappings, mappedOrigin, readWindow } from '../../src/disk/source.js';
import { PLAIN_OUTPUTS, sparseRawImage } from '../helpers/images.js';
import { qemuImg, run, sha256, tmpDir, underStrace, vmferryBin } from '../helpers/index.js';
import { patternBuffer } from '../helpers/pattern.js';

const MiB = 1024 * 1024;

test('a window read maps its file range; copied reads, reuse and other memory map nothing', async () => {
  const path = join(tmpDir('vmferry-offload-'), 'src.raw');
  writeFileSync(path, patternBuffer(4 * MiB, 11));
  const src = FileSource.open(path);
  const win = readWindow(MiB);
  try {
    await src.read(2 * MiB, MiB, win);
    assert.deepEqual(mappedOrigin(win.subarray(65536, 131072)), { source: src, position: 2 * MiB + 65536 });
    // A read at an unaligned file offset is copied: the range it covers maps nothing any more.
    await src.read(1000, 8192, win.subarray(0, 8192));
    assert.equal(mappedOrigin(win.subarray(0, 4096)), null);
    assert.deepEqual(mappedOrigin(win.subarray(8192, 12288)), { source: src, position: 2 * MiB + 8192 });
    // Spanning the copied and the mapped part: not one file range.
    assert.equal(mappedOrigin(win.subarray(4096, 12288)), null);
    forgetMappings(win);
    assert.equal(mappedOrigin(win.subarray(8192, 12288)), null);
    assert.equal(mappedOrigin(Buffer.alloc(4096)), null);
  } finally {
    await src.close();
  }
});

test('a sink writes mapped window bytes file to file, and memory bytes as memory', async () => {
  const dir = tmpDir('vmferry-offload-');
  const path = join(dir, 'src.raw');
  writeFileSync(path, patternBuffer(2 * MiB, 12));
  const expected = readFileSync(path);
  const src = FileSource.open(path);
  const win = readWindow(MiB);
  const out = join(dir, 'out.bin');
  const sink = new AtomicFileSink(out);
  try {
    await src.read(MiB, MiB, win);
    await sink.write(win.subarray(4096, 65536), 0);
    // The window's memory changed after the mapping was forgotten: what lands is the memory.
    forgetMappings(win);
    win.fill(0xab, 0, 4096);
    await sink.write(win.subarray(0, 4096), 65536 - 4096);
    await sink.flush();
    await sink.commit();
  } finally {
    await src.close();
  }
  const got = readFileSync(out);
  assert.equal(sha256(got.subarray(0, 65536 - 4096)), sha256(expected.subarray(MiB + 4096, MiB + 65536)));
  assert.ok(got.subarray(65536 - 4096).every((b) => b === 0xab));
});

test('closing the source while copies from it still wait to run delays the close (the output is whole)', async () => {
  const dir = tmpDir('vmferry-offload-');
  const path = join(dir, 'src.raw');
  writeFileSync(path, patternBuffer(4 * MiB, 13));
  const src = FileSource.open(path);
  const out = join(dir, 'out.bin');
  const sink = new AtomicFileSink(out);
  // Keep libuv's four threads busy, so the copies are still queued when the source closes.
  const busy = Array.from({ length: 4 }, () => promisify(pbkdf2)('x', 'y', 300_000, 32, 'sha256'));
  for (let i = 0; i < 4; i++) {
    const win = readWindow(MiB);
    await src.read(i * MiB, MiB, win);
    await sink.write(win, i * MiB);
  }
  // A caller may close its reader before it finishes its writer (warm migration's working copies).
  await src.close();
  await sink.flush();
  await sink.commit();
  await Promise.all(busy);
  assert.equal(sha256(readFileSync(out)), sha256(readFileSync(path)));
});

/** The copy_file_range calls `vmferry ARGS` made that copied something, as strace saw them. */
function copiesDuring(dir: string, args: string[]): number {
  // A call that overlaps another thread's is logged in two lines ("<unfinished ...>", then
  // "<... copy_file_range resumed> ... = N"): the result is on the second.
  const { calls } = underStrace(dir, 'copy_file_range', [vmferryBin, ...args]);
  return calls.filter((l) => /\bcopy_file_range\b.*= [1-9]\d*$/.test(l)).length;
}

test('convert from raw copies file to file into every plain output format, with identical content', () => {
  const dir = tmpDir('vmferry-offload-');
  const src = sparseRawImage(96 * MiB);
  for (const [format, opts] of [['raw', []] as const, ...PLAIN_OUTPUTS]) {
    const out = join(dir, `out.${format}`);
    const copies = copiesDuring(dir, ['convert', '-O', format, ...opts, src, out]);
    assert.ok(copies > 0, `${format}: no copy_file_range`);
    qemuImg('compare', '-q', '-f', 'raw', '-F', format, src, out);
  }
});

test('a source the kernel cannot copy from (tmpfs to another file system) still converts exactly', () => {
  assert.ok(existsSync('/dev/shm'), 'this test needs /dev/shm (tmpfs)');
  const shm = tmpDir('vmferry-offload-');
  const onShm = join('/dev/shm', `vmferry-offload-${process.pid}.raw`);
  writeFileSync(onShm, readFileSync(sparseRawImage(16 * MiB)));
  try {
    const out = join(shm, 'out.qcow2');
    copiesDuring(shm, ['convert', '-O', 'qcow2', onShm, out]);
    qemuImg('compare', '-q', '-f', 'raw', '-F', 'qcow2', onShm, out);
  } finally {
    run('rm', ['-f', onShm]);
  }
});
