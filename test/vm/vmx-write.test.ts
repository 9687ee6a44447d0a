/** The VMware target: NAME.vmx written, read back by the VMX reader into the same model. */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { UnsupportedFeatureError } from '../../src/disk/errors.js';
import type { TargetDisk } from '../../src/vm/dialect.js';
import { emptyModel, MiB, type VmModel } from '../../src/vm/model.js';
import { readVmx } from '../../src/vm/readers/vmx.js';
import { targetWriter } from '../../src/vm/registry.js';
import { vmwareGuestId, vmwareTarget } from '../../src/vm/targets/vmware.js';
import { qemuImg, tmpDir } from '../helpers/index.js';

function sourceModel(): VmModel {
  const m = emptyModel('app server #1', 'virtualbox');
  m.firmware = 'uefi';
  m.secureBoot = true;
  m.cpus = 6;
  m.coresPerSocket = 3;
  m.memory = 6144 * MiB;
  m.uuid = '0b6c4f4e-2f7d-4a39-9d3c-6a2f51e1c0de';
  m.guest = { sourceId: 'Windows2019_64', family: 'windows', is64bit: true, description: 'Windows Server 2019 (64-bit)' };
  m.controllers = [
    { id: 'scsi0', bus: 'scsi', model: 'pvscsi' },
    { id: 'sata0', bus: 'sata' },
    { id: 'nvme0', bus: 'nvme' },
  ];
  m.disks = [
    { path: '/src/a.vdi', bus: 'scsi', controller: 'scsi0', unit: 0, capacity: 64 * MiB },
    { path: '/src/b.vdi', bus: 'sata', controller: 'sata0', unit: 2, capacity: 32 * MiB },
    { path: '/src/c.vdi', bus: 'nvme', controller: 'nvme0', unit: 0, capacity: 16 * MiB },
  ];
  m.cdroms = [{ bus: 'sata', controller: 'sata0', unit: 1, path: '/isos/win.iso' }];
  m.nics = [
    { model: 'vmxnet3', mac: '08:00:27:12:34:56', network: 'Production' },
    { model: 'e1000e', mac: '00:50:56:00:00:42', network: 'Backup' },
    { model: 'e1000', mac: '00:0c:29:01:02:03' },
  ];
  return m;
}

describe('vmware target', () => {
  test('is registered with the profile the brief names', () => {
    const t = targetWriter('vmware');
    assert.equal(t, vmwareTarget);
    assert.deepEqual(t.profile.diskOptions, { subformat: 'monolithicSparse' });
    assert.deepEqual([...t.profile.diskBuses].sort(), ['ide', 'nvme', 'sata', 'scsi']);
    assert.deepEqual([...t.profile.scsiModels].sort(), ['buslogic', 'lsilogic', 'lsisas1068', 'pvscsi']);
    assert.deepEqual([...t.profile.nicModels].sort(), ['e1000', 'e1000e', 'vmxnet3']);
  });

  test('round trip: write NAME.vmx, read it back, same model', async () => {
    const out = tmpDir('vmferry-vmx-write-');
    const src = sourceModel();
    const disks: TargetDisk[] = src.disks.map((d, i) => ({
      index: i,
      fileName: `app-server-1-disk${i}.vmdk`,
      format: 'vmdk',
      capacity: d.capacity!,
    }));
    for (const d of disks) qemuImg('create', '-f', 'vmdk', join(out, d.fileName), String(d.capacity));
    const files = await vmwareTarget.write(src, disks, out);
    assert.deepEqual(files, ['app-server-1.vmx']);
    assert.deepEqual(
      readdirSync(out).filter((f) => f.includes('.vmferry-tmp-')),
      [],
      'no temp file left',
    );
    const text = readFileSync(join(out, files[0]!), 'utf8');
    assert.match(text, /^config\.version = "8"$/m);
    assert.match(text, /^virtualHW\.version = "19"$/m);
    assert.match(text, /^guestOS = "windows2019srv-64"$/m);
    assert.match(text, /^displayName = "app server \|231"$/m, '# is escaped as |23');

    const back = await readVmx(join(out, files[0]!));
    assert.equal(back.name, src.name);
    assert.equal(back.firmware, 'uefi');
    assert.equal(back.secureBoot, true);
    assert.equal(back.cpus, 6);
    assert.equal(back.coresPerSocket, 3);
    assert.equal(back.memory, src.memory);
    assert.equal(back.uuid, src.uuid);
    assert.equal(back.guest.sourceId, 'windows2019srv-64');
    assert.equal(back.guest.family, 'windows');
    assert.deepEqual(
      back.controllers,
      [...src.controllers].sort((a, b) => a.id.localeCompare(b.id)),
    );
    const key = (d: { bus: string; controller?: string; unit?: number }) => `${d.controller}:${d.unit}`;
    assert.deepEqual(back.disks.map(key).sort(), src.disks.map(key).sort());
    for (const d of back.disks) {
      const i = src.disks.findIndex((s) => key(s) === key(d));
      assert.equal(d.path, join(out, disks[i]!.fileName));
      assert.equal(d.capacity, src.disks[i]!.capacity);
      assert.equal(d.format, 'vmdk');
    }
    assert.deepEqual(back.cdroms, src.cdroms);
    assert.deepEqual(
      back.nics.map(({ model, mac, network }) => ({ model, mac, network })),
      src.nics.map(({ model, mac, network }) => ({ model, mac, network })),
    );
    // A MAC outside VMware's static range is kept, with the check that would refuse it turned off.
    assert.match(text, /^ethernet0\.checkMACAddress = "FALSE"$/m);
    assert.doesNotMatch(text, /^ethernet1\.checkMACAddress/m);
    assert.match(text, /^ethernet2\.addressType = "generated"$/m);
    assert.deepEqual(back.warnings, []);
  });

  test('a BIOS VM with a lsilogic controller, IDE disk and no NIC', async () => {
    const out = tmpDir('vmferry-vmx-write-');
    const m = emptyModel('plain', 'libvirt');
    m.guest = { family: 'linux', description: 'Debian GNU/Linux 12' };
    m.memory = 1000 * MiB; // not a multiple of 4 MiB: rounded up
    m.controllers = [{ id: 'scsi0', bus: 'scsi', model: 'lsilogic' }];
    m.disks = [
      { path: '/x/a.qcow2', bus: 'scsi', controller: 'scsi0', capacity: MiB },
      { path: '/x/b.qcow2', bus: 'ide', capacity: MiB },
    ];
    const disks: TargetDisk[] = m.disks.map((d, i) => ({
      index: i,
      fileName: `plain-disk${i}.vmdk`,
      format: 'vmdk',
      capacity: d.capacity!,
    }));
    for (const d of disks) qemuImg('create', '-f', 'vmdk', join(out, d.fileName), String(d.capacity));
    await vmwareTarget.write(m, disks, out);
    const back = await readVmx(join(out, 'plain.vmx'));
    assert.equal(back.firmware, 'bios');
    assert.equal(back.memory, 1000 * MiB);
    assert.equal(back.guest.sourceId, 'debian12-64');
    assert.equal(vmwareGuestId(back.guest), 'debian12-64');
    assert.deepEqual(
      back.disks.map((d) => [d.bus, d.controller, d.unit]),
      [
        ['ide', 'ide0', 0],
        ['scsi', 'scsi0', 0],
      ],
    );
    assert.deepEqual(back.nics, []);
  });

  test('a virtio disk that was not mapped is refused with a clear error', async () => {
    const out = tmpDir('vmferry-vmx-write-');
    const m = emptyModel('kvm', 'libvirt');
    m.disks = [{ path: '/x/a.qcow2', bus: 'virtio', capacity: MiB }];
    await assert.rejects(
      vmwareTarget.write(m, [{ index: 0, fileName: 'kvm-disk0.vmdk', format: 'vmdk', capacity: MiB }], out),
      (err: unknown) => err instanceof UnsupportedFeatureError && /virtio/.test(err.message),
    );
    assert.deepEqual(readdirSync(out), []);
  });
});
