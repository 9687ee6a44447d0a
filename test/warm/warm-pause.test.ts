/**
 * Warm migration without a guest OS, so writes are exact and known: QEMU runs a qcow2 disk (its
 * BIOS finds nothing to boot and spins), the test writes into the disk through QEMU's block layer
 * (HMP qemu-io on a second QMP monitor) while vmferry copies round 0; with --pause the source is
 * paused, the final dirty blocks are copied, and the target qcow2 equals the paused source for
 * qemu-img compare. Also: the QMP client on its own (typed errors, events), and the digest
 * fallback for a source without dirty tracking (an image file): a pass while it "runs", a change,
 * then --final copies exactly the changed chunk.
 */
import assert from 'node:assert/strict';
import { closeSync, existsSync, openSync, readdirSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { VmferryError } from '../../src/disk/errors.js';
import { QmpError } from '../../src/migrate/qmp.js';
import type { WarmReport } from '../../src/migrate/warm/warm.js';
import { sparseRawImage } from '../helpers/images.js';
import { patternBuffer, qemuImg, runOk, tmpDir, vmferry } from '../helpers/index.js';
import { fileText, type Proc, qmpOnce, start, startVmferry, waitFor } from './support.js';

const MiB = 1024 * 1024;
const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

function startQemu(dir: string, image: string): { proc: Proc; a: string; b: string } {
  const a = join(dir, 'a.qmp');
  const b = join(dir, 'b.qmp');
  const proc = start('qemu-system-x86_64', [
    '-machine',
    'pc,accel=tcg',
    '-m',
    '64',
    '-nodefaults',
    '-display',
    'none',
    '-drive',
    `if=none,id=disk0,format=qcow2,file=${image}`,
    '-device',
    'virtio-blk-pci,drive=disk0',
    '-qmp',
    `unix:${a},server=on,wait=off`,
    '-qmp',
    `unix:${b},server=on,wait=off`,
  ]);
  cleanups.push(() => proc.kill());
  return { proc, a, b };
}

test('QMP client: greeting, typed replies and errors, events', async () => {
  const dir = tmpDir('vmferry-qmp-');
  const image = join(dir, 'd.qcow2');
  qemuImg('create', '-q', '-f', 'qcow2', image, '16M');
  const vm = startQemu(dir, image);
  await waitFor('QMP socket', () => existsSync(vm.a), 30_000);
  await qmpOnce(vm.a, async (q) => {
    assert.ok((q.greeting.version?.qemu?.major ?? 0) >= 5);
    const status = await q.execute('query-status');
    assert.equal(status.running, true);
    const blocks = await q.execute('query-block');
    assert.equal(blocks[0]!.device, 'disk0');
    await assert.rejects(q.execute('no-such-command'), (e: Error) => e instanceof QmpError && e.qmpClass === 'CommandNotFound');
    await assert.rejects(
      q.execute('block-dirty-bitmap-add', { node: 'nope', name: 'x' }),
      (e: Error) => e instanceof QmpError && /nope/.test(e.message),
    );
    await q.execute('stop');
    const ev = await q.waitEvent('STOP', { timeoutMs: 10_000 });
    assert.equal(ev.event, 'STOP');
    await assert.rejects(
      q.waitEvent('RESET', { timeoutMs: 200 }),
      (e: Error) => e instanceof VmferryError && /no RESET event/.test(e.message),
    );
    await q.execute('cont');
  });
  await vm.proc.kill();
});

test('--pause: writes during round 0 reach the target through the bitmap; target equals the paused source', {
  timeout: 300_000,
}, async (t) => {
  const dir = tmpDir('vmferry-warm-pause-');
  const image = join(dir, 'src.qcow2');
  qemuImg('convert', '-f', 'raw', '-O', 'qcow2', sparseRawImage(64 * MiB, 'sparse-64M-nbd.raw'), image);
  const vm = startQemu(dir, image);
  await waitFor('QMP socket', () => existsSync(vm.a) && existsSync(vm.b), 30_000);
  const out = join(dir, 'out');
  const run = startVmferry([
    'migrate',
    '--warm',
    '-p',
    '--source-qmp',
    vm.a,
    image,
    '--to',
    'qemu',
    '--out',
    out,
    '--pause',
    '--no-start',
    '--rate-limit',
    '1M',
    '--max-downtime',
    '0.05',
    '--output=json',
  ]);
  cleanups.push(() => run.kill('SIGKILL'));
  await waitFor('round 0 progress', () => /round 0: disk0 at [1-9]/.test(run.err()), 60_000);
  // Writes while round 0 runs: one behind the copy (already copied) and one ahead of it.
  await qmpOnce(vm.b, async (q) => {
    await q.execute('human-monitor-command', { 'command-line': 'qemu-io disk0 "write -P 0x5a 0 64k"' });
    await q.execute('human-monitor-command', { 'command-line': 'qemu-io disk0 "write -P 0xa5 40M 1M"' });
  });
  assert.equal(await run.done, 0, run.err());
  const report = JSON.parse(run.out()) as WarmReport;
  t.diagnostic(run.err());
  t.diagnostic(JSON.stringify(report.rounds));
  assert.equal(report.cutover!.stoppedBy, 'pause');
  assert.ok(report.rounds.length >= 2);
  const later = report.rounds.slice(1).reduce((s, r) => s + r.bytes, 0);
  assert.ok(later >= MiB + 64 * 1024, `rounds after 0 moved ${later} bytes; the test wrote 1 MiB + 64 KiB`);
  assert.equal(report.disks[0]!.verified, true);
  assert.equal(report.started, undefined);
  // The source stays paused (the operator's rollback point) and is now idle: compare the images.
  await qmpOnce(vm.b, async (q) => {
    const s = await q.execute('query-status');
    assert.equal(s.running, false);
    assert.equal(s.status, 'paused');
    const bitmaps = (await q.execute('query-block'))[0]!.inserted!['dirty-bitmaps'] ?? [];
    assert.deepEqual(bitmaps, [], 'vmferry removed its bitmaps');
  });
  const target = join(out, readdirSync(out).find((f) => f.endsWith('.qcow2'))!);
  runOk('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', image, target]);
  runOk('qemu-img', ['check', target]);
  assert.ok(fileText(join(out, readdirSync(out).find((f) => f.endsWith('.sh'))!)).includes(target.split('/').pop()!));
  await vm.proc.kill();
});

test('digest fallback (no dirty tracking): passes while the source runs, --final copies only the changed chunk', async () => {
  const dir = tmpDir('vmferry-warm-digest-');
  const image = join(dir, 'src.raw');
  qemuImg('convert', '-f', 'raw', '-O', 'raw', sparseRawImage(64 * MiB, 'sparse-64M-nbd.raw'), image);
  const out = join(dir, 'out');
  const args = ['migrate', '--warm', image, '--to', 'qemu', '--out', out, '--no-start', '--output=json'];
  const first = vmferry(...args);
  assert.equal(first.code, 0, first.stderr);
  const r1 = JSON.parse(first.stdout) as WarmReport;
  assert.equal(r1.tracking, 'digest');
  assert.match(r1.pending ?? '', /--final/);
  assert.ok(!existsSync(out));
  // The first pass copied the allocated chunks: data at start, middle (two chunks) and end.
  assert.ok(r1.rounds[0]!.blocks >= 3);
  // The "running" source changes one aligned MiB.
  const fd = openSync(image, 'r+');
  writeSync(fd, patternBuffer(MiB, 99), 0, MiB, 20 * MiB);
  closeSync(fd);
  const second = vmferry(...args, '--final');
  assert.equal(second.code, 0, second.stderr);
  const r2 = JSON.parse(second.stdout) as WarmReport;
  const last = r2.rounds[r2.rounds.length - 1]!;
  assert.equal(last.final, true);
  assert.equal(last.blocks, 1);
  assert.equal(last.bytes, MiB);
  // Only the source's data extents are read (about 4 MiB of a 64 MiB disk, plus the new MiB).
  assert.ok(last.comparedBytes! >= 4 * MiB && last.comparedBytes! <= 8 * MiB, `${last.comparedBytes}`);
  assert.equal(r2.disks[0]!.verified, true);
  const target = join(out, readdirSync(out).find((f) => f.endsWith('.qcow2'))!);
  runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', image, target]);
});

test('a guest that ignores the ACPI power button is paused after --shutdown-timeout, and the report says so', {
  timeout: 120_000,
}, async () => {
  const dir = tmpDir('vmferry-warm-acpi-');
  const image = join(dir, 'src.qcow2');
  qemuImg('convert', '-f', 'raw', '-O', 'qcow2', sparseRawImage(64 * MiB, 'sparse-64M-nbd.raw'), image);
  const vm = startQemu(dir, image);
  await waitFor('QMP socket', () => existsSync(vm.a) && existsSync(vm.b), 30_000);
  const out = join(dir, 'out');
  const run = startVmferry([
    'migrate',
    '--warm',
    '--source-qmp',
    vm.a,
    image,
    '--to',
    'libvirt',
    '--out',
    out,
    '--shutdown-timeout',
    '2',
    '--output=json',
  ]);
  cleanups.push(() => run.kill('SIGKILL'));
  assert.equal(await run.done, 0, run.err());
  const report = JSON.parse(run.out()) as WarmReport;
  assert.equal(report.cutover!.stoppedBy, 'pause (shutdown timed out)');
  assert.ok(report.warnings.some((w) => /did not shut down within 2 s/.test(w)));
  // libvirt is not started by vmferry; its descriptor names the disk where it now lives.
  assert.match(report.started?.command ?? '', /libvirt tools/);
  const xml = readdirSync(out).find((f) => f.endsWith('.xml'))!;
  assert.ok(fileText(join(out, xml)).includes(join(out, report.disks[0]!.target)));
  runOk('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', image, join(out, report.disks[0]!.target)]);
  await qmpOnce(vm.b, async (q) => assert.equal((await q.execute('query-status')).status, 'paused'));
  await vm.proc.kill();
});

test('killed between a bitmap swap and the end of its round: the rerun copies the frozen bitmap first, nothing lost', {
  timeout: 180_000,
}, async (t) => {
  const dir = tmpDir('vmferry-warm-swap-');
  const image = join(dir, 'src.qcow2');
  qemuImg('convert', '-f', 'raw', '-O', 'qcow2', sparseRawImage(64 * MiB, 'sparse-64M-nbd.raw'), image);
  const vm = startQemu(dir, image);
  await waitFor('QMP socket', () => existsSync(vm.a) && existsSync(vm.b), 30_000);
  const out = join(dir, 'out');
  const args = [
    'migrate',
    '--warm',
    '-p',
    '--source-qmp',
    vm.a,
    image,
    '--to',
    'qemu',
    '--out',
    out,
    '--pause',
    '--no-start',
    '--max-downtime',
    '0.01',
    '--output=json',
  ];
  const first = startVmferry([...args, '--rate-limit', '1M']);
  cleanups.push(() => first.kill('SIGKILL'));
  await waitFor('round 0 progress', () => /round 0: disk0 at [1-9]/.test(first.err()), 60_000);
  // 3 MiB written during round 0: round 1 has them to copy, at 1 MiB/s.
  await qmpOnce(vm.b, (q) => q.execute('human-monitor-command', { 'command-line': 'qemu-io disk0 "write -P 0x77 30M 3M"' }));
  const stateFile = join(dir, '.out.vmferry-warm', 'state.json');
  const frozen = await waitFor(
    'a frozen bitmap (round 1 running)',
    () => {
      try {
        return JSON.parse(fileText(stateFile)).disks[0].frozen as string | undefined;
      } catch {
        return undefined;
      }
    },
    60_000,
  );
  await first.kill('SIGKILL');
  // Writes after the kill land in the new (recording) bitmap; the frozen one is still in QEMU.
  await qmpOnce(vm.b, async (q) => {
    await q.execute('human-monitor-command', { 'command-line': 'qemu-io disk0 "write -P 0x78 50M 64k"' });
    const names = ((await q.execute('query-block'))[0]!.inserted!['dirty-bitmaps'] ?? []).map((b) => b.name);
    assert.ok(names.includes(frozen), `${frozen} in ${names}`);
    assert.equal(names.length, 2);
  });
  const second = startVmferry(args);
  cleanups.push(() => second.kill('SIGKILL'));
  assert.equal(await second.done, 0, second.err());
  const report = JSON.parse(second.out()) as WarmReport;
  t.diagnostic(JSON.stringify(report.rounds));
  const resumed = report.rounds.find((r) => r.resumed && r.round > 0);
  assert.ok(resumed && resumed.bytes >= 3 * MiB, 'the frozen bitmap was copied by the rerun');
  assert.equal(report.disks[0]!.verified, true);
  const target = join(out, readdirSync(out).find((f) => f.endsWith('.qcow2'))!);
  runOk('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', image, target]);
  await qmpOnce(vm.b, async (q) => {
    assert.deepEqual((await q.execute('query-block'))[0]!.inserted!['dirty-bitmaps'] ?? [], []);
  });
  await vm.proc.kill();
});
