/**
 * Plain copies hand bytes that a read window maps from a source file to the output file on the
 * thread pool (src/disk/sink.ts): by copy_file_range where the output's file system can share
 * blocks or copy on a server, otherwise read into a small buffer and written from it. The tests
 * check the bytes that land, with node's own readFileSync and with qemu-img compare as the
 * judges, coreutils' stat for the file system, and strace for which path was taken.
 */
import assert from 'node:assert/strict';
import { pbkdf2 } from 'node:crypto';
import { closeSync, existsSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { promisify } from 'node:util';
import { nativeHelper } from '../../src/disk/native.js';
import { AtomicFileSink } from '../../src/disk/sink.js';
import { FileSource, forgetMappings, mappedOrigin, readWindow } from '../../src/disk/source.js';
import { PLAIN_OUTPUTS, sparseRawImage } from '../helpers/images.js';
import { qemuImg, run, runOk, sha256, tmpDir, underStrace, vmferry, vmferryBin } from '../helpers/index.js';
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

/** File systems whose copy_file_range shares blocks or copies on a server, by the names `stat -f` gives them. */
const OFFLOADING = new Set(['btrfs', 'xfs', 'bcachefs', 'ocfs2', 'zfs', 'nfs', 'smb2', 'cifs', 'ceph']);

function fileSystemOf(path: string): string {
  return runOk('stat', ['-f', '-c', '%T', path]).trim();
}

test('copyRange copies exactly by either path, and stops where the source ends', async () => {
  const native = nativeHelper();
  assert.ok(native, 'the native helper is built');
  const dir = tmpDir('vmferry-offload-');
  const srcPath = join(dir, 'src.bin');
  // Longer than the 256 KiB buffer and not a multiple of it, at offsets that are not page aligned.
  const content = patternBuffer(3 * MiB + 1000, 14);
  writeFileSync(srcPath, content);
  const length = MiB + 333_333;
  for (const viaKernel of [false, true]) {
    const dstPath = join(dir, `dst-${viaKernel}.bin`);
    const src = openSync(srcPath, 'r');
    const dst = openSync(dstPath, 'w');
    try {
      assert.deepEqual(await native.copyRange(src, 512, dst, 4096 + 7, length, viaKernel), [length, 0]);
      // Asked for more than the source holds: what there was, and errno 0.
      assert.deepEqual(await native.copyRange(src, 3 * MiB, dst, 4096 + 7 + length, MiB, viaKernel), [1000, 0]);
    } finally {
      closeSync(src);
      closeSync(dst);
    }
    const got = readFileSync(dstPath);
    const what = `viaKernel ${viaKernel}`;
    assert.ok(
      got.subarray(0, 4096 + 7).every((b) => b === 0),
      `${what}: the start`,
    );
    assert.ok(got.subarray(4096 + 7, 4096 + 7 + length).equals(content.subarray(512, 512 + length)), `${what}: the copy`);
    // (The file may be longer: the range asked for was preallocated.)
    assert.ok(got.subarray(4096 + 7 + length, 4096 + 7 + length + 1000).equals(content.subarray(3 * MiB)), `${what}: the tail`);
  }
  // An output the process cannot write: nothing copied, and the error by number (EBADF).
  const src = openSync(srcPath, 'r');
  const readOnly = openSync(srcPath, 'r');
  try {
    for (const viaKernel of [false, true]) {
      assert.deepEqual(await native.copyRange(src, 0, readOnly, 0, MiB, viaKernel), [0, 9], `viaKernel ${viaKernel}`);
    }
  } finally {
    closeSync(src);
    closeSync(readOnly);
  }
});

test('offloadsCopies names the file systems whose copy_file_range does more than copy', () => {
  const native = nativeHelper()!;
  const paths = [tmpDir('vmferry-offload-'), ...(existsSync('/dev/shm') ? ['/dev/shm'] : [])];
  for (const dir of paths) {
    const path = join(dir, `probe-${process.pid}`);
    writeFileSync(path, 'x');
    const fd = openSync(path, 'r');
    try {
      const fs = fileSystemOf(path);
      assert.equal(native.offloadsCopies(fd), OFFLOADING.has(fs), `${path} on ${fs}`);
    } finally {
      closeSync(fd);
      run('rm', ['-f', path]);
    }
  }
});

/**
 * How `vmferry ARGS` moved the data of `source`, as strace saw it: copy_file_range calls that copied
 * something, and reads of the source of exactly the copy buffer's 256 KiB (the other path; the zero
 * test reads 64 bytes, then at most 64 KiB at a time, and mapped windows read nothing).
 */
function copiesDuring(dir: string, source: string, args: string[]): { kernel: number; buffered: number } {
  const { calls } = underStrace(dir, 'copy_file_range,pread64', [vmferryBin, ...args], { paths: true });
  return {
    kernel: calls.filter((l) => /\bcopy_file_range\(.*= [1-9]\d*$/.test(l)).length,
    buffered: calls.filter((l) => l.includes(`pread64(`) && l.includes(`<${source}>`) && /, 262144, \d+\) = 262144$/.test(l))
      .length,
  };
}

test('convert from raw copies file to file into every plain output format, with identical content', () => {
  const dir = tmpDir('vmferry-offload-');
  const src = sparseRawImage(96 * MiB);
  const offloading = OFFLOADING.has(fileSystemOf(dir));
  for (const [format, opts] of [['raw', []] as const, ...PLAIN_OUTPUTS]) {
    const out = join(dir, `out.${format}`);
    const { kernel, buffered } = copiesDuring(dir, src, ['convert', '-O', format, ...opts, src, out]);
    // The source's 3 MiB in whole 1 MiB pieces: 12 buffer reads, or none and copy_file_range.
    if (offloading) assert.ok(kernel > 0 && buffered === 0, `${format}: ${kernel} copy_file_range, ${buffered} buffered reads`);
    else assert.ok(kernel === 0 && buffered >= 12, `${format}: ${kernel} copy_file_range, ${buffered} buffered reads`);
    qemuImg('compare', '-q', '-f', 'raw', '-F', format, src, out);
  }
});

test('a source on another file system (tmpfs) converts exactly', () => {
  assert.ok(existsSync('/dev/shm'), 'this test needs /dev/shm (tmpfs)');
  const shm = tmpDir('vmferry-offload-');
  const onShm = join('/dev/shm', `vmferry-offload-${process.pid}.raw`);
  writeFileSync(onShm, readFileSync(sparseRawImage(16 * MiB)));
  try {
    const out = join(shm, 'out.qcow2');
    assert.equal(vmferry('convert', '-O', 'qcow2', onShm, out).code, 0);
    qemuImg('compare', '-q', '-f', 'raw', '-F', 'qcow2', onShm, out);
  } finally {
    run('rm', ['-f', onShm]);
  }
});
