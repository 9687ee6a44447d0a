/**
 * End to end: a Linux guest (Debian kernel, busybox init from test/helpers/warmguest.ts) runs
 * under qemu-system-x86_64 (TCG) on a VMDK disk and keeps writing checksummed records to it.
 * vmferry migrate --warm copies it to a qcow2 target over QEMU's own NBD server with dirty
 * bitmaps; the first run is killed mid round 0 (rate-limited so it is mid-copy), the same command
 * run again continues with the source still running, converges, shuts the source down by ACPI and
 * starts the VM on the target. Checked independently of vmferry's own reading:
 *  - every record the source guest reported on its serial console is on the target disk with its
 *    checksum (the target guest reads them back itself and says so on its console; qemu-img
 *    converts the target disk to raw and the records are checked again here);
 *  - qemu-img check finds the target qcow2 clean;
 *  - vmferry never opened the source disk for writing (strace of both runs);
 *  - the report's rounds shrink (bytes), and the downtime and a cold migration's estimated
 *    downtime are reported (printed, not asserted: tests never assert on time).
 */
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, test } from 'node:test';
import type { WarmReport } from '../../src/migrate/warm/warm.js';
import { missingBootTools } from '../helpers/bootdisk.js';
import { qemuImg, runOk, tmpDir } from '../helpers/index.js';
import { RECORD_AREA, RECORD_BASE, recordsIn, recordsReported, SOURCE_SERIAL, warmGuestDisk } from '../helpers/warmguest.js';
import { fileText, type Proc, processAlive, qmpOnce, start, startVmferry, waitFor, writableOpens } from './support.js';

const missing = missingBootTools('bios');
const cleanups: (() => Promise<void> | void)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
});

test('warm migration of a running guest writing records: kill mid round 0, rerun continues, every record on the qcow2 target', {
  timeout: 600_000,
}, async (t) => {
  assert.deepEqual(missing, [], `missing packages: ${missing.join(' ')} (scripts/test.sh installs them)`);
  const dir = tmpDir('vmferry-warm-e2e-');
  const vmdk = join(dir, 'guest.vmdk');
  qemuImg('convert', '-f', 'raw', '-O', 'vmdk', warmGuestDisk(), vmdk);
  const serial = join(dir, 'source-serial.log');
  const qmp = join(dir, 'qmp.sock');
  const source: Proc = start('qemu-system-x86_64', [
    '-machine',
    'pc,accel=tcg',
    '-m',
    '256',
    '-nodefaults',
    '-display',
    'none',
    '-serial',
    `file:${serial}`,
    '-drive',
    `if=none,id=disk0,format=vmdk,file=${vmdk}`,
    '-device',
    'virtio-blk-pci,drive=disk0',
    '-smbios',
    `type=1,serial=${SOURCE_SERIAL}`,
    '-qmp',
    `unix:${qmp},server=on,wait=off`,
  ]);
  cleanups.push(() => source.kill());
  await waitFor('the source guest to write records', () => /WARM-REC 1 /.test(fileText(serial)), 240_000);

  const out = join(dir, 'out');
  const args = [
    'migrate',
    '--warm',
    '-p',
    '--source-qmp',
    qmp,
    vmdk,
    '--to',
    'qemu',
    '--out',
    out,
    '--disk-bus',
    'virtio',
    '--memory',
    '256M',
    '--max-downtime',
    '0.05',
    '--output=json',
  ];

  // Run 1: rate-limited so round 0 takes a while; killed once it has checkpointed progress.
  const first = startVmferry([...args, '--rate-limit', '4M'], join(dir, 'strace-1.log'));
  cleanups.push(() => first.kill('SIGKILL'));
  await waitFor('round 0 progress', () => /round 0: disk0 at [1-9]/.test(first.err()), 120_000);
  await first.kill('SIGKILL');
  const stateFile = join(dir, '.out.vmferry-warm', 'state.json');
  const saved = JSON.parse(readFileSync(stateFile, 'utf8'));
  assert.equal(saved.phase, 'precopy');
  assert.ok(saved.disks[0].round0Done > 0 && !saved.disks[0].round0Complete, 'killed mid round 0');
  assert.ok(!existsSync(out), 'nothing in DIR while the migration is unfinished');
  // The source still runs, and QEMU's bitmap keeps recording the guest's writes.
  const between = await qmpOnce(qmp, async (q) => ({
    status: await q.execute('query-status'),
    blocks: await q.execute('query-block'),
  }));
  assert.equal(between.status.running, true);
  const bitmaps = between.blocks[0]!.inserted!['dirty-bitmaps']!.map((b) => b.name);
  assert.ok(bitmaps.includes(saved.disks[0].bitmap), `bitmap ${saved.disks[0].bitmap} still in QEMU: ${bitmaps}`);
  const recordsAtKill = recordsReported(fileText(serial)).size;
  await waitFor('the guest to keep writing', () => recordsReported(fileText(serial)).size > recordsAtKill, 60_000);

  // Run 2: the same command continues.
  const second = startVmferry([...args, '--rate-limit', '16M'], join(dir, 'strace-2.log'));
  cleanups.push(() => second.kill('SIGKILL'));
  const code = await second.done;
  assert.equal(code, 0, second.err());
  const report = JSON.parse(second.out()) as WarmReport;
  t.diagnostic(second.err());
  t.diagnostic(`rounds: ${JSON.stringify(report.rounds)}`);
  t.diagnostic(`cutover: ${JSON.stringify(report.cutover)}`);
  t.diagnostic(`model: ${report.model?.note}`);

  assert.equal(report.tracking, 'qemu-dirty-bitmap');
  assert.equal(report.resumes.length, 1);
  assert.ok(report.resumes[0]!.round0Done[0]! > 0);
  assert.equal(report.rounds[0]!.round, 0);
  assert.equal(report.rounds[0]!.resumed, true);
  const finalRound = report.rounds[report.rounds.length - 1]!;
  assert.equal(finalRound.final, true);
  assert.ok(report.rounds.length >= 2);
  // Converging: every later round moved less than round 0 did, and the final set is small.
  for (const r of report.rounds.slice(1)) assert.ok(r.bytes < report.rounds[0]!.bytes, `round ${r.round}: ${r.bytes} bytes`);
  assert.ok(finalRound.bytes <= 4 * 1024 * 1024, `final round ${finalRound.bytes} bytes`);
  assert.equal(report.cutover!.stoppedBy, 'shutdown');
  assert.equal(report.cutover!.incremental, true);
  assert.ok(report.cutover!.downtimeSeconds > 0 && report.cutover!.coldDowntimeSeconds > 0);
  assert.equal(report.disks[0]!.verified, true);
  assert.ok(report.started?.pid);
  const targetPid = report.started!.pid!;
  cleanups.push(() => {
    if (processAlive(targetPid)) process.kill(targetPid);
  });
  assert.ok(!existsSync(join(dir, '.out.vmferry-warm')), 'the warm state folder is gone after success');

  // The source powered off (ACPI) and vmferry let its QEMU quit.
  assert.match(fileText(serial), /WARM-POWERDOWN/);
  await waitFor(
    'the source QEMU to exit',
    async () =>
      (await Promise.race([source.done.then(() => true), new Promise((r) => setTimeout(() => r(false), 100))])) as boolean,
    30_000,
  );
  const reported = recordsReported(fileText(serial));
  assert.ok(reported.size >= 2);

  // The target guest reads every record back and checks it.
  const targetSerial = report.started!.serialLog!;
  const line = await waitFor(
    'the target guest to check its records',
    () => /WARM-TARGET records=(\d+) ok=(\d+) bad=(\d+)/.exec(fileText(targetSerial)) ?? undefined,
    300_000,
  );
  const [n, ok, bad] = [Number(line[1]), Number(line[2]), Number(line[3])];
  t.diagnostic(`source reported ${reported.size} records; target guest found ${n}, ok ${ok}, bad ${bad}`);
  assert.equal(bad, 0);
  assert.equal(ok, n);
  assert.ok(n >= reported.size, `target has ${n} records, the source guest wrote ${reported.size}`);
  process.kill(targetPid);
  await waitFor('the target QEMU to exit', () => !processAlive(targetPid), 30_000);

  // Independently: qemu-img reads the target qcow2; every reported record is there with its sum.
  const qcow2 = join(out, readdirSync(out).find((f) => f.endsWith('.qcow2'))!);
  runOk('qemu-img', ['check', qcow2]);
  const raw = join(dir, 'target.raw');
  qemuImg('convert', '-f', 'qcow2', '-O', 'raw', qcow2, raw);
  const area = readFileSync(raw).subarray(RECORD_BASE, RECORD_BASE + RECORD_AREA);
  const onDisk = recordsIn(area);
  assert.ok(onDisk.every((r) => r.ok));
  for (const [i, sum] of reported) assert.equal(onDisk[i]?.sha256, sum, `record ${i}`);

  // vmferry opened the source disk read-only in both runs (QEMU alone wrote the guest's writes).
  for (const log of ['strace-1.log', 'strace-2.log']) {
    const written = writableOpens(join(dir, log));
    assert.ok(!written.some((p) => p.endsWith('guest.vmdk')), `${log}: ${written.filter((p) => p.includes('guest'))}`);
    assert.ok(fileText(join(dir, log)).includes('guest.vmdk'), `${log} shows vmferry reading the source`);
  }
});
