import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync, readdirSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { realisticRawImage, sparseRawImage } from '../helpers/images.js';
import { qemuImg, run, tmpDir, vmferry, vmferryBin } from '../helpers/index.js';

/** Bad input: exactly one line on stderr, naming the file when there is one; never a stack trace. */
function assertOneLineError(r: { code: number; stderr: string }, code: number, pattern: RegExp) {
  assert.equal(r.code, code, r.stderr);
  const lines = r.stderr.trimEnd().split('\n');
  assert.equal(lines.length, 1, `expected one line, got:\n${r.stderr}`);
  assert.match(lines[0]!, pattern);
  assert.doesNotMatch(r.stderr, /\n\s+at /);
}

test('a missing file, an unknown option, an unknown command: one line each, exit 1', () => {
  const dir = tmpDir();
  assertOneLineError(vmferry('info', join(dir, 'nope.qcow2')), 1, /^vmferry: .*nope\.qcow2: No such file or directory$/);
  assertOneLineError(vmferry('convert', '--bogus', 'a', 'b'), 1, /Unknown option '--bogus'/);
  assertOneLineError(vmferry('frobnicate'), 1, /unknown command 'frobnicate'/);
  assertOneLineError(vmferry('convert', '-O', 'nosuchfmt', 'a', 'b'), 1, /Unknown driver 'nosuchfmt'/);
  assertOneLineError(vmferry('create', '-f', 'raw', join(dir, 'x.raw'), '12Q'), 1, /Invalid size '12Q'/);
  assert.equal(existsSync(join(dir, 'x.raw')), false);
});

test('compare exits as qemu-img compare does: 0 identical, 1 different, 2 error', () => {
  const dir = tmpDir();
  const a = join(dir, 'a.raw');
  const b = join(dir, 'b.raw');
  const c = join(dir, 'c.raw');
  const longer = join(dir, 'longer.raw');
  writeFileSync(a, Buffer.alloc(1 << 20, 7));
  writeFileSync(b, Buffer.alloc(1 << 20, 7));
  const diff = Buffer.alloc(1 << 20, 7);
  diff[123457] = 8;
  writeFileSync(c, diff);
  writeFileSync(longer, Buffer.concat([Buffer.alloc(1 << 20, 7), Buffer.alloc(4096)]));
  for (const [x, y] of [
    [a, b],
    [a, c],
    [a, longer],
  ] as const) {
    const ours = vmferry('compare', x, y);
    const theirs = run('qemu-img', ['compare', x, y]);
    assert.equal(ours.code, theirs.code, `${x} vs ${y}: ${ours.stdout}${ours.stderr} / ${theirs.stdout}`);
    assert.equal(ours.stdout.trim(), theirs.stdout.trim());
  }
  assert.equal(vmferry('compare', '-s', a, longer).code, run('qemu-img', ['compare', '-s', a, longer]).code);
  assertOneLineError(vmferry('compare', a, join(dir, 'missing.raw')), 2, /missing\.raw/);
});

test('raw output is sparse: zero ranges become holes, and the map agrees with qemu-img map', () => {
  const dir = tmpDir();
  const src = sparseRawImage(4 * 2 ** 30);
  const out = join(dir, 'copy.raw');
  const r = vmferry('convert', '-O', 'raw', src, out);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(statSync(out).size, 4 * 2 ** 30);
  assert.ok(statSync(out).blocks * 512 < 8 * 2 ** 20, `allocated ${statSync(out).blocks * 512}`);
  assert.equal(run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, out]).code, 0);
  const ours = JSON.parse(vmferry('map', '--output=json', out).stdout) as { start: number; length: number; data: boolean }[];
  const theirs = JSON.parse(qemuImg('map', '--output=json', '-f', 'raw', out)) as {
    start: number;
    length: number;
    data: boolean;
  }[];
  const dataOf = (m: { start: number; length: number; data: boolean }[]) =>
    m.filter((e) => e.data).map((e) => [e.start, e.length]);
  assert.deepEqual(dataOf(ours), dataOf(theirs));
});

test('-p prints plain progress lines when stderr is not a terminal', () => {
  const dir = tmpDir();
  const r = vmferry('convert', '-p', '-O', 'raw', realisticRawImage(), join(dir, 'x.raw'));
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /convert: 100\.00% \(256 MiB of 256 MiB/);
});

test('kill -9 in the middle of convert never leaves a partial file under the target name; a rerun completes', async () => {
  const src = realisticRawImage();
  for (const delayMs of [30, 80, 150, 250]) {
    const dir = tmpDir();
    const out = join(dir, 'out.raw');
    const child = spawn(process.execPath, [vmferryBin, 'convert', '-O', 'raw', src, out], { stdio: 'ignore' });
    // Listened for at once: a convert that finishes before the kill exits before it.
    const exited = new Promise((r) => child.on('exit', r));
    await new Promise((r) => setTimeout(r, delayMs));
    child.kill('SIGKILL');
    await exited;
    if (existsSync(out)) {
      // It finished before the kill: then it must be complete.
      assert.equal(run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, out]).code, 0);
    }
    const again = vmferry('convert', '-O', 'raw', src, out);
    assert.equal(again.code, 0, again.stderr);
    assert.equal(run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, out]).code, 0);
    assert.deepEqual(readdirSync(dir), ['out.raw'], `stray files after rerun (delay ${delayMs} ms)`);
  }
});

test('SIGINT during convert removes the temp file and exits 130', async () => {
  const dir = tmpDir();
  const out = join(dir, 'out.raw');
  const child = spawn(process.execPath, [vmferryBin, 'convert', '-O', 'raw', realisticRawImage(), out], { stdio: 'ignore' });
  const exited = new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  // Interrupt once the output is under way (its temp file exists).
  for (let i = 0; i < 500 && !readdirSync(dir).some((n) => n.includes('.vmferry-tmp-')); i++) {
    await new Promise((r) => setTimeout(r, 2));
  }
  child.kill('SIGINT');
  const code = await exited;
  if (code === 0) return; // finished first: nothing to check
  assert.equal(code, 130);
  assert.deepEqual(readdirSync(dir), []);
});

test('a reader that stops early (vmferry map | head) ends the command quietly with exit 0', () => {
  const dir = tmpDir();
  const img = join(dir, 'holey.raw');
  // 2000 data pieces between holes: the map is far longer than a pipe holds.
  const fd = openSync(img, 'w');
  for (let i = 0; i < 2000; i++) writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, i * 65536);
  closeSync(fd);
  const r = run('bash', [
    '-c',
    'set -o pipefail; "$0" "$1" map "$2" | head -c 100 >/dev/null',
    process.execPath,
    vmferryBin,
    img,
  ]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stderr, '');
});

test('converting an image onto itself is refused and the source is untouched', () => {
  const dir = tmpDir();
  const a = join(dir, 'a.raw');
  writeFileSync(a, Buffer.alloc(65536, 1));
  assertOneLineError(vmferry('convert', '-O', 'raw', a, a), 1, /the output is the input image/);
  assert.equal(statSync(a).size, 65536);
});
