/**
 * convert -t CACHE follows qemu-img: by default (unsafe) the output is not flushed, as
 * `qemu-img convert` does not flush its output; any other mode fsyncs it before it appears under its
 * name. strace observes the system calls, so the test does not trust vmferry's own account.
 */
import assert from 'node:assert/strict';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { sparseRawImage } from '../helpers/images.js';
import { qemuImg, run, tmpDir, underStrace, vmferry, vmferryBin } from '../helpers/index.js';

/** The fsync/fdatasync calls made by `vmferry convert ARGS`, as strace saw them. */
function flushesDuring(dir: string, args: string[]): string[] {
  const { calls } = underStrace(dir, 'fsync,fdatasync', [vmferryBin, ...args]);
  return calls.filter((l) => /\b(fsync|fdatasync)\(/.test(l));
}

test('convert: no flush by default (qemu-img convert), fsync of file and folder with -t writeback', () => {
  const dir = tmpDir('vmferry-cache-');
  const src = sparseRawImage(64 * 1024 * 1024);
  const fast = join(dir, 'default.qcow2');
  const durable = join(dir, 'writeback.qcow2');
  assert.deepEqual(flushesDuring(dir, ['convert', '-O', 'qcow2', src, fast]), []);
  // One for the file before its rename, one for the folder after it.
  assert.ok(flushesDuring(dir, ['convert', '-t', 'writeback', '-O', 'qcow2', src, durable]).length >= 2);
  for (const out of [fast, durable]) qemuImg('compare', '-q', src, out);
  // qemu-img shows the same default: no flush in convert unless -t asks for one.
  const qemuLog = join(dir, 'qemu.strace');
  run('strace', [
    '-f',
    '-qq',
    '-e',
    'trace=fsync,fdatasync',
    '-o',
    qemuLog,
    'qemu-img',
    'convert',
    '-O',
    'raw',
    src,
    join(dir, 'q.raw'),
  ]);
  const qemuFlushes = readFileSync(qemuLog, 'utf8')
    .split('\n')
    .filter((l) => /\b(fsync|fdatasync)\(/.test(l));
  assert.deepEqual(qemuFlushes, []);
});

test('convert -t/-T: an unknown cache mode is one line, exit 1, no output', () => {
  const dir = tmpDir('vmferry-cache-');
  const src = sparseRawImage(8 * 1024 * 1024);
  for (const flag of ['-t', '-T']) {
    const out = join(dir, `bad${flag}.qcow2`);
    const r = vmferry('convert', flag, 'sometimes', '-O', 'qcow2', src, out);
    assert.equal(r.code, 1, r.stderr);
    assert.match(
      r.stderr.trimEnd(),
      new RegExp(
        `^vmferry: ${flag}: invalid cache mode 'sometimes' \\(use none, writeback, writethrough, directsync, unsafe\\)$`,
      ),
    );
    assert.equal(existsSync(out), false);
  }
  const ok = vmferry('convert', '-T', 'none', '-t', 'none', '-O', 'qcow2', src, join(dir, 'ok.qcow2'));
  assert.equal(ok.code, 0, ok.stderr);
});
