import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { UnsupportedFeatureError, UsageError } from '../../src/disk/errors.js';
import type { TargetProfile } from '../../src/vm/dialect.js';
import { droppedDevices, mapModel, TARGET_CAPABILITIES } from '../../src/vm/mapping.js';
import { emptyModel, MiB, type TranslationNote, type VmModel } from '../../src/vm/model.js';
import { targetWriter } from '../../src/vm/registry.js';

/** A VMware Linux VM as an administrator would meet it: pvscsi, vmxnet3, floppy, sound, USB, serial. */
function vmwareVm(): VmModel {
  const m = emptyModel('web01', 'vmware');
  m.sourceFile = '/vms/web01/web01.vmx';
  m.firmware = 'bios';
  m.cpus = 4;
  m.coresPerSocket = 2;
  m.memory = 4096 * MiB;
  m.guest = { sourceId: 'debian11-64', family: 'linux', is64bit: true };
  m.controllers = [
    { id: 'scsi0', bus: 'scsi', model: 'pvscsi' },
    { id: 'sata0', bus: 'sata' },
  ];
  m.disks = [
    { path: '/vms/web01/web01.vmdk', format: 'vmdk', capacity: 8 << 30, bus: 'scsi', controller: 'scsi0', unit: 0 },
    { path: '/vms/web01/web01_1.vmdk', format: 'vmdk', capacity: 1 << 30, bus: 'scsi', controller: 'scsi0', unit: 1 },
  ];
  m.cdroms = [{ bus: 'sata', controller: 'sata0', unit: 0, path: '/isos/debian.iso' }];
  m.nics = [{ model: 'vmxnet3', sourceModel: 'vmxnet3', mac: '00:50:56:aa:bb:cc', network: 'VM Network' }];
  m.unmapped = [
    { key: 'floppy0.present', value: 'TRUE' },
    { key: 'floppy0.fileName', value: '/dev/fd0' },
    { key: 'sound.present', value: 'TRUE' },
    { key: 'sound.virtualDev', value: 'hdaudio' },
    { key: 'usb.present', value: 'TRUE' },
    { key: 'serial0.present', value: 'TRUE' },
    { key: 'serial1.present', value: 'FALSE' },
    { key: 'tools.syncTime', value: 'FALSE' },
  ];
  return m;
}

const profileOf = (target: string): TargetProfile => targetWriter(target).profile;
const find = (notes: TranslationNote[], from: RegExp) => notes.filter((n) => from.test(n.from));

describe('mapModel onto KVM targets', () => {
  for (const target of ['libvirt', 'qemu', 'proxmox']) {
    test(`${target}: pvscsi -> virtio-scsi, vmxnet3 -> virtio, floppy/sound/USB/serial dropped and named`, () => {
      const src = vmwareVm();
      const { model, notes } = mapModel(src, profileOf(target));
      assert.deepEqual(
        model.disks.map((d) => [d.bus, d.controller, d.unit]),
        [
          ['scsi', 'scsi0', 0],
          ['scsi', 'scsi0', 1],
        ],
      );
      assert.deepEqual(
        model.controllers.find((c) => c.id === 'scsi0'),
        { id: 'scsi0', bus: 'scsi', model: 'virtio-scsi' },
      );
      assert.equal(model.nics[0]!.model, 'virtio');
      assert.equal(model.nics[0]!.mac, '00:50:56:aa:bb:cc');
      assert.deepEqual(
        find(notes, /^disk0/).map((n) => n.to),
        ['scsi (virtio-scsi)'],
      );
      assert.deepEqual(
        find(notes, /^nic0/).map((n) => n.to),
        ['virtio'],
      );
      assert.deepEqual(
        find(notes, /^controller scsi0 \(scsi, pvscsi\)/).map((n) => n.to),
        ['scsi0 (scsi, virtio-scsi)'],
      );
      const dropped = notes.filter((n) => n.to === 'dropped').map((n) => n.from);
      assert.ok(dropped.includes('floppy drive floppy0'), dropped.join(' | '));
      assert.ok(dropped.includes('sound card sound'), dropped.join(' | '));
      assert.ok(dropped.includes('USB controller usb'), dropped.join(' | '));
      assert.ok(dropped.includes('serial port serial0'), dropped.join(' | '));
      assert.ok(!dropped.some((d) => d.includes('serial1')), 'serial1.present = FALSE is no device');
      // The ISO is not carried, and says so.
      assert.equal(model.cdroms[0]!.path, undefined);
      assert.equal(find(notes, /^cdrom0 ISO \/isos\/debian.iso/).length, 1);
      // The source model is untouched.
      assert.equal(src.controllers[0]!.model, 'pvscsi');
      assert.equal(src.nics[0]!.model, 'vmxnet3');
    });
  }

  test('--disk-bus and --nic-model override every device, and the notes say so', () => {
    const { model, notes } = mapModel(vmwareVm(), profileOf('libvirt'), { diskBus: 'virtio', nicModel: 'e1000' });
    assert.deepEqual(
      model.disks.map((d) => [d.bus, d.controller]),
      [
        ['virtio', undefined],
        ['virtio', undefined],
      ],
    );
    assert.equal(model.nics[0]!.model, 'e1000');
    assert.match(find(notes, /^disk1/)[0]!.why, /--disk-bus/);
    assert.match(find(notes, /^nic0/)[0]!.why, /--nic-model/);
    // No SCSI disk is left: the pvscsi controller goes, named.
    assert.ok(!model.controllers.some((c) => c.bus === 'scsi'));
    assert.equal(find(notes, /^controller scsi0/)[0]!.to, 'dropped');
  });

  test('an unknown or unsupported override is a usage error', () => {
    assert.throws(() => mapModel(vmwareVm(), profileOf('libvirt'), { diskBus: 'floppy' }), UsageError);
    assert.throws(() => mapModel(vmwareVm(), profileOf('vmware'), { diskBus: 'virtio' }), UsageError);
    assert.throws(() => mapModel(vmwareVm(), profileOf('hyperv'), { nicModel: 'virtio' }), UsageError);
  });

  test('a Windows guest moved onto virtio is warned about its drivers', () => {
    const src = vmwareVm();
    src.guest = { family: 'windows', sourceId: 'windows2019srv-64' };
    const { notes } = mapModel(src, profileOf('qemu'));
    assert.match(find(notes, /^disk0/)[0]!.why, /virtio-win/);
    assert.match(find(notes, /^nic0/)[0]!.why, /virtio-win/);
  });
});

describe('mapModel onto VMware targets', () => {
  for (const target of ['vmware', 'ova']) {
    test(`${target}: pvscsi kept, vmxnet3 kept, virtio disk -> scsi lsilogic, virtio NIC -> vmxnet3`, () => {
      const kept = mapModel(vmwareVm(), profileOf(target));
      assert.deepEqual(
        kept.model.controllers.find((c) => c.id === 'scsi0'),
        { id: 'scsi0', bus: 'scsi', model: 'pvscsi' },
      );
      assert.deepEqual(
        kept.model.disks.map((d) => [d.bus, d.controller, d.unit]),
        [
          ['scsi', 'scsi0', 0],
          ['scsi', 'scsi0', 1],
        ],
      );
      assert.equal(kept.model.nics[0]!.model, 'vmxnet3');
      assert.equal(find(kept.notes, /^disk|^nic/).length, 0);

      const kvm = emptyModel('kvm01', 'libvirt');
      kvm.disks = [{ path: '/x/a.qcow2', bus: 'virtio' }];
      kvm.nics = [{ model: 'virtio' }];
      const { model, notes } = mapModel(kvm, profileOf(target));
      assert.deepEqual(model.disks[0]!.bus, 'scsi');
      assert.deepEqual(model.controllers, [{ id: 'scsi0', bus: 'scsi', model: 'lsilogic' }]);
      assert.equal(model.nics[0]!.model, 'vmxnet3');
      assert.deepEqual(
        notes.map((n) => `${n.from} -> ${n.to}`),
        ['disk0 on virtio -> scsi (lsilogic)', 'nic0 virtio -> vmxnet3'],
      );
    });
  }
});

describe('mapModel onto Hyper-V, Azure and VirtualBox', () => {
  test('hyperv: a UEFI VM becomes Generation 2 with every disk on SCSI', () => {
    const src = vmwareVm();
    src.firmware = 'uefi';
    src.disks[1]!.bus = 'sata';
    src.disks[1]!.controller = 'sata0';
    src.disks[1]!.unit = 1;
    const { model, notes } = mapModel(src, profileOf('hyperv'));
    assert.equal(model.generation, 2);
    assert.deepEqual(
      model.disks.map((d) => d.bus),
      ['scsi', 'scsi'],
    );
    assert.deepEqual(
      model.controllers.map((c) => c.model),
      ['hyperv-scsi'],
    );
    assert.equal(model.cdroms[0]!.bus, 'scsi');
    assert.equal(model.nics[0]!.model, 'hyperv');
    assert.equal(find(notes, /^firmware uefi/)[0]!.to, 'Generation 2');
  });

  test('hyperv: a BIOS VM becomes Generation 1 booting from IDE, data disks on SCSI', () => {
    const { model } = mapModel(vmwareVm(), profileOf('hyperv'));
    assert.equal(model.generation, 1);
    assert.deepEqual(
      model.disks.map((d) => [d.bus, d.unit]),
      [
        ['ide', 0],
        ['scsi', 1],
      ],
    );
    assert.equal(model.cdroms[0]!.bus, 'ide');
  });

  test('a Hyper-V Generation 2 source is UEFI on any target', () => {
    const src = emptyModel('hv', 'hyperv');
    src.generation = 2;
    src.firmware = 'bios'; // a reader that forgot: the generation decides
    src.controllers = [{ id: 'scsi0', bus: 'scsi', model: 'hyperv-scsi' }];
    src.disks = [{ path: '/x/a.vhdx', bus: 'scsi', controller: 'scsi0', unit: 0 }];
    src.nics = [{ model: 'hyperv' }];
    const { model, notes } = mapModel(src, profileOf('libvirt'));
    assert.equal(model.firmware, 'uefi');
    assert.deepEqual(model.controllers, [{ id: 'scsi0', bus: 'scsi', model: 'virtio-scsi' }]);
    assert.equal(model.nics[0]!.model, 'virtio');
    assert.deepEqual(
      notes.map((n) => n.to),
      ['uefi', 'scsi (virtio-scsi)', 'scsi0 (scsi, virtio-scsi)', 'virtio'],
    );
  });

  test('azure: memory not a multiple of 2 MiB is rounded, with a note', () => {
    const src = vmwareVm();
    src.memory = 1000 * MiB + 512 * 1024;
    const { model, notes } = mapModel(src, profileOf('azure'));
    assert.equal(model.memory, 1002 * MiB);
    assert.equal(find(notes, /^memory/).length, 1);
  });

  test('virtualbox: pvscsi -> lsilogic, vmxnet3 -> e1000', () => {
    const { model } = mapModel(vmwareVm(), profileOf('virtualbox'));
    assert.deepEqual(
      model.controllers.filter((c) => c.bus === 'scsi').map((c) => c.model),
      ['lsilogic'],
    );
    assert.equal(model.nics[0]!.model, 'e1000');
  });
});

describe('firmware, topology, snapshots', () => {
  const biosOnly: TargetProfile = { ...profileOf('qemu'), target: 'legacy', firmware: ['bios'] };
  test('a UEFI VM onto a BIOS-only target is refused, naming the descriptor', () => {
    const src = vmwareVm();
    src.firmware = 'uefi';
    assert.throws(
      () => mapModel(src, biosOnly),
      (e: unknown) => e instanceof UnsupportedFeatureError && e.file === '/vms/web01/web01.vmx' && /UEFI/.test(e.message),
    );
  });
  test('forcing the firmware is allowed and loud', () => {
    const src = vmwareVm();
    src.firmware = 'uefi';
    src.secureBoot = true;
    const { model, notes } = mapModel(src, biosOnly, { firmware: 'bios' });
    assert.equal(model.firmware, 'bios');
    assert.equal(model.secureBoot, false);
    assert.match(find(notes, /^firmware uefi/)[0]!.why, /forced/);
    assert.equal(find(notes, /^secure boot/)[0]!.to, 'dropped');
  });
  test('bad cores-per-socket and snapshots are noted', () => {
    const src = vmwareVm();
    src.cpus = 3;
    src.coresPerSocket = 2;
    src.snapshots = [
      { id: '1', name: 'before upgrade' },
      { id: '2', name: 'after', parent: '1', current: true },
    ];
    const { model, notes } = mapModel(src, profileOf('qemu'));
    assert.equal(model.coresPerSocket, 1);
    assert.equal(find(notes, /^2 snapshots/)[0]!.to, 'flattened');
  });
});

describe('droppedDevices', () => {
  test('OVF-style items named by value count only under a hardware key', () => {
    const m = emptyModel('x', 'ovf');
    m.unmapped = [
      { key: 'Item[ResourceType=14]', value: 'floppy0' },
      { key: 'annotation', value: 'remember to unplug the usb stick' },
    ];
    assert.deepEqual(
      droppedDevices(m).map((d) => d.kind),
      ['floppy drive'],
    );
  });
  test('every target has built-in capabilities', () => {
    for (const t of ['libvirt', 'qemu', 'proxmox', 'vmware', 'ova', 'virtualbox', 'hyperv', 'azure']) {
      assert.ok(TARGET_CAPABILITIES[t], t);
    }
  });
});
