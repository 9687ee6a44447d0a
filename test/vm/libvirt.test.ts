import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { CorruptImageError, UnsafeReferenceError } from '../../src/disk/errors.js';
import type { TargetDisk } from '../../src/vm/dialect.js';
import { emptyModel, MiB, type VmModel } from '../../src/vm/model.js';
import { libvirtReader, readLibvirt } from '../../src/vm/readers/libvirt.js';
import { detectVmReader } from '../../src/vm/registry.js';
import { libvirtTarget } from '../../src/vm/targets/libvirt.js';
import { qemuImg, run, tmpDir } from '../helpers/index.js';

/** virt-xml-validate (libvirt-clients) against libvirt's own domain schema. */
function validate(path: string): void {
  const r = run('virt-xml-validate', [path, 'domain']);
  assert.equal(r.code, 0, `virt-xml-validate refused ${path}:\n${r.stderr}${r.stdout}\n${readFileSync(path, 'utf8')}`);
}

function bootLinux(): VmModel {
  const m = emptyModel('web01', 'vmware');
  m.uuid = '564d1e2f-0000-4000-8000-00000000abcd';
  m.firmware = 'bios';
  m.cpus = 4;
  m.coresPerSocket = 2;
  m.memory = 2048 * MiB;
  m.guest = { family: 'linux' };
  m.controllers = [{ id: 'scsi0', bus: 'scsi', model: 'virtio-scsi' }];
  m.disks = [
    { path: '/src/a.vmdk', bus: 'scsi', controller: 'scsi0', unit: 0, bootOrder: 1 },
    { path: '/src/b.vmdk', bus: 'virtio' },
  ];
  m.nics = [{ model: 'virtio', mac: '52:54:00:aa:bb:cc', network: 'VM Network' }];
  return m;
}

function uefiWindows(): VmModel {
  const m = emptyModel('dc01', 'virtualbox');
  m.firmware = 'uefi';
  m.secureBoot = true;
  m.cpus = 2;
  m.memory = 4096 * MiB;
  m.guest = { family: 'windows', description: 'Windows Server 2022' };
  m.controllers = [
    { id: 'sata0', bus: 'sata' },
    { id: 'scsi0', bus: 'scsi', model: 'lsilogic' },
  ];
  m.disks = [
    { path: '/src/os.vdi', bus: 'sata', controller: 'sata0', unit: 0, bootOrder: 1 },
    { path: '/src/data.vdi', bus: 'scsi', controller: 'scsi0', unit: 3 },
  ];
  m.cdroms = [{ bus: 'sata', controller: 'sata0', unit: 1 }];
  m.nics = [
    { model: 'e1000', mac: '08:00:27:7a:a2:fc' },
    { model: 'e1000e', mac: '08:00:27:7a:a2:fd' },
  ];
  return m;
}

function ideVm(): VmModel {
  const m = emptyModel('old', 'hyperv');
  m.controllers = [
    { id: 'ide0', bus: 'ide' },
    { id: 'ide1', bus: 'ide' },
  ];
  m.disks = [{ path: '/src/x.vhd', bus: 'ide', controller: 'ide0', unit: 0, bootOrder: 1 }];
  m.cdroms = [{ bus: 'ide', controller: 'ide1', unit: 0 }];
  m.nics = [{ model: 'rtl8139' }];
  return m;
}

function diskSet(m: VmModel, dir: string, create = true): TargetDisk[] {
  return m.disks.map((_, i) => {
    const fileName = `${m.name}-disk${i}.qcow2`;
    if (create) qemuImg('create', '-q', '-f', 'qcow2', join(dir, fileName), '16M');
    return { index: i, fileName, format: 'qcow2', capacity: 16 * MiB };
  });
}

function essence(m: VmModel) {
  return {
    name: m.name,
    uuid: m.uuid,
    firmware: m.firmware,
    secureBoot: m.secureBoot ?? false,
    cpus: m.cpus,
    coresPerSocket: m.coresPerSocket ?? 1,
    memory: m.memory,
    controllers: [...m.controllers].sort((a, b) => a.id.localeCompare(b.id)),
    disks: m.disks.map((d) => ({
      bus: d.bus,
      controller: d.controller,
      unit: d.bus === 'virtio' ? undefined : d.unit,
      bootOrder: d.bootOrder,
    })),
    cdroms: m.cdroms.map((c) => ({ bus: c.bus, controller: c.controller, unit: c.unit })),
    nics: m.nics.map((n) => ({ model: n.model, mac: n.mac })),
  };
}

describe('libvirt writer: virt-xml-validate accepts it, the reader reads back the same VM', () => {
  for (const [label, make] of [
    ['BIOS Linux on virtio-scsi + virtio-blk (q35)', bootLinux],
    ['UEFI + secure boot Windows on SATA and LSI SCSI with a DVD (q35, OVMF pflash)', uefiWindows],
    ['BIOS on IDE with a DVD (pc-i440fx)', ideVm],
  ] as const) {
    test(label, async () => {
      const m = make();
      const out = tmpDir();
      const disks = diskSet(m, out);
      const files = await libvirtTarget.write(m, disks, out);
      assert.deepEqual(files, [`${m.name}.xml`]);
      const xmlPath = join(out, files[0]!);
      validate(xmlPath);
      assert.equal(detectVmReader(xmlPath).platform, 'libvirt');
      const back = await readLibvirt(xmlPath);
      assert.deepEqual(essence(back), essence(m));
      back.disks.forEach((d, i) => {
        assert.equal(d.path, join(out, disks[i]!.fileName));
        assert.equal(d.format, 'qcow2');
      });
      assert.equal(back.warnings.length, 0, back.warnings.join('; '));
      const xml = readFileSync(xmlPath, 'utf8');
      assert.match(xml, /<serial type='pty'>/);
      assert.match(xml, /<console type='pty'>/);
      if (m.firmware === 'uefi') {
        assert.match(xml, /machine='q35'/);
        assert.match(
          xml,
          /<loader readonly='yes' secure='yes' type='pflash'>\/usr\/share\/OVMF\/OVMF_CODE_4M\.secboot\.fd<\/loader>/,
        );
        assert.match(xml, /<nvram template='\/usr\/share\/OVMF\/OVMF_VARS_4M\.ms\.fd'>/);
        assert.match(xml, /<smm state='on'\/>/);
      }
      if (m.disks.some((d) => d.bus === 'ide')) assert.match(xml, /machine='pc'/);
    });
  }

  test('the OVMF files the XML names exist here (Debian ovmf)', () => {
    for (const f of [
      '/usr/share/OVMF/OVMF_CODE_4M.fd',
      '/usr/share/OVMF/OVMF_VARS_4M.fd',
      '/usr/share/OVMF/OVMF_CODE_4M.secboot.fd',
      '/usr/share/OVMF/OVMF_VARS_4M.ms.fd',
    ]) {
      assert.ok(readFileSync(f).length > 0, f);
    }
  });

  test('a name with XML specials is escaped and still validates', async () => {
    const m = bootLinux();
    m.name = "a&b<c>'d";
    m.nics[0]!.network = 'net "1" & <2>';
    const out = tmpDir();
    const files = await libvirtTarget.write(m, diskSet(m, out, false), out);
    validate(join(out, files[0]!));
  });
});

describe('libvirt reader: hand-written domains', () => {
  test('virt-install style domain: units, firmware=efi, bridge, cdrom, os boot dev', async () => {
    const dir = tmpDir();
    qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'root.qcow2'), '8M');
    const p = join(dir, 'vm.xml');
    writeFileSync(
      p,
      `<domain type='kvm'>
  <name>fedora</name>
  <uuid>8F1A2B3C-0000-4000-8000-000000000001</uuid>
  <metadata><libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0"><libosinfo:os id="http://fedoraproject.org/fedora/39"/></libosinfo:libosinfo></metadata>
  <memory unit='GiB'>2</memory>
  <vcpu>3</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type><boot dev='hd'/></os>
  <devices>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='root.qcow2'/><target dev='vda' bus='virtio'/></disk>
    <disk type='file' device='cdrom'><driver name='qemu' type='raw'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:01:02:03'/><source bridge='br0'/><model type='virtio'/></interface>
    <sound model='ich9'/>
  </devices>
</domain>`,
    );
    const m = await libvirtReader.read(p, {});
    assert.equal(m.name, 'fedora');
    assert.equal(m.uuid, '8f1a2b3c-0000-4000-8000-000000000001');
    assert.equal(m.memory, 2 * 1024 * MiB);
    assert.equal(m.cpus, 3);
    assert.equal(m.firmware, 'uefi');
    assert.equal(m.guest.family, 'linux');
    assert.deepEqual(
      m.disks.map((d) => [d.path, d.bus, d.format, d.bootOrder]),
      [[join(dir, 'root.qcow2'), 'virtio', 'qcow2', 1]],
    );
    assert.deepEqual(m.cdroms, [{ bus: 'sata', controller: 'sata0', unit: 0 }]);
    assert.deepEqual(m.nics, [{ model: 'virtio', sourceModel: 'virtio', mac: '52:54:00:01:02:03', network: 'br0' }]);
    assert.ok(m.unmapped.some((u) => u.key === 'sound0' && u.value === 'ich9'));
  });

  test('a disk outside the XML folder is refused unless allowed; broken XML is a typed error', async () => {
    const dir = tmpDir();
    const sub = join(dir, 'sub');
    mkdirSync(sub);
    qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'outside.qcow2'), '8M');
    const p = join(sub, 'vm.xml');
    writeFileSync(
      p,
      `<domain type='kvm'><name>x</name><memory>1048576</memory><devices><disk type='file' device='disk'><source file='${join(dir, 'outside.qcow2')}'/><target dev='sda' bus='scsi'/></disk></devices></domain>`,
    );
    await assert.rejects(readLibvirt(p), UnsafeReferenceError);
    const m = await readLibvirt(p, { allowExternalFiles: true });
    assert.equal(m.memory, 1024 * MiB, 'memory without a unit is KiB');
    assert.deepEqual(m.controllers, [{ id: 'scsi0', bus: 'scsi', model: 'lsilogic' }]);
    const bad = join(dir, 'bad.xml');
    writeFileSync(bad, '<domain><name>x</name>');
    await assert.rejects(readLibvirt(bad), CorruptImageError);
    writeFileSync(bad, "<domain><name>x</name><memory unit='parsecs'>1</memory></domain>");
    await assert.rejects(readLibvirt(bad), /bad memory/);
  });
});
