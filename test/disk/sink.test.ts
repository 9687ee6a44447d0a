import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { AtomicFileSink, lendWrites, removeStaleTemps, WriteLoan } from '../../src/disk/sink.js';
import { pwriteSizes, repoRoot, tmpDir, underStrace } from '../helpers/index.js';

test('an atomic sink shows nothing under the final name until commit', async () => {
  const dir = tmpDir();
  const target = join(dir, 'out.img');
  const sink = new AtomicFileSink(target);
  await sink.write(Buffer.from('hello'), 0);
  await sink.write(Buffer.from('world'), 10);
  assert.equal(existsSync(target), false);
  await sink.setLength(20);
  await sink.commit();
  const data = readFileSync(target);
  assert.equal(data.length, 20);
  assert.equal(data.subarray(0, 5).toString(), 'hello');
  assert.equal(data.subarray(10, 15).toString(), 'world');
  assert.deepEqual(readdirSync(dir), ['out.img']);
});

test('lent writes land as written, more of them than run at a time, beside small and later ordinary writes', async () => {
  const MiB = 1 << 20;
  const dir = tmpDir();
  const target = join(dir, 'lent.img');
  const sink = new AtomicFileSink(target);
  const loan = new WriteLoan();
  const expected = Buffer.alloc(8 * MiB);
  // Six large writes lent at once (more than run at a time), a small one lent in the same call
  // (not lent: small), and an ordinary write into the last large one right after.
  for (let i = 0; i < 6; i++) {
    const data = Buffer.alloc(MiB + 512, 0x11 * (i + 1));
    await lendWrites(loan, () => sink.write(data, i * (MiB + 512)));
    data.copy(expected, i * (MiB + 512));
  }
  const small = Buffer.alloc(4096, 0x99);
  await lendWrites(loan, () => sink.write(small, 7 * MiB));
  small.copy(expected, 7 * MiB);
  const over = Buffer.alloc(1000, 0xee);
  await sink.write(over, 5 * (MiB + 512) + 300);
  over.copy(expected, 5 * (MiB + 512) + 300);
  await loan.settled();
  await sink.setLength(8 * MiB);
  await sink.commit();
  assert.ok(readFileSync(target).equals(expected));
});

test('abort removes the temp file and leaves an existing target untouched', async () => {
  const dir = tmpDir();
  const target = join(dir, 'out.img');
  writeFileSync(target, 'previous');
  const sink = new AtomicFileSink(target);
  await sink.write(Buffer.from('partial'), 0);
  await sink.abort();
  await sink.abort();
  assert.equal(readFileSync(target, 'utf8'), 'previous');
  assert.deepEqual(readdirSync(dir), ['out.img']);
});

test('temp files of a killed process are removed by the next run; live ones are kept', async () => {
  const dir = tmpDir();
  // A process that is certainly dead: spawn one and wait for it to exit.
  const child = spawn(process.execPath, ['-e', '0']);
  await new Promise((r) => child.on('exit', r));
  const dead = `.out.img.vmferry-tmp-${child.pid}-abcd1234`;
  const live = `.out.img.vmferry-tmp-${process.pid}-abcd1234`;
  writeFileSync(join(dir, dead), 'x');
  writeFileSync(join(dir, live), 'x');
  assert.deepEqual(removeStaleTemps(dir), [dead]);
  assert.deepEqual(readdirSync(dir), [live]);
});

test('an output removes the temp files that killed runs left in its folder before it is committed', async () => {
  const dir = tmpDir();
  const child = spawn(process.execPath, ['-e', '0']);
  await new Promise((r) => child.on('exit', r));
  writeFileSync(join(dir, `.other.img.vmferry-tmp-${child.pid}-abcd1234`), 'x');
  const sink = new AtomicFileSink(join(dir, 'out.img'));
  await sink.write(Buffer.from('data'), 0);
  await sink.commit();
  assert.deepEqual(readdirSync(dir), ['out.img']);
});

test('untouchedFrom is the furthest write, cut back by setLength, and the file reads as zeros from there', async () => {
  const dir = tmpDir();
  const sink = new AtomicFileSink(join(dir, 'reach.img'));
  assert.equal(sink.untouchedFrom, 0);
  await sink.write(Buffer.alloc(4096, 7), 8192);
  await sink.write(Buffer.alloc(512, 8), 0);
  assert.equal(sink.untouchedFrom, 12288);
  await sink.setLength(10000);
  assert.equal(sink.untouchedFrom, 10000);
  await sink.setLength(20000);
  assert.equal(sink.untouchedFrom, 10000);
  const bytes = readFileSync(sink.tempPath);
  assert.equal(bytes.length, 20000);
  assert.ok(bytes.subarray(sink.untouchedFrom).every((b) => b === 0));
  assert.ok(bytes.subarray(8192, 10000).every((b) => b === 7));
  await sink.abort();
});

test('an adopted temp file is untouched from its length on', async () => {
  const dir = tmpDir();
  const left = join(dir, '.left.img.vmferry-tmp-1-x');
  writeFileSync(left, Buffer.alloc(6000, 3));
  const sink = new AtomicFileSink(join(dir, 'left.img'), { tempPath: left, length: 5000 });
  assert.equal(sink.untouchedFrom, 5000);
  await sink.abort();
});

test('writes from memory reach the file 256 KiB a write(2) at most, lent or not, and land whole', () => {
  // One large write(2) takes page-cache folios as large as itself, which were slow to get on this
  // project's VMs (sink.ts, WRITE_STEP); a 3 MiB buffer used to go out in one call.
  const dir = tmpDir();
  const target = join(dir, 'big.img');
  const sink = join(repoRoot, 'dist/src/disk/sink.js');
  const script = `
    import { readFileSync } from 'node:fs';
    import { AtomicFileSink, lendWrites, WriteLoan } from ${JSON.stringify(sink)};
    const a = Buffer.alloc(3 * 1048576 + 100, 0x5a), b = Buffer.alloc(2 * 1048576, 0xa5);
    const out = new AtomicFileSink(${JSON.stringify(target)}), loan = new WriteLoan();
    await lendWrites(loan, () => out.write(a, 0));
    await out.write(b, a.length);
    await loan.settled();
    await out.commit();
    const got = readFileSync(${JSON.stringify(target)});
    process.stdout.write(String(got.length === a.length + b.length && got.subarray(0, a.length).equals(a) && got.subarray(a.length).equals(b)));`;
  const { stdout, calls } = underStrace(dir, 'pwrite64', ['--input-type=module', '-e', script]);
  assert.equal(stdout, 'true', 'the file holds what was written');
  const sizes = pwriteSizes(calls);
  assert.equal(
    sizes.reduce((a, b) => a + b, 0),
    5 * 1048576 + 100,
    `the writes add up to the buffers (${sizes.length} writes)`,
  );
  assert.ok(Math.max(...sizes) <= 256 * 1024, `largest write(2): ${Math.max(...sizes)} bytes`);
});
