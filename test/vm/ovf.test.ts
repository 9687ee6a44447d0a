/**
 * The OVF/OVA reader: the corpus's vSphere OVF templates filled in and read, OVAs built by GNU tar
 * read in place (no temp files), gzip-compressed members, manifests checked (a wrong line is refused
 * naming the member), the tar index against tar's own listing, and a VirtualBox-style OVF.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { gzipSync } from 'node:zlib';
import { CorruptImageError, MissingFileError } from '../../src/disk/errors.js';
import { FileSource } from '../../src/disk/source.js';
import { openVmDisk } from '../../src/package/member.js';
import { indexTar } from '../../src/package/tar.js';
import { MiB } from '../../src/vm/model.js';
import { ovfReader, readOvf } from '../../src/vm/readers/ovf.js';
import { detectVmReader } from '../../src/vm/registry.js';
import { corpusDir, qemuImg, runOk, sha256OfReader, sha256ViaQemu, tmpDir } from '../helpers/index.js';

const XSD = join(corpusDir, '../schemas/ovf/dsp8023_1.1.1.xsd');

/** A small source disk with data in a few places, and its streamOptimized VMDK made by qemu-img. */
function makeDisk(dir: string, name: string, size = '64M'): { raw: string; vmdk: string } {
  const raw = join(dir, `${name}.raw`);
  qemuImg('create', '-f', 'raw', raw, size);
  runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 1M 3M', '-c', 'write -P 0xc3 20M 64k', raw]);
  const vmdk = join(dir, `${name}.vmdk`);
  qemuImg('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, vmdk);
  return { raw, vmdk };
}

function fillTemplate(template: string, fill: Record<string, string>): string {
  let text = readFileSync(join(corpusDir, 'vmware/ovf-templates', template), 'utf8');
  for (const [k, v] of Object.entries(fill)) text = text.replaceAll(`@@${k}@@`, v);
  assert.doesNotMatch(text, /@@[A-Z_]+@@/, 'every placeholder filled');
  return text;
}

function restoreTmpdir(saved: string | undefined): void {
  if (saved === undefined) delete process.env.TMPDIR;
  else process.env.TMPDIR = saved;
}

function sha(alg: 'sha1sum' | 'sha256sum', path: string): string {
  return runOk(alg, [path]).split(' ')[0]!;
}

describe('ovf reader: the corpus vSphere templates, filled', () => {
  const dir = tmpDir('vmferry-ovf-tmpl-');
  const cases = [
    { template: 'template-hw13.ovf', hw: '13', firmware: 'bios', os: 'other3xLinux64Guest', cdrom: 'ide1', floppy: true },
    { template: 'template-hw20.ovf', hw: '20', firmware: 'efi', os: 'other4xLinux64Guest', cdrom: 'ide0', floppy: false },
    { template: 'template-hw21.ovf', hw: '21', firmware: 'efi', os: 'other4xLinux64Guest', cdrom: 'ide0', floppy: false },
  ];
  for (const c of cases) {
    test(`${c.template}: 2 CPUs, 2 GiB, pvscsi + 2 IDE, one 1 GiB disk on scsi0:0, CD-ROM on ${c.cdrom}, vmxnet3, ${c.firmware}`, async () => {
      const sub = join(dir, c.hw);
      mkdirSync(sub);
      const name = `tmpl${c.hw}`;
      const { vmdk } = makeDisk(sub, `${name}-disk1`, '1G');
      const ovf = join(sub, `${name}.ovf`);
      writeFileSync(
        ovf,
        fillTemplate(c.template, {
          NAME: name,
          VMDK_FILE_SIZE: String(statSync(vmdk).size),
          VMDK_CAPACITY: String(1024 * MiB),
          NUM_CPUS: '2',
          MEM_SIZE: '2048',
          FIRMWARE: c.firmware,
        }),
      );
      runOk('xmllint', ['--noout', '--schema', XSD, ovf]);
      assert.equal(detectVmReader(ovf), ovfReader);
      const m = await readOvf(ovf);
      assert.equal(m.name, name);
      assert.equal(m.sourcePlatform, 'ovf');
      assert.equal(m.cpus, 2);
      assert.equal(m.memory, 2048 * MiB);
      assert.equal(m.firmware, c.firmware === 'efi' ? 'uefi' : 'bios');
      assert.deepEqual(m.controllers, [
        { id: 'ide0', bus: 'ide' },
        { id: 'ide1', bus: 'ide' },
        { id: 'scsi0', bus: 'scsi', model: 'pvscsi' },
      ]);
      assert.deepEqual(m.disks, [
        { path: vmdk, format: 'vmdk', capacity: 1024 * MiB, bus: 'scsi', controller: 'scsi0', unit: 0 },
      ]);
      assert.deepEqual(m.cdroms, [{ bus: 'ide', controller: c.cdrom, unit: 0 }]);
      assert.deepEqual(m.nics, [{ model: 'vmxnet3', sourceModel: 'VmxNet3', network: 'VM Network' }]);
      assert.equal(m.guest.sourceId, c.os);
      assert.equal(m.guest.family, 'linux');
      assert.equal(m.guest.is64bit, true);
      const unmapped = new Map(m.unmapped.map((u) => [u.key, u.value]));
      assert.equal(unmapped.get('virtualHW.version'), c.hw);
      assert.equal(unmapped.has('floppy drive'), c.floppy, 'the hw13 floppy is listed, not dropped silently');
      assert.equal(unmapped.get('vmw:cpuHotAddEnabled'), 'false');
      assert.match(m.warnings.join('\n'), /no manifest/);
    });
  }
});

describe('ova reader: in place', () => {
  const dir = tmpDir('vmferry-ova-read-');
  const { raw, vmdk } = makeDisk(dir, 'app-disk1');
  const ovfText = fillTemplate('template-hw20.ovf', {
    NAME: 'app',
    VMDK_FILE_SIZE: String(statSync(vmdk).size),
    VMDK_CAPACITY: String(64 * MiB),
    NUM_CPUS: '4',
    MEM_SIZE: '4096',
    FIRMWARE: 'bios',
  });
  const stage = join(dir, 'stage');
  mkdirSync(stage);
  writeFileSync(join(stage, 'app.ovf'), ovfText);
  writeFileSync(join(stage, 'app-disk1.vmdk'), readFileSync(vmdk));
  // The manifest as ovftool writes it, digests by coreutils.
  const manifest = `SHA256(app.ovf)= ${sha('sha256sum', join(stage, 'app.ovf'))}\nSHA1(app-disk1.vmdk)= ${sha('sha1sum', vmdk)}\n`;
  writeFileSync(join(stage, 'app.mf'), manifest);
  const ova = join(dir, 'app.ova');
  runOk('tar', ['--format=ustar', '-cf', ova, '-C', stage, 'app.ovf', 'app-disk1.vmdk', 'app.mf']);

  test('detected by content; manifest verified; the disk is a member addressed by offset', async () => {
    assert.equal(detectVmReader(ova), ovfReader);
    const m = await readOvf(ova);
    assert.equal(m.cpus, 4);
    assert.equal(m.memory, 4096 * MiB);
    assert.equal(m.disks.length, 1);
    const d = m.disks[0]!;
    assert.equal(d.path, `${ova}/app-disk1.vmdk`);
    assert.equal(d.stored?.file, ova);
    assert.equal(d.stored?.member, 'app-disk1.vmdk');
    assert.equal(d.stored?.size, statSync(vmdk).size);
    // The member's bytes at that offset are the VMDK qemu-img wrote.
    const bytes = readFileSync(ova).subarray(d.stored!.offset, d.stored!.offset + d.stored!.size);
    assert.ok(bytes.equals(readFileSync(vmdk)));
    assert.equal(new Map(m.unmapped.map((u) => [u.key, u.value])).get('manifest'), 'app.mf: 2 file(s) verified');
  });

  test('the streamOptimized member is read in place: same content as qemu-img reads, no temp file', async () => {
    const m = await readOvf(ova);
    const scratch = tmpDir('vmferry-ova-tmp-');
    const saved = process.env.TMPDIR;
    process.env.TMPDIR = scratch;
    try {
      const reader = await openVmDisk(m.disks[0]!);
      try {
        assert.deepEqual(readdirSync(scratch), [], 'nothing extracted');
        assert.equal(reader.virtualSize, 64 * MiB);
        assert.equal(reader.details.formatSpecific!.data['in-place'], true);
        assert.equal(await sha256OfReader(reader), await sha256ViaQemu(raw, 'raw'));
        const kinds = new Set<string>();
        for await (const e of reader.extents()) kinds.add(e.kind);
        assert.ok(kinds.has('data') && kinds.size > 1, 'sparse: data and holes');
      } finally {
        await reader.close();
      }
      assert.deepEqual(readdirSync(scratch), []);
    } finally {
      restoreTmpdir(saved);
    }
  });

  test('a wrong manifest line is refused, naming the member', async () => {
    const bad = join(dir, 'bad');
    mkdirSync(bad);
    for (const f of ['app.ovf', 'app-disk1.vmdk']) writeFileSync(join(bad, f), readFileSync(join(stage, f)));
    const wrong = manifest.replace(
      /SHA1\(app-disk1\.vmdk\)= ([0-9a-f])/,
      (_, c: string) => `SHA1(app-disk1.vmdk)= ${c === '0' ? '1' : '0'}`,
    );
    assert.notEqual(wrong, manifest);
    writeFileSync(join(bad, 'app.mf'), wrong);
    const badOva = join(dir, 'bad.ova');
    runOk('tar', ['--format=ustar', '-cf', badOva, '-C', bad, 'app.ovf', 'app-disk1.vmdk', 'app.mf']);
    await assert.rejects(readOvf(badOva), (err: unknown) => {
      assert.ok(err instanceof CorruptImageError, String(err));
      assert.equal(err.file, badOva);
      assert.match(err.message, /member 'app-disk1\.vmdk' does not match the manifest/);
      return true;
    });
    // The same mistake in an unpacked OVF folder.
    await assert.rejects(readOvf(join(bad, 'app.ovf')), /app-disk1\.vmdk' does not match the manifest/);
  });

  test('a manifest naming a file the package lacks is refused', async () => {
    const extra = join(dir, 'extra');
    mkdirSync(extra);
    for (const f of ['app.ovf', 'app-disk1.vmdk']) writeFileSync(join(extra, f), readFileSync(join(stage, f)));
    writeFileSync(join(extra, 'app.mf'), `${manifest}SHA256(ghost.vmdk)= ${'0'.repeat(64)}\n`);
    const extraOva = join(dir, 'extra.ova');
    runOk('tar', ['--format=ustar', '-cf', extraOva, '-C', extra, 'app.ovf', 'app-disk1.vmdk', 'app.mf']);
    await assert.rejects(readOvf(extraOva), /ghost\.vmdk', which the package does not hold/);
  });

  test('a gzip-compressed member is extracted to a temp folder, read, and removed on close', async () => {
    const gz = join(dir, 'gz');
    mkdirSync(gz);
    writeFileSync(join(gz, 'app-disk1.vmdk'), gzipSync(readFileSync(vmdk)));
    writeFileSync(
      join(gz, 'app.ovf'),
      ovfText.replace(
        /<File ovf:href="app-disk1.vmdk" ovf:id="file1" ovf:size="\d+"\/>/,
        `<File ovf:compression="gzip" ovf:href="app-disk1.vmdk" ovf:id="file1" ovf:size="${statSync(join(gz, 'app-disk1.vmdk')).size}"/>`,
      ),
    );
    assert.match(readFileSync(join(gz, 'app.ovf'), 'utf8'), /compression="gzip"/);
    const gzOva = join(dir, 'gz.ova');
    runOk('tar', ['--format=ustar', '-cf', gzOva, '-C', gz, 'app.ovf', 'app-disk1.vmdk']);
    const m = await readOvf(gzOva);
    assert.equal(m.disks[0]!.stored?.compression, 'gzip');
    const scratch = tmpDir('vmferry-ova-tmp-');
    const saved = process.env.TMPDIR;
    process.env.TMPDIR = scratch;
    try {
      const reader = await openVmDisk(m.disks[0]!);
      try {
        assert.equal(readdirSync(scratch).filter((f) => f.startsWith('vmferry-member-')).length, 1, 'extracted once');
        assert.equal(await sha256OfReader(reader), await sha256ViaQemu(raw, 'raw'));
      } finally {
        await reader.close();
      }
      assert.deepEqual(readdirSync(scratch), [], 'the copy is removed on close');
    } finally {
      restoreTmpdir(saved);
    }
    // And in an unpacked folder.
    const folder = await readOvf(join(gz, 'app.ovf'));
    const r = await openVmDisk(folder.disks[0]!);
    try {
      assert.equal(await sha256OfReader(r), await sha256ViaQemu(raw, 'raw'));
    } finally {
      await r.close();
    }
  });

  test('a disk file missing from the package is a MissingFileError', async () => {
    const lone = join(dir, 'lone');
    mkdirSync(lone);
    writeFileSync(join(lone, 'app.ovf'), ovfText);
    await assert.rejects(readOvf(join(lone, 'app.ovf')), MissingFileError);
  });

  test('malformed XML is a one-line CorruptImageError naming the file', async () => {
    const p = join(dir, 'broken.ovf');
    writeFileSync(p, '<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1"><References></Envelope>');
    await assert.rejects(
      readOvf(p),
      (err: unknown) => err instanceof CorruptImageError && err.file === p && !err.message.includes('\n'),
    );
  });
});

describe('tar index vs GNU tar', () => {
  const dir = tmpDir('vmferry-tar-');
  const src = join(dir, 'src');
  mkdirSync(src);
  const long = `${'a-very-long-member-name-'.repeat(6)}disk.vmdk`;
  const files: Record<string, Buffer> = {
    'x.ovf': Buffer.from('<Envelope/>'),
    [long]: Buffer.alloc(70_001, 7),
    'empty.mf': Buffer.alloc(0),
  };
  for (const [n, b] of Object.entries(files)) writeFileSync(join(src, n), b);
  for (const format of ['ustar', 'gnu', 'pax']) {
    test(`${format}: names, sizes and bytes agree with tar`, async () => {
      const archive = join(dir, `${format}.tar`);
      const names = format === 'ustar' ? ['x.ovf', 'empty.mf'] : ['x.ovf', long, 'empty.mf'];
      runOk('tar', [`--format=${format}`, '-cf', archive, '-C', src, ...names]);
      const listed = runOk('tar', ['-tf', archive]).trim().split('\n');
      const source = FileSource.open(archive);
      try {
        const members = await indexTar(source);
        assert.deepEqual(
          members.map((m) => m.name),
          listed,
        );
        for (const m of members) {
          const viaTar = runOk('tar', ['-xOf', archive, m.name]);
          assert.equal(m.size, files[m.name]!.length);
          const bytes = await source.read(m.offset, m.size);
          assert.ok(bytes.equals(files[m.name]!), m.name);
          assert.equal(viaTar, bytes.toString('utf8'), `${m.name}: tar -xO gives the same bytes`);
        }
      } finally {
        await source.close();
      }
    });
  }
  test('a damaged header is a CorruptImageError', async () => {
    const archive = join(dir, 'ustar.tar');
    const bad = join(dir, 'bad.tar');
    const b = readFileSync(archive);
    b[10] ^= 0xff;
    writeFileSync(bad, b);
    const source = FileSource.open(bad);
    try {
      await assert.rejects(indexTar(source), (err: unknown) => err instanceof CorruptImageError && /checksum/.test(err.message));
    } finally {
      await source.close();
    }
  });
});

describe('ovf reader: a VirtualBox-style OVF', () => {
  test('SATA (AHCI), PIIX4 IDE, E1000 and PCNet32 NICs, memory in MegaBytes, EFI from vbox:Machine', async () => {
    const dir = tmpDir('vmferry-ovf-vbox-');
    const { vmdk } = makeDisk(dir, 'vbox-disk001');
    const ovf = join(dir, 'vbox.ovf');
    writeFileSync(
      ovf,
      `<?xml version="1.0"?>
<Envelope ovf:version="1.0" xml:lang="en-US" xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:vbox="http://www.virtualbox.org/ovf/machine">
  <References>
    <File ovf:id="file1" ovf:href="vbox-disk001.vmdk"/>
  </References>
  <DiskSection>
    <Info>List of the virtual disks used in the package</Info>
    <Disk ovf:capacity="64" ovf:capacityAllocationUnits="byte * 2^20" ovf:diskId="vmdisk1" ovf:fileRef="file1" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>Logical networks used in the package</Info>
    <Network ovf:name="NAT"><Description>Logical network used by this appliance.</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="debian-vbox">
    <Info>A virtual machine</Info>
    <OperatingSystemSection ovf:id="96">
      <Info>The kind of installed guest operating system</Info>
      <Description>Debian_64</Description>
      <vbox:OSType ovf:required="false">Debian_64</vbox:OSType>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements for a virtual machine</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>debian-vbox</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>virtualbox-2.2</vssd:VirtualSystemType>
      </System>
      <Item><rasd:Caption>2 virtual CPU</rasd:Caption><rasd:Description>Number of virtual CPUs</rasd:Description><rasd:ElementName>2 virtual CPU</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>MegaBytes</rasd:AllocationUnits><rasd:Caption>3000 MB of memory</rasd:Caption><rasd:ElementName>3000 MB of memory</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>3000</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:Caption>ideController0</rasd:Caption><rasd:ElementName>ideController0</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>PIIX4</rasd:ResourceSubType><rasd:ResourceType>5</rasd:ResourceType></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:Caption>sataController0</rasd:Caption><rasd:ElementName>sataController0</rasd:ElementName><rasd:InstanceID>4</rasd:InstanceID><rasd:ResourceSubType>AHCI</rasd:ResourceSubType><rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Caption>Ethernet adapter on 'NAT'</rasd:Caption><rasd:Connection>NAT</rasd:Connection><rasd:ElementName>Ethernet adapter on 'NAT'</rasd:ElementName><rasd:InstanceID>5</rasd:InstanceID><rasd:ResourceSubType>E1000</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Connection>NAT</rasd:Connection><rasd:ElementName>second</rasd:ElementName><rasd:InstanceID>6</rasd:InstanceID><rasd:ResourceSubType>PCNet32</rasd:ResourceSubType><rasd:ResourceType>10</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>0</rasd:AddressOnParent><rasd:Caption>disk1</rasd:Caption><rasd:ElementName>disk1</rasd:ElementName><rasd:HostResource>/disk/vmdisk1</rasd:HostResource><rasd:InstanceID>7</rasd:InstanceID><rasd:Parent>4</rasd:Parent><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:AddressOnParent>1</rasd:AddressOnParent><rasd:AutomaticAllocation>true</rasd:AutomaticAllocation><rasd:Caption>cdrom1</rasd:Caption><rasd:ElementName>cdrom1</rasd:ElementName><rasd:InstanceID>8</rasd:InstanceID><rasd:Parent>3</rasd:Parent><rasd:ResourceType>15</rasd:ResourceType></Item>
      <Item><rasd:Caption>sound</rasd:Caption><rasd:ElementName>sound</rasd:ElementName><rasd:InstanceID>9</rasd:InstanceID><rasd:ResourceSubType>ensoniq1371</rasd:ResourceSubType><rasd:ResourceType>35</rasd:ResourceType></Item>
    </VirtualHardwareSection>
    <vbox:Machine ovf:required="false" version="1.19-linux" uuid="{0f4e3a34-5c4b-4a70-9ae1-2f1c7f0e4a11}" name="debian-vbox" OSType="Debian_64">
      <ovf:Info>Complete VirtualBox machine configuration in VirtualBox format</ovf:Info>
      <Hardware><Firmware type="EFI"/></Hardware>
    </vbox:Machine>
  </VirtualSystem>
</Envelope>
`,
    );
    const m = await readOvf(ovf);
    assert.equal(m.name, 'debian-vbox');
    assert.equal(m.firmware, 'uefi');
    assert.equal(m.cpus, 2);
    assert.equal(m.memory, 3000 * MiB);
    assert.deepEqual(m.controllers, [
      { id: 'ide0', bus: 'ide' },
      { id: 'sata0', bus: 'sata' },
    ]);
    assert.deepEqual(m.disks, [{ path: vmdk, format: 'vmdk', capacity: 64 * MiB, bus: 'sata', controller: 'sata0', unit: 0 }]);
    assert.deepEqual(m.cdroms, [{ bus: 'ide', controller: 'ide0', unit: 1 }]);
    assert.deepEqual(
      m.nics.map((n) => [n.model, n.network]),
      [
        ['e1000', 'NAT'],
        ['pcnet', 'NAT'],
      ],
    );
    assert.deepEqual(m.guest, { family: 'linux', description: 'Debian_64', is64bit: true, sourceId: 'Debian_64' });
    assert.equal(new Map(m.unmapped.map((u) => [u.key, u.value])).get('sound card'), 'sound (ensoniq1371)');
  });
});

describe('ovf reader: OVF 2.0', () => {
  test('StorageItem and EthernetPortItem (sasd/epasd) are read like Items', async () => {
    const dir = tmpDir('vmferry-ovf2-');
    const { vmdk } = makeDisk(dir, 'v2-disk1', '32M');
    const ovf = join(dir, 'v2.ovf');
    writeFileSync(
      ovf,
      `<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/2" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/2" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:sasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_StorageAllocationSettingData" xmlns:epasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_EthernetPortAllocationSettingData" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData">
  <References><File ovf:id="f1" ovf:href="v2-disk1.vmdk"/></References>
  <DiskSection><Info>disks</Info><Disk ovf:diskId="d1" ovf:fileRef="f1" ovf:capacity="32" ovf:capacityAllocationUnits="byte * 2^20" ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/></DiskSection>
  <VirtualSystem ovf:id="v2">
    <Info>A VM</Info>
    <VirtualHardwareSection>
      <Info>hw</Info>
      <Item><rasd:ElementName>cpu</rasd:ElementName><rasd:InstanceID>1</rasd:InstanceID><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>3</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^30</rasd:AllocationUnits><rasd:ElementName>mem</rasd:ElementName><rasd:InstanceID>2</rasd:InstanceID><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:ElementName>scsi</rasd:ElementName><rasd:InstanceID>3</rasd:InstanceID><rasd:ResourceSubType>lsilogicsas</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <StorageItem><sasd:AddressOnParent>2</sasd:AddressOnParent><sasd:ElementName>disk</sasd:ElementName><sasd:HostResource>ovf:/disk/d1</sasd:HostResource><sasd:InstanceID>4</sasd:InstanceID><sasd:Parent>3</sasd:Parent><sasd:ResourceType>17</sasd:ResourceType></StorageItem>
      <EthernetPortItem><epasd:Address>52-54-00-AB-CD-EF</epasd:Address><epasd:Connection>lan</epasd:Connection><epasd:ElementName>nic</epasd:ElementName><epasd:InstanceID>5</epasd:InstanceID><epasd:ResourceSubType>E1000e</epasd:ResourceSubType><epasd:ResourceType>10</epasd:ResourceType></EthernetPortItem>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
`,
    );
    assert.equal(detectVmReader(ovf), ovfReader);
    const m = await readOvf(ovf);
    assert.equal(m.name, 'v2');
    assert.equal(m.cpus, 3);
    assert.equal(m.memory, 2 * 1024 * MiB);
    assert.deepEqual(m.controllers, [{ id: 'scsi0', bus: 'scsi', model: 'lsisas1068' }]);
    assert.deepEqual(m.disks, [{ path: vmdk, format: 'vmdk', capacity: 32 * MiB, bus: 'scsi', controller: 'scsi0', unit: 2 }]);
    assert.deepEqual(m.nics, [{ model: 'e1000e', sourceModel: 'E1000e', mac: '52:54:00:ab:cd:ef', network: 'lan' }]);
  });
});
