import assert from 'node:assert/strict';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { CorruptImageError, UnsafeReferenceError, UnsupportedFeatureError, VmferryError } from '../../src/disk/errors.js';
import { MiB, type VmModel } from '../../src/vm/model.js';
import { readVbox, vboxReader } from '../../src/vm/readers/vbox.js';
import { detectVmReader } from '../../src/vm/registry.js';
import { virtualboxTarget } from '../../src/vm/targets/virtualbox.js';
import { corpusDir, corpusFile, qemuImg, tmpDir } from '../helpers/index.js';

const GOAD = join(corpusDir, 'virtualbox/GOAD-DC01.vbox');
const ENCRYPTED = join(corpusDir, 'virtualbox/encrypted.vbox');

describe('VirtualBox reader: corpus GOAD-DC01.vbox (VirtualBox 7.2.4, settings 1.19)', () => {
  test('is detected as VirtualBox by content', () => {
    assert.equal(detectVmReader(GOAD).platform, 'virtualbox');
  });

  test('reads a Windows Server 2016 guest, 2 CPUs, 3000 MB, BIOS, PIIX4 IDE, two 82540EM NICs', async () => {
    const m = await vboxReader.read(GOAD, {});
    assert.equal(m.name, 'GOAD-DC01');
    assert.equal(m.uuid, 'a6277950-3d1b-45d3-b2fd-dc1f385027e1');
    assert.equal(m.guest.sourceId, 'Windows2016_64');
    assert.equal(m.guest.family, 'windows');
    assert.equal(m.guest.description, 'Windows Server 2016 (64-bit)');
    assert.equal(m.cpus, 2);
    assert.equal(m.memory, 3000 * MiB);
    assert.equal(m.firmware, 'bios');
    assert.deepEqual(m.controllers, [{ id: 'ide0', bus: 'ide' }]);
    assert.deepEqual(
      m.nics.map((n) => [n.model, n.sourceModel, n.mac, n.network]),
      [
        ['e1000', '82540EM', '08:00:27:7a:a2:fc', 'nat'],
        ['e1000', '82540EM', '08:00:27:8c:c8:21', 'vboxnet0'],
      ],
    );
  });

  test("the disk is the current state's VMDK: the newest differencing child, its chain named", async () => {
    const m = await vboxReader.read(GOAD, {});
    assert.equal(m.disks.length, 1);
    const d = m.disks[0]!;
    assert.equal(d.path, join(corpusDir, 'virtualbox/Snapshots/{e6800503-8273-4f16-b584-c7ba2c1df698}.vmdk'));
    assert.equal(d.format, 'vmdk');
    assert.equal(d.bus, 'ide');
    assert.equal(d.controller, 'ide0');
    assert.equal(d.unit, 0);
    assert.equal(d.bootOrder, 1);
    assert.ok(
      d.notes?.some((n) => n.includes('{3c72ec80-dc73-4448-a63e-97970cdd87e5}.vmdk -> WindowsServer2019-disk001.vmdk')),
      `chain note missing: ${d.notes}`,
    );
    // The corpus holds the .vbox only: the missing image is a warning, not an error.
    assert.ok(m.warnings.some((w) => w.includes('not found')));
  });

  test('reads the snapshot tree with the current snapshot marked', async () => {
    const m = await vboxReader.read(GOAD, {});
    assert.deepEqual(
      m.snapshots.map((s) => [s.id, s.name, s.parent, s.current ?? false]),
      [
        ['95b1572d-c893-48f0-9bc9-6a01a0fd2cb6', 'push_1766163705_7292', undefined, false],
        ['264ccd7e-9ffd-45ba-bd0e-4e1968d3355a', 'push_1766170151_8843', '95b1572d-c893-48f0-9bc9-6a01a0fd2cb6', true],
      ],
    );
  });

  test('finds the disk when it is present next to the .vbox', async () => {
    const dir = tmpDir();
    const vbox = corpusFile('virtualbox/GOAD-DC01.vbox', dir);
    mkdirSync(join(dir, 'Snapshots'));
    const img = join(dir, 'Snapshots/{e6800503-8273-4f16-b584-c7ba2c1df698}.vmdk');
    qemuImg('create', '-q', '-f', 'vmdk', img, '16M');
    const m = await readVbox(vbox);
    assert.equal(m.disks[0]!.path, img);
    assert.equal(m.warnings.length, 0, m.warnings.join('; '));
  });
});

describe('VirtualBox reader: refusals', () => {
  test('corpus encrypted.vbox is refused as an encrypted VM', async () => {
    await assert.rejects(vboxReader.read(ENCRYPTED, {}), (err: unknown) => {
      assert.ok(err instanceof UnsupportedFeatureError);
      assert.match(err.message, /encrypted VM/);
      assert.equal(err.file, ENCRYPTED);
      return true;
    });
  });

  test('a fully encrypted machine (MachineEncrypted) is refused', async () => {
    const dir = tmpDir();
    const p = join(dir, 'enc.vbox');
    writeFileSync(
      p,
      '<?xml version="1.0"?>\n<VirtualBox xmlns="http://www.virtualbox.org/" version="1.19-linux"><MachineEncrypted uuid="{1}" keyId="k">AAAA</MachineEncrypted></VirtualBox>\n',
    );
    await assert.rejects(readVbox(p), /encrypted VM/);
  });

  test('broken XML, a missing <Machine>, a bad CPU count and an unregistered image are typed errors naming the file', async () => {
    const dir = tmpDir();
    const cases: [string, RegExp][] = [
      ['<VirtualBox><Machine name="x">', /not a valid VirtualBox settings file/],
      ['<VirtualBox version="1.19"/>', /no <Machine>/],
      ['<VirtualBox><Machine name="x"><Hardware><CPU count="-3"/></Hardware></Machine></VirtualBox>', /bad CPU count/],
      [
        '<VirtualBox><Machine name="x"><Hardware><StorageControllers><StorageController name="S" type="AHCI"><AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{11111111-1111-1111-1111-111111111111}"/></AttachedDevice></StorageController></StorageControllers></Hardware></Machine></VirtualBox>',
        /not in the media registry/,
      ],
    ];
    for (const [i, [xml, re]] of cases.entries()) {
      const p = join(dir, `bad${i}.vbox`);
      writeFileSync(p, xml);
      await assert.rejects(readVbox(p), (err: unknown) => {
        assert.ok(err instanceof CorruptImageError, `case ${i}: ${err}`);
        assert.match(err.message, re);
        assert.equal(err.file, p);
        return true;
      });
    }
  });

  test('a disk location leaving the folder is refused unless external files are allowed', async () => {
    const dir = tmpDir();
    const inner = join(dir, 'vm');
    mkdirSync(inner);
    qemuImg('create', '-q', '-f', 'vdi', join(dir, 'outside.vdi'), '1M');
    const p = join(inner, 'x.vbox');
    writeFileSync(
      p,
      `<VirtualBox><Machine name="x"><MediaRegistry><HardDisks><HardDisk uuid="{22222222-2222-2222-2222-222222222222}" location="../outside.vdi" format="VDI"/></HardDisks></MediaRegistry><Hardware><StorageControllers><StorageController name="S" type="AHCI"><AttachedDevice type="HardDisk" port="0" device="0"><Image uuid="{22222222-2222-2222-2222-222222222222}"/></AttachedDevice></StorageController></StorageControllers></Hardware></Machine></VirtualBox>`,
    );
    await assert.rejects(readVbox(p), UnsafeReferenceError);
    const m = await readVbox(p, { allowExternalFiles: true });
    assert.equal(m.disks[0]!.path, join(dir, 'outside.vdi'));
  });
});

/** The fields a round trip must keep (paths compared by file name: the writer points at converted disks). */
function essence(m: VmModel) {
  return {
    name: m.name,
    uuid: m.uuid,
    firmware: m.firmware,
    cpus: m.cpus,
    memory: m.memory,
    guest: m.guest.sourceId,
    controllers: m.controllers,
    disks: m.disks.map((d) => ({ bus: d.bus, controller: d.controller, unit: d.unit })),
    cdroms: m.cdroms.map((c) => ({ bus: c.bus, controller: c.controller, unit: c.unit })),
    nics: m.nics.map((n) => ({ model: n.model, mac: n.mac })),
  };
}

/** A VDI's creation UUID read straight from its header bytes (RTUUID: first three fields little-endian). */
function vdiHeaderUuid(path: string): string {
  const b = readFileSync(path).subarray(392, 408);
  const le = (x: Buffer) => Buffer.from(x).reverse().toString('hex');
  return `${le(b.subarray(0, 4))}-${le(b.subarray(4, 6))}-${le(b.subarray(6, 8))}-${b.subarray(8, 10).toString('hex')}-${b.subarray(10, 16).toString('hex')}`;
}

describe('VirtualBox writer: round trip through the reader', () => {
  test('GOAD-DC01 written as NAME.vbox reads back as the same machine; registry UUID = VDI header UUID', async () => {
    const src = await vboxReader.read(GOAD, {});
    const out = tmpDir();
    const vdi = join(out, 'GOAD-DC01-disk0.vdi');
    qemuImg('create', '-q', '-f', 'vdi', vdi, '64M');
    const files = await virtualboxTarget.write(
      src,
      [{ index: 0, fileName: 'GOAD-DC01-disk0.vdi', format: 'vdi', capacity: 64 * MiB }],
      out,
    );
    assert.deepEqual(files, ['GOAD-DC01.vbox']);
    const back = await readVbox(join(out, 'GOAD-DC01.vbox'));
    assert.deepEqual(essence(back), essence(src));
    assert.equal(back.disks[0]!.path, vdi);
    assert.equal(back.disks[0]!.format, 'vdi');
    assert.equal(back.warnings.length, 0, back.warnings.join('; '));
    const xml = readFileSync(join(out, 'GOAD-DC01.vbox'), 'utf8');
    assert.match(xml, /version="1\.16-linux"/);
    assert.ok(xml.includes(`<HardDisk uuid="{${vdiHeaderUuid(vdi)}}"`), 'registry UUID differs from the VDI header');
  });

  test('a UEFI VM with SATA, LSI SCSI, NVMe, a DVD and virtio/pcnet NICs round-trips', async () => {
    const m = await vboxReader.read(GOAD, {});
    m.name = 'uefi-box';
    m.uuid = undefined;
    m.firmware = 'uefi';
    m.controllers = [
      { id: 'sata0', bus: 'sata' },
      { id: 'scsi0', bus: 'scsi', model: 'lsilogic' },
      { id: 'nvme0', bus: 'nvme' },
    ];
    m.disks = [
      { path: '/x/a', bus: 'sata', controller: 'sata0', unit: 0, bootOrder: 1 },
      { path: '/x/b', bus: 'scsi', controller: 'scsi0', unit: 2 },
      { path: '/x/c', bus: 'nvme', controller: 'nvme0', unit: 0 },
    ];
    m.cdroms = [{ bus: 'sata', controller: 'sata0', unit: 1 }];
    m.nics = [
      { model: 'virtio', mac: '52:54:00:12:34:56' },
      { model: 'pcnet', mac: '52:54:00:12:34:57' },
    ];
    const out = tmpDir();
    const disks = m.disks.map((_, i) => ({ index: i, fileName: `uefi-box-disk${i}.vdi`, format: 'vdi', capacity: MiB }));
    await virtualboxTarget.write(m, disks, out);
    const back = await readVbox(join(out, 'uefi-box.vbox'));
    const e = essence(back);
    assert.ok(back.uuid && /^[0-9a-f-]{36}$/.test(back.uuid), 'a fresh machine UUID');
    assert.deepEqual({ ...e, uuid: undefined }, { ...essence(m), uuid: undefined });
  });

  test('a model the target cannot hold (virtio-blk disk) is a typed error, and no file appears', async () => {
    const m = await vboxReader.read(GOAD, {});
    m.disks[0]!.bus = 'virtio';
    const out = tmpDir();
    await assert.rejects(
      virtualboxTarget.write(m, [{ index: 0, fileName: 'd.vdi', format: 'vdi', capacity: MiB }], out),
      VmferryError,
    );
    assert.throws(() => readFileSync(join(out, 'GOAD-DC01.vbox')));
  });
});
