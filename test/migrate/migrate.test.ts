import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import {
  closeSync,
  existsSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { describe, test } from 'node:test';
import { realisticRawImage } from '../helpers/images.js';
import { corpusFile, patternBuffer, qemuImg, run, runOk, sha256File, tmpDir, vmferry, vmferryBin } from '../helpers/index.js';

const MiB = 1024 * 1024;
const dir = tmpDir('vmferry-migrate-');

/** A raw disk: GPT with an ESP (sfdisk), some data, `size` bytes. */
function gptDisk(path: string, size: number): string {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  writeSync(fd, patternBuffer(MiB, 7), 0, MiB, 12 * MiB);
  closeSync(fd);
  runOk('sfdisk', ['--quiet', path], { input: 'label: gpt\nstart=2048, size=8192, type=uefi\nstart=10240, type=linux\n' });
  return path;
}

interface VmxOptions {
  name: string;
  firmware?: 'bios' | 'efi';
  extra?: string[];
  diskSize?: number;
}

/** A VMware VM folder: NAME.vmx (written here) + NAME.vmdk (qemu-img from a raw GPT disk). */
function vmwareVm(o: VmxOptions): { vmx: string; raw: string } {
  const folder = join(dir, `src-${o.name}`);
  mkdirSync(folder);
  const raw = gptDisk(join(dir, `${o.name}.raw`), o.diskSize ?? 32 * MiB);
  qemuImg('convert', '-f', 'raw', '-O', 'vmdk', raw, join(folder, `${o.name}.vmdk`));
  const lines = [
    '.encoding = "UTF-8"',
    'config.version = "8"',
    'virtualHW.version = "19"',
    `displayName = "${o.name}"`,
    'guestOS = "debian11-64"',
    'memsize = "1024"',
    'numvcpus = "2"',
    ...(o.firmware ? [`firmware = "${o.firmware}"`] : []),
    'scsi0.present = "TRUE"',
    'scsi0.virtualDev = "pvscsi"',
    'scsi0:0.present = "TRUE"',
    `scsi0:0.fileName = "${o.name}.vmdk"`,
    'ethernet0.present = "TRUE"',
    'ethernet0.virtualDev = "vmxnet3"',
    'ethernet0.addressType = "static"',
    'ethernet0.address = "00:50:56:3f:00:01"',
    ...(o.extra ?? []),
  ];
  writeFileSync(join(folder, `${o.name}.vmx`), `${lines.join('\n')}\n`);
  return { vmx: join(folder, `${o.name}.vmx`), raw };
}

const fullVm = vmwareVm({
  name: 'web01',
  firmware: 'efi',
  extra: [
    'floppy0.present = "TRUE"',
    'floppy0.fileType = "device"',
    'sound.present = "TRUE"',
    'sound.virtualDev = "hdaudio"',
    'serial0.present = "TRUE"',
    'serial0.fileType = "file"',
    'serial0.fileName = "serial.log"',
    'usb.present = "TRUE"',
  ],
});

function migrate(source: string, target: string, out: string, ...more: string[]) {
  return vmferry('migrate', source, '--to', target, '--out', out, ...more);
}

describe('migrate: the report names every translation and every dropped device', () => {
  test('VMX with pvscsi, vmxnet3, floppy, sound, serial, USB -> libvirt', async () => {
    const out = join(dir, 'web01-libvirt');
    const r = migrate(fullVm.vmx, 'libvirt', out, '--output=json');
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout);
    const mappings = report.mappings.map((m: { from: string; to: string }) => `${m.from} -> ${m.to}`);
    for (const expected of [
      'disk0 on scsi (pvscsi) -> scsi (virtio-scsi)',
      'controller scsi0 (scsi, pvscsi) -> scsi0 (scsi, virtio-scsi)',
      'nic0 vmxnet3 -> virtio',
      'floppy drive floppy0 -> dropped',
      'sound card sound -> dropped',
      'serial port serial0 -> dropped',
      'USB controller usb -> dropped',
    ]) {
      assert.ok(mappings.includes(expected), `missing '${expected}' in:\n${mappings.join('\n')}`);
    }
    // The same file on disk, and a human summary that says the same.
    assert.deepEqual(JSON.parse(readFileSync(join(out, 'report.json'), 'utf8')).mappings, report.mappings);
    const summary = readFileSync(join(out, 'report.txt'), 'utf8');
    for (const word of ['pvscsi', 'virtio-scsi', 'vmxnet3', 'floppy drive floppy0 -> dropped', 'sound card sound -> dropped']) {
      assert.ok(summary.includes(word), `summary lacks '${word}'`);
    }
    // DIR holds exactly the result.
    assert.deepEqual(readdirSync(out).sort(), ['report.json', 'report.txt', 'web01-disk0.qcow2', 'web01.xml']);
    const valid = run('virt-xml-validate', [join(out, 'web01.xml'), 'domain']);
    assert.equal(valid.code, 0, valid.stderr + valid.stdout);
    // The disk: qemu-img agrees on the content, and the report's hash is the raw content's.
    assert.equal(run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', fullVm.raw, join(out, 'web01-disk0.qcow2')]).code, 0);
    assert.equal(report.disks[0].targetSha256, await sha256File(fullVm.raw));
    assert.equal(report.disks[0].partitionTable.scheme, 'gpt');
    assert.deepEqual(
      report.stages.map((s: { stage: string }) => s.stage),
      ['inspect', 'map', 'plan', 'convert', 'descriptor', 'verify', 'commit'],
    );
    assert.equal(report.totals.virtualSize, 32 * MiB);
  });

  test('--disk-bus and --nic-model override, and an unsupported one fails before anything is written', () => {
    const out = join(dir, 'web01-qemu-sata');
    const r = migrate(fullVm.vmx, 'qemu', out, '--disk-bus', 'sata', '--nic-model', 'e1000', '--output=json');
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout);
    assert.equal(report.targetModel.disks[0].bus, 'sata');
    assert.equal(report.targetModel.nics[0].model, 'e1000');
    const script = readFileSync(join(out, 'web01.sh'), 'utf8');
    assert.match(script, /e1000/);
    const bad = migrate(fullVm.vmx, 'vmware', join(dir, 'never'), '--disk-bus', 'virtio');
    assert.equal(bad.code, 1);
    assert.match(bad.stderr, /^vmferry: --disk-bus virtio is not supported by target vmware/);
    assert.equal(existsSync(join(dir, 'never')), false);
  });
});

describe('migrate to every target', () => {
  const expected: Record<string, { files: string[]; format: string }> = {
    libvirt: { files: ['NAME-disk0.qcow2', 'NAME.xml'], format: 'qcow2' },
    qemu: { files: ['NAME-disk0.qcow2', 'NAME.sh'], format: 'qcow2' },
    proxmox: { files: ['NAME-disk0.qcow2', 'NAME.conf'], format: 'qcow2' },
    vmware: { files: ['NAME-disk0.vmdk', 'NAME.vmx'], format: 'vmdk' },
    ova: { files: ['NAME.ova'], format: 'vmdk' },
    virtualbox: { files: ['NAME-disk0.vdi', 'NAME.vbox'], format: 'vdi' },
    hyperv: { files: ['NAME-disk0.vhdx', 'NAME.ps1'], format: 'vhdx' },
    azure: { files: ['NAME-disk0.vhd'], format: 'vpc' },
  };
  // A UEFI VM with a disk size that is no whole number of MiB (Azure rounds it up).
  const vm = vmwareVm({ name: 'app02', firmware: 'efi', diskSize: 24 * MiB + 3 * 512 });
  for (const [target, e] of Object.entries(expected)) {
    test(`--to ${target}: the descriptor and the disks, content verified, qemu-img agrees`, async () => {
      const out = join(dir, `app02-${target}`);
      const r = migrate(vm.vmx, target, out, '--output=json');
      assert.equal(r.code, 0, r.stderr);
      const report = JSON.parse(r.stdout);
      const files = readdirSync(out);
      for (const f of e.files.map((n) => n.replace('NAME', 'app02')))
        assert.ok(files.includes(f), `${f} missing from ${files.join(', ')}`);
      assert.ok(files.includes('report.json'));
      for (const f of files) assert.ok(f === 'report.json' || report.files.includes(f), `${f} is not in the report's file list`);
      assert.equal(report.disks[0].targetFormat, e.format);
      assert.equal(report.disks[0].verified, true);
      const rawSha = await sha256File(vm.raw);
      assert.equal(report.disks[0].sourceSha256, rawSha);
      if (target === 'ova') {
        const names = runOk('tar', ['tf', join(out, 'app02.ova')])
          .trim()
          .split('\n');
        assert.equal(names[0], 'app02.ovf');
        runOk('tar', ['xf', join(out, 'app02.ova'), '-C', out, 'app02-disk0.vmdk']);
      }
      const diskFile = join(out, e.files[0]!.replace('NAME', 'app02').replace('app02.ova', 'app02-disk0.vmdk'));
      // qemu-img probes a fixed VHD as raw (its footer is at the end): name the format for Azure.
      const info = JSON.parse(qemuImg('info', ...(target === 'azure' ? ['-f', 'vpc'] : []), '--output=json', diskFile));
      assert.equal(info.format, e.format);
      if (target === 'azure') {
        assert.equal(info['virtual-size'], 25 * MiB, 'Azure disks are rounded up to a whole MiB');
        assert.ok(report.mappings.some((m: { from: string }) => /^disk0 size/.test(m.from)));
        // The guest content is the source's, then zeros.
        const rawOut = join(out, 'content.raw');
        qemuImg('convert', '-f', 'vpc', '-O', 'raw', diskFile, rawOut);
        const content = readFileSync(rawOut);
        assert.deepEqual(content.subarray(0, 24 * MiB + 1536), readFileSync(vm.raw));
        assert.ok(content.subarray(24 * MiB + 1536).every((b) => b === 0));
      } else {
        assert.equal(run('qemu-img', ['compare', '-f', 'raw', '-F', e.format, vm.raw, diskFile]).code, 0);
      }
    });
  }
});

describe('migrate between platforms in a chain, and Hyper-V generations', () => {
  test("VMX -> OVA -> libvirt -> VirtualBox -> Hyper-V: every hop reads the last one's output, same guest content", async () => {
    const rawSha = await sha256File(fullVm.raw);
    let source = fullVm.vmx;
    const hops: [string, (out: string) => string][] = [
      ['ova', (out) => join(out, 'web01.ova')],
      ['libvirt', (out) => join(out, 'web01.xml')],
      ['virtualbox', (out) => join(out, 'web01.vbox')],
      ['hyperv', (out) => out],
    ];
    const readers: string[] = [];
    for (const [target, next] of hops) {
      const out = join(dir, `chain-${target}`);
      const r = migrate(source, target, out, '--output=json');
      assert.equal(r.code, 0, `${target}: ${r.stderr}`);
      const report = JSON.parse(r.stdout);
      readers.push(report.sourceReader);
      assert.equal(report.disks[0].sourceSha256, rawSha, `${target}: source content`);
      assert.equal(report.disks[0].targetSha256, rawSha, `${target}: target content`);
      assert.equal(report.firmware, 'uefi');
      source = next(out);
    }
    assert.deepEqual(readers, ['vmware', 'ovf', 'libvirt', 'virtualbox']);
  });

  test('a BIOS VM onto Hyper-V is Generation 1: VHD disk on IDE', () => {
    const vm = vmwareVm({ name: 'gen1' });
    const out = join(dir, 'gen1-hyperv');
    const r = migrate(vm.vmx, 'hyperv', out, '--output=json');
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout);
    assert.equal(report.targetModel.generation, 1);
    assert.equal(report.targetModel.disks[0].bus, 'ide');
    // force_size keeps the exact size (no growth to a CHS geometry).
    assert.equal(report.disks[0].capacity, 32 * MiB);
    assert.ok(readdirSync(out).includes('gen1-disk0.vhd'));
    const info = JSON.parse(qemuImg('info', '--output=json', join(out, 'gen1-disk0.vhd')));
    assert.equal(info.format, 'vpc');
    assert.equal(info['virtual-size'], 32 * MiB);
    assert.equal(run('qemu-img', ['compare', '-f', 'raw', '-F', 'vpc', vm.raw, join(out, 'gen1-disk0.vhd')]).code, 0);
    assert.match(readFileSync(join(out, 'gen1.ps1'), 'utf8'), /-Generation 1/);
  });
});

describe('inspect', () => {
  test('a VMX: the model, the disk and its partition table (human and JSON)', () => {
    const human = vmferry('inspect', fullVm.vmx);
    assert.equal(human.code, 0, human.stderr);
    assert.match(human.stdout, /^name: web01$/m);
    assert.match(human.stdout, /^firmware: uefi$/m);
    assert.match(human.stdout, /^controller scsi0: scsi \(pvscsi\)$/m);
    assert.match(human.stdout, /partition table: GPT [0-9A-F-]+; looks UEFI-bootable/);
    assert.match(human.stdout, /EFI System \[ESP\]/);
    assert.match(human.stdout, /^nic0: vmxnet3 mac 00:50:56:3f:00:01$/m);
    const json = vmferry('inspect', '--output=json', fullVm.vmx);
    const r = JSON.parse(json.stdout);
    assert.equal(r.reader, 'vmware');
    assert.equal(r.model.cpus, 2);
    assert.equal(r.model.memory, 1024 * MiB);
    const sfdisk = JSON.parse(runOk('sfdisk', ['--json', fullVm.raw])).partitiontable;
    assert.equal(r.disks[0].partitionTable.id, sfdisk.id);
    assert.deepEqual(
      r.disks[0].partitionTable.partitions.map((p: { start: number; size: number }) => [p.start / 512, p.size / 512]),
      sfdisk.partitions.map((p: { start: number; size: number }) => [p.start, p.size]),
    );
    assert.deepEqual(r.warnings, []);
  });

  test('a descriptor saying BIOS over a GPT disk with an ESP is warned about, in inspect and in the migrate report', () => {
    const vm = vmwareVm({ name: 'mismatch' });
    const r = vmferry('inspect', vm.vmx);
    assert.match(r.stdout, /warning: disk0: the descriptor says BIOS but the boot disk looks UEFI-bootable/);
    const m = migrate(vm.vmx, 'qemu', join(dir, 'mismatch-out'), '--output=json');
    assert.equal(m.code, 0, m.stderr);
    assert.ok(JSON.parse(m.stdout).warnings.some((w: string) => /says BIOS but the boot disk looks UEFI/.test(w)));
  });

  test('corpus descriptors whose disks are not in the corpus: read, with the missing disk named', () => {
    const t = tmpDir();
    const vbox = vmferry('inspect', corpusFile('virtualbox/GOAD-DC01.vbox', t));
    assert.equal(vbox.code, 0, vbox.stderr);
    assert.match(vbox.stdout, /^guest: Windows Server 2016 \(64-bit\)/m);
    assert.match(vbox.stdout, /^nic0: e1000 \(82540EM\) mac 08:00:27:7a:a2:fc/m);
    assert.match(vbox.stdout, /^warning: disk0: cannot be opened: .*\{e6800503-8273-4f16-b584-c7ba2c1df698\}\.vmdk/m);
    const hv = vmferry('inspect', '--output=json', corpusFile('hyperv/test.vmcx', t));
    assert.equal(hv.code, 0, hv.stderr);
    assert.equal(JSON.parse(hv.stdout).model.generation, 1);
    // migrate refuses what it cannot copy, naming the file, and leaves nothing.
    const m = migrate(join(t, 'GOAD-DC01.vbox'), 'libvirt', join(t, 'out'));
    assert.equal(m.code, 1);
    assert.match(m.stderr, /^vmferry: .*\{e6800503-8273-4f16-b584-c7ba2c1df698\}\.vmdk: No such file or directory\n$/);
    assert.equal(existsSync(join(t, 'out')), false);
  });

  test('a bare disk image', () => {
    const r = vmferry('inspect', '--output=json', fullVm.raw);
    assert.equal(r.code, 0, r.stderr);
    const j = JSON.parse(r.stdout);
    assert.equal(j.reader, 'disk');
    assert.equal(j.disks[0].format, 'raw');
    assert.equal(j.disks[0].partitionTable.bootHint, 'uefi');
  });

  test('bad input is one line naming the file', () => {
    const missing = vmferry('inspect', join(dir, 'nope.vmx'));
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /^vmferry: .*nope\.vmx: No such file or directory\n$/);
    const enc = vmferry('inspect', corpusFile('vmware/encrypted.vmx', tmpDir()));
    assert.equal(enc.code, 1);
    assert.match(enc.stderr, /^vmferry: .*encrypted\.vmx: .*encrypted/i);
    assert.doesNotMatch(enc.stderr, /\n.+\n/);
    const unknown = migrate(fullVm.vmx, 'xen', join(dir, 'xen'));
    assert.equal(unknown.code, 1);
    assert.match(unknown.stderr, /Unknown target 'xen'/);
    assert.equal(existsSync(join(dir, 'xen')), false);
  });
});

/** xorshift: a reproducible random stream per seed. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x / 2 ** 32;
  };
}

function hiddenStaging(parent: string): string[] {
  return readdirSync(parent).filter((n) => /\.vmferry-(staging|old)-\d+$/.test(n));
}

describe('interrupted migrate', () => {
  // A VM with a realistic disk (ext4 tree, 256 MiB) so a run takes long enough to be cut anywhere.
  const folder = join(dir, 'big');
  mkdirSync(folder);
  qemuImg('convert', '-f', 'raw', '-O', 'vmdk', realisticRawImage(), join(folder, 'big.vmdk'));
  writeFileSync(
    join(folder, 'big.vmx'),
    'displayName = "big"\nmemsize = "512"\nscsi0.present = "TRUE"\nscsi0.virtualDev = "lsilogic"\nscsi0:0.present = "TRUE"\nscsi0:0.fileName = "big.vmdk"\n',
  );
  const vmx = join(folder, 'big.vmx');

  /** Starts a migrate and sends `signal` after `ms`, or once `when` holds (polled). */
  async function runKilledAfter(out: string, ms: number, signal: NodeJS.Signals, when?: () => boolean): Promise<number | null> {
    const child = spawn(process.execPath, [vmferryBin, 'migrate', vmx, '--to', 'qemu', '--out', out], { stdio: 'ignore' });
    const timer = when
      ? setInterval(() => {
          if (when()) child.kill(signal);
        }, 20)
      : setTimeout(() => child.kill(signal), ms);
    return new Promise((resolve) => {
      child.on('exit', (code) => {
        clearInterval(timer);
        clearTimeout(timer);
        resolve(code);
      });
    });
  }

  /** DIR after an interruption: absent, empty, or a complete result (every listed file, verified). */
  function assertNoHalfResult(out: string): 'absent' | 'complete' {
    if (!existsSync(out)) return 'absent';
    const names = readdirSync(out);
    if (names.length === 0) return 'absent';
    assert.ok(names.includes('report.json'), `a half result in ${out}: ${names.join(', ')}`);
    const report = JSON.parse(readFileSync(join(out, 'report.json'), 'utf8'));
    assert.deepEqual(names.sort(), [...report.files, 'report.json'].sort());
    assert.equal(run('qemu-img', ['compare', '-f', 'raw', realisticRawImage(), join(out, 'big-disk0.qcow2')]).code, 0);
    return 'complete';
  }

  test('kill -9 at random points (5 seeds): no half result in DIR, and a rerun completes and cleans up', async () => {
    const sourceSha = await sha256File(join(folder, 'big.vmdk'));
    // How long a whole run takes here, to spread the kills over it.
    const t0 = Date.now();
    const full = migrate(vmx, 'qemu', join(dir, 'big-timing'));
    assert.equal(full.code, 0, full.stderr);
    const span = Date.now() - t0;
    const states: string[] = [];
    for (const seed of [1, 2, 3, 4, 5]) {
      const out = join(dir, `big-killed-${seed}`);
      const at = Math.floor(rng(seed)() * span * 1.1);
      await runKilledAfter(out, at, 'SIGKILL');
      states.push(`${at}ms:${assertNoHalfResult(out)}`);
      const again = migrate(vmx, 'qemu', out, '--output=json');
      assert.equal(again.code, 0, again.stderr);
      assert.equal(assertNoHalfResult(out), 'complete');
      assert.deepEqual(
        hiddenStaging(dirname(out)).filter((n) => n.includes(basename(out))),
        [],
        'stale staging removed',
      );
    }
    assert.equal(await sha256File(join(folder, 'big.vmdk')), sourceSha, 'the source is never written');
    assert.ok(
      states.some((s) => s.endsWith('absent')),
      `no kill landed mid-run: ${states.join(' ')}`,
    );
  });

  test('SIGINT mid-run: exit 130, no staging left behind, DIR untouched', async () => {
    const out = join(dir, 'big-sigint');
    // Interrupted while it converts: once its staging folder holds a disk being written.
    const converting = () =>
      hiddenStaging(dir)
        .filter((n) => n.includes('big-sigint'))
        .some((n) => readdirSync(join(dir, n)).length > 0);
    const code = await runKilledAfter(out, 0, 'SIGINT', converting);
    assert.equal(code, 130);
    assert.equal(assertNoHalfResult(out), 'absent');
    assert.deepEqual(
      hiddenStaging(dir).filter((n) => n.includes('big-sigint')),
      [],
    );
  });

  test('a rerun over a previous result replaces it; a folder with other files keeps them', () => {
    const out = join(dir, 'big-rerun');
    assert.equal(migrate(vmx, 'qemu', out).code, 0);
    const first = JSON.parse(readFileSync(join(out, 'report.json'), 'utf8'));
    assert.equal(migrate(vmx, 'libvirt', out).code, 0);
    assert.deepEqual(readdirSync(out).sort(), ['big-disk0.qcow2', 'big.xml', 'report.json', 'report.txt']);
    assert.equal(first.target, 'qemu');
    const shared = join(dir, 'shared-folder');
    mkdirSync(shared);
    writeFileSync(join(shared, 'notes.txt'), 'mine');
    assert.equal(migrate(vmx, 'qemu', shared).code, 0);
    assert.equal(readFileSync(join(shared, 'notes.txt'), 'utf8'), 'mine');
    assert.ok(existsSync(join(shared, 'big.sh')));
  });
});
