/** The VMX reader: the corpus's encrypted VMX, a hand-written VMX with every device kind, bad input. */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { CorruptImageError, UnsafeReferenceError, UnsupportedFeatureError } from '../../src/disk/errors.js';
import { MiB } from '../../src/vm/model.js';
import { readVmx, vmxReader } from '../../src/vm/readers/vmx.js';
import { detectVmReader } from '../../src/vm/registry.js';
import { corpusDir, qemuImg, tmpDir } from '../helpers/index.js';

/** Guest size as qemu-img (an independent reader) reports it. */
function qemuSize(path: string): number {
  return JSON.parse(qemuImg('info', '--output=json', path))['virtual-size'];
}

describe('vmx reader: corpus encrypted.vmx', () => {
  const path = join(corpusDir, 'vmware/encrypted.vmx');
  test('is recognised as a VMX', () => {
    assert.equal(detectVmReader(path), vmxReader);
  });
  test('gives a clear "encrypted VM" UnsupportedFeatureError naming the file', async () => {
    await assert.rejects(readVmx(path), (err: unknown) => {
      assert.ok(err instanceof UnsupportedFeatureError, String(err));
      assert.match(err.message, /encrypted VM/);
      assert.equal(err.file, path);
      assert.match(err.describe(), /encrypted\.vmx: encrypted VM/);
      return true;
    });
  });
});

describe('vmx reader: every device kind', () => {
  const dir = tmpDir('vmferry-vmx-');
  // Disks written by qemu-img, one a snapshot delta over a base (parentFileNameHint).
  qemuImg('create', '-f', 'vmdk', join(dir, 'base.vmdk'), '64M');
  qemuImg('create', '-f', 'vmdk', '-b', 'base.vmdk', '-F', 'vmdk', join(dir, 'sys-000001.vmdk'));
  qemuImg('create', '-f', 'vmdk', join(dir, 'data.vmdk'), '32M');
  qemuImg('create', '-f', 'vmdk', '-o', 'subformat=monolithicFlat', join(dir, 'sata.vmdk'), '16M');
  qemuImg('create', '-f', 'vmdk', join(dir, 'fast.vmdk'), '8M');
  qemuImg('create', '-f', 'vmdk', join(dir, 'old.vmdk'), '4M');
  const vmx = join(dir, 'every.vmx');
  writeFileSync(
    vmx,
    [
      '.encoding = "UTF-8"',
      'config.version = "8"',
      'virtualHW.version = "17"',
      '# a comment line',
      'displayName = "Web |22front|22 |7C prod"',
      'guestOS = "ubuntu-64"',
      'firmware = "efi"',
      'uefi.secureBoot.enabled = "TRUE"',
      'memSize = "3072"',
      'numvcpus = "4"',
      'cpuid.coresPerSocket = "2"',
      'uuid.bios = "56 4d 12 34 56 78 9a bc-de f0 11 22 33 44 55 66"',
      'scsi0.present = "TRUE"',
      'scsi0.virtualDev = "pvscsi"',
      'scsi0:0.present = "TRUE"',
      'scsi0:0.fileName = "sys-000001.vmdk"',
      'scsi1.present = "TRUE"',
      'scsi1.virtualDev = "lsisas1068"',
      'scsi1:3.present = "TRUE"',
      'scsi1:3.deviceType = "scsi-hardDisk"',
      'scsi1:3.fileName = "data.vmdk"',
      'scsi1:3.mode = "independent-persistent"',
      'scsi2.present = "TRUE"',
      'scsi2.virtualDev = "buslogic"',
      'scsi3.present = "TRUE"',
      'scsi3.virtualDev = "lsilogic"',
      'sata0.present = "TRUE"',
      'sata0:0.present = "TRUE"',
      'sata0:0.fileName = "sata.vmdk"',
      'sata0:1.present = "TRUE"',
      'sata0:1.deviceType = "cdrom-image"',
      'sata0:1.fileName = "/isos/ubuntu.iso"',
      'nvme0.present = "TRUE"',
      'nvme0:0.present = "TRUE"',
      'nvme0:0.fileName = "fast.vmdk"',
      'ide0:0.present = "TRUE"',
      'ide0:0.fileName = "old.vmdk"',
      'ide1:0.present = "TRUE"',
      'ide1:0.deviceType = "cdrom-raw"',
      'ide1:0.fileName = "auto detect"',
      'ide1:1.present = "FALSE"',
      'ide1:1.fileName = "gone.vmdk"',
      'ethernet0.present = "TRUE"',
      'ethernet0.virtualDev = "vmxnet3"',
      'ethernet0.networkName = "VM Network"',
      'ethernet0.addressType = "static"',
      'ethernet0.address = "00:50:56:3F:00:01"',
      'ethernet1.present = "TRUE"',
      'ethernet1.virtualDev = "e1000e"',
      'ethernet1.connectionType = "nat"',
      'ethernet1.addressType = "generated"',
      'ethernet1.generatedAddress = "00:0c:29:aa:bb:cc"',
      'ethernet2.present = "TRUE"',
      'ethernet2.virtualDev = "e1000"',
      'ethernet2.connectionType = "custom"',
      'ethernet2.vnet = "VMnet3"',
      'ethernet3.present = "TRUE"',
      'ethernet4.present = "FALSE"',
      'ethernet4.virtualDev = "vmxnet3"',
      'floppy0.present = "TRUE"',
      'sound.present = "TRUE"',
      'nvram = "every.nvram"',
      '',
    ].join('\n'),
  );
  writeFileSync(
    join(dir, 'every.vmsd'),
    [
      '.encoding = "UTF-8"',
      'snapshot.lastUID = "2"',
      'snapshot.current = "2"',
      'snapshot0.uid = "1"',
      'snapshot0.filename = "every-Snapshot1.vmsn"',
      'snapshot0.displayName = "before upgrade"',
      'snapshot0.description = "clean |22install|22"',
      'snapshot0.createTimeHigh = "397150"',
      'snapshot0.createTimeLow = "-1536837328"',
      'snapshot0.numDisks = "1"',
      'snapshot0.disk0.fileName = "base.vmdk"',
      'snapshot1.uid = "2"',
      'snapshot1.parent = "1"',
      'snapshot1.displayName = "after upgrade"',
      'snapshot.numSnapshots = "2"',
      '',
    ].join('\n'),
  );

  test('is recognised by content and name', () => {
    assert.equal(detectVmReader(vmx), vmxReader);
  });

  test('reads the expected model', async () => {
    const m = await readVmx(vmx);
    assert.equal(m.name, 'Web "front" | prod');
    assert.equal(m.sourcePlatform, 'vmware');
    assert.equal(m.firmware, 'uefi');
    assert.equal(m.secureBoot, true);
    assert.equal(m.cpus, 4);
    assert.equal(m.coresPerSocket, 2);
    assert.equal(m.memory, 3072 * MiB);
    assert.equal(m.uuid, '564d1234-5678-9abc-def0-112233445566');
    assert.deepEqual(m.guest, { sourceId: 'ubuntu-64', family: 'linux', is64bit: true, description: 'Ubuntu Linux (64-bit)' });
    assert.deepEqual(m.controllers, [
      { id: 'ide0', bus: 'ide' },
      { id: 'ide1', bus: 'ide' },
      { id: 'nvme0', bus: 'nvme' },
      { id: 'sata0', bus: 'sata' },
      { id: 'scsi0', bus: 'scsi', model: 'pvscsi' },
      { id: 'scsi1', bus: 'scsi', model: 'lsisas1068' },
      { id: 'scsi2', bus: 'scsi', model: 'buslogic' },
      { id: 'scsi3', bus: 'scsi', model: 'lsilogic' },
    ]);
    const disks = m.disks.map((d) => ({ file: d.path.slice(dir.length + 1), bus: d.bus, ctl: d.controller, unit: d.unit }));
    assert.deepEqual(disks, [
      { file: 'old.vmdk', bus: 'ide', ctl: 'ide0', unit: 0 },
      { file: 'fast.vmdk', bus: 'nvme', ctl: 'nvme0', unit: 0 },
      { file: 'sata.vmdk', bus: 'sata', ctl: 'sata0', unit: 0 },
      { file: 'sys-000001.vmdk', bus: 'scsi', ctl: 'scsi0', unit: 0 },
      { file: 'data.vmdk', bus: 'scsi', ctl: 'scsi1', unit: 3 },
    ]);
    for (const d of m.disks) {
      assert.equal(d.format, 'vmdk');
      assert.equal(d.capacity, qemuSize(d.path), d.path);
    }
    // The snapshot delta is the disk the VM runs from; its chain is the VMDK's own business.
    const sys = m.disks.find((d) => d.path.endsWith('sys-000001.vmdk'))!;
    assert.deepEqual(sys.notes, ["snapshot delta; parent 'base.vmdk'"]);
    assert.deepEqual(m.disks.find((d) => d.path.endsWith('data.vmdk'))!.notes, ['mode independent-persistent']);
    assert.deepEqual(m.cdroms, [
      { bus: 'ide', controller: 'ide1', unit: 0 },
      { bus: 'sata', controller: 'sata0', unit: 1, path: '/isos/ubuntu.iso' },
    ]);
    assert.deepEqual(m.nics, [
      { model: 'vmxnet3', sourceModel: 'vmxnet3', mac: '00:50:56:3f:00:01', network: 'VM Network' },
      { model: 'e1000e', sourceModel: 'e1000e', mac: '00:0c:29:aa:bb:cc', network: 'nat' },
      { model: 'e1000', sourceModel: 'e1000', network: 'VMnet3' },
      { model: 'pcnet', sourceModel: 'vlance (default)' },
    ]);
    assert.deepEqual(m.snapshots, [
      {
        id: '1',
        name: 'before upgrade',
        description: 'clean "install"',
        // createTimeHigh/Low: microseconds since the epoch, split in two signed 32-bit halves
        createdAt: '2024-01-20T11:10:19.736Z',
      },
      { id: '2', name: 'after upgrade', parent: '1', current: true },
    ]);
    const unmapped = new Map(m.unmapped.map((u) => [u.key, u.value]));
    assert.equal(unmapped.get('floppy0.present'), 'TRUE');
    assert.equal(unmapped.get('sound.present'), 'TRUE');
    assert.equal(unmapped.get('virtualHW.version'), '17');
    assert.equal(unmapped.get('nvram'), 'every.nvram');
    assert.ok(!unmapped.has('memSize') && !unmapped.has('scsi0:0.fileName'), 'mapped keys are not listed as unmapped');
    assert.deepEqual(m.warnings, []);
  });

  test('a missing disk is a warning, not a failure', async () => {
    const path = join(dir, 'missing.vmx');
    writeFileSync(path, 'memsize = "512"\nscsi0.present = "TRUE"\nscsi0:0.present = "TRUE"\nscsi0:0.fileName = "nowhere.vmdk"\n');
    const m = await readVmx(path);
    assert.equal(m.disks.length, 1);
    assert.match(m.warnings.join('\n'), /nowhere\.vmdk' not found/);
  });

  test('a disk outside the folder is refused unless allowed', async () => {
    const sub = join(dir, 'sub');
    qemuImg('create', '-f', 'vmdk', join(dir, 'outside.vmdk'), '1M');
    const { mkdirSync } = await import('node:fs');
    mkdirSync(sub, { recursive: true });
    const path = join(sub, 'escape.vmx');
    writeFileSync(path, 'memsize = "512"\nide0:0.present = "TRUE"\nide0:0.fileName = "../outside.vmdk"\n');
    await assert.rejects(readVmx(path), UnsafeReferenceError);
    const m = await readVmx(path, { allowExternalFiles: true });
    assert.equal(m.disks[0]!.capacity, qemuSize(join(dir, 'outside.vmdk')));
  });

  test('a line that is not key = value is a CorruptImageError naming the file', async () => {
    const path = join(dir, 'bad.vmx');
    writeFileSync(path, 'memsize = "512"\nthis is not vmx\n');
    await assert.rejects(
      readVmx(path),
      (err: unknown) => err instanceof CorruptImageError && err.file === path && /line 2/.test(err.message),
    );
    writeFileSync(path, 'displayName = "unterminated\n');
    await assert.rejects(readVmx(path), CorruptImageError);
  });
});
