import assert from 'node:assert/strict';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { CorruptImageError, VmferryError } from '../../src/disk/errors.js';
import { MiB } from '../../src/vm/model.js';
import { hypervReader, readHyperv } from '../../src/vm/readers/hyperv.js';
import { parseVmcx, vmcxFlatten } from '../../src/vm/readers/vmcx.js';
import { detectVmReader } from '../../src/vm/registry.js';
import { hypervProfileFor, hypervTarget } from '../../src/vm/targets/hyperv.js';
import { corpusDir, patternBuffer, qemuImg, tmpDir } from '../helpers/index.js';

const VMCX = join(corpusDir, 'hyperv/test.vmcx');

describe('VMCX decoding: corpus hyperv/test.vmcx', () => {
  test('decodes the key/value tree: the strings visible in the file are values of the keys they belong to', () => {
    const buf = readFileSync(VMCX);
    const flat = new Map(vmcxFlatten(parseVmcx(buf, VMCX).root).map((e) => [e.key, e.value]));
    assert.ok(flat.size > 250, `only ${flat.size} keys`);
    assert.equal(flat.get('configuration/properties/name'), 'Other Location');
    assert.equal(flat.get('configuration/properties/global_id'), '282874FC-59D6-4F30-BC04-5FDD909C82E0');
    assert.equal(flat.get('configuration/manifest/vdev021/name'), 'Microsoft Emulated IDE Controller');
    // Every UTF-16 string the file holds decodes to a value (cross-check with the raw bytes).
    for (const [key, value] of flat) {
      if (typeof value === 'string' && value.length >= 4) {
        assert.ok(buf.includes(Buffer.from(value, 'utf16le')), `${key} = ${value} is not in the file as UTF-16`);
      }
    }
  });
});

describe('Hyper-V reader: corpus test.vmcx', () => {
  test('is detected by content', () => {
    assert.equal(detectVmReader(VMCX).platform, 'hyperv');
  });

  test('"Other Location": Generation 1 (BIOS), 1 CPU, 1024 MiB, IDE VHDX, empty DVD, synthetic NIC, no secure boot', async () => {
    const m = await hypervReader.read(VMCX, {});
    assert.equal(m.name, 'Other Location');
    assert.equal(m.uuid, '282874fc-59d6-4f30-bc04-5fdd909c82e0');
    assert.equal(m.generation, 1);
    assert.equal(m.firmware, 'bios');
    assert.equal(m.secureBoot, undefined);
    assert.equal(m.cpus, 1);
    assert.equal(m.memory, 1024 * MiB);
    assert.deepEqual(m.controllers, [
      { id: 'ide0', bus: 'ide' },
      { id: 'ide1', bus: 'ide' },
    ]);
    assert.equal(m.disks.length, 1);
    const d = m.disks[0]!;
    assert.equal(d.bus, 'ide');
    assert.equal(d.controller, 'ide0');
    assert.equal(d.unit, 0);
    assert.equal(d.format, 'vhdx');
    assert.equal(d.bootOrder, 1);
    // The file is not in the corpus: the stored Windows path is kept and a warning names it.
    assert.equal(d.path, 'C:\\Users\\Public\\Documents\\Hyper-V\\Virtual Hard Disks\\Other Location.vhdx');
    assert.ok(m.warnings.some((w) => w.includes('Other Location.vhdx')));
    assert.deepEqual(m.cdroms, [{ bus: 'ide', controller: 'ide1', unit: 0 }]);
    assert.equal(m.nics.length, 1);
    assert.equal(m.nics[0]!.model, 'hyperv');
    assert.equal(m.nics[0]!.mac, undefined, 'a dynamic MAC that never ran (00-00-00-00-00-00) is not carried');
    assert.ok(m.unmapped.some((u) => u.key === 'boot.order' && u.value === 'Optical,HardDrive,Network,Floppy'));
  });

  test('an exported VM folder: the disk is found in "Virtual Hard Disks"', async () => {
    const root = tmpDir();
    mkdirSync(join(root, 'Virtual Machines'));
    mkdirSync(join(root, 'Virtual Hard Disks'));
    copyFileSync(VMCX, join(root, 'Virtual Machines', '282874FC-59D6-4F30-BC04-5FDD909C82E0.vmcx'));
    const disk = join(root, 'Virtual Hard Disks', 'Other Location.vhdx');
    qemuImg('create', '-q', '-f', 'vhdx', disk, '8M');
    assert.equal(detectVmReader(root).platform, 'hyperv');
    const m = await readHyperv(root);
    assert.equal(m.disks[0]!.path, disk);
    assert.equal(m.warnings.length, 0, m.warnings.join('; '));
  });
});

describe('Hyper-V reader: corruption gives typed errors, never a crash', () => {
  const original = readFileSync(VMCX);
  const attempt = async (buf: Buffer, name: string) => {
    const dir = tmpDir();
    const p = join(dir, name);
    writeFileSync(p, buf);
    try {
      await readHyperv(p);
      return undefined;
    } catch (err) {
      assert.ok(err instanceof VmferryError, `${name}: raw exception ${(err as Error)?.stack}`);
      assert.equal((err as VmferryError).file, p);
      return err as VmferryError;
    }
  };

  test('truncated, bad signatures, a key table entry with an impossible size', async () => {
    const truncated = await attempt(original.subarray(0, 0x2100), 'truncated.vmcx');
    assert.ok(truncated instanceof CorruptImageError, String(truncated));
    const noSig = Buffer.from(original);
    noSig.writeUInt32LE(0, 0);
    noSig.writeUInt32LE(0, 0x1000);
    assert.match((await attempt(noSig, 'nosig.vmcx'))!.message, /signature/);
    const badTable = Buffer.from(original);
    badTable.writeUInt32LE(0xdeadbeef, 0x2000);
    assert.match((await attempt(badTable, 'badtable.vmcx'))!.message, /object table/);
    // The first key table entry claims to run past its table.
    const firstKeyTable = (() => {
      const count = original.readUInt32LE(0x2004);
      for (let i = 0; i < count; i++) {
        const e = 0x2008 + i * 18;
        if (original[e] === 2 && original[e + 17] !== 0) return Number(original.readBigUInt64LE(e + 5));
      }
      throw new Error('no key table in the corpus file');
    })();
    const badEntry = Buffer.from(original);
    badEntry.writeUInt32LE(0x7fffffff, firstKeyTable + 10 + 2);
    assert.match((await attempt(badEntry, 'badentry.vmcx'))!.message, /outside its table/);
  });

  test('1000 random byte corruptions each read or fail with a typed error', async () => {
    for (let i = 0; i < 1000; i++) {
      const noise = patternBuffer(16, i + 1);
      const buf = Buffer.from(original);
      for (let k = 0; k < 4; k++) {
        const pos = noise.readUInt32LE(k * 4) % buf.length;
        buf[pos] = noise[k]! ^ 0xff;
      }
      await attempt(buf, `fuzz${i}.vmcx`);
    }
  });
});

describe('Hyper-V writer', () => {
  test('hypervProfileFor: Generation 1 (BIOS) gets VHD, Generation 2 (UEFI) VHDX', () => {
    assert.equal(hypervProfileFor({ firmware: 'bios' }).diskFormat, 'vpc');
    assert.equal(hypervProfileFor({ firmware: 'bios' }).diskExtension, 'vhd');
    assert.equal(hypervProfileFor({ firmware: 'uefi' }).diskFormat, 'vhdx');
  });

  /** Each line of the script as command + parameters. */
  function commands(ps1: string): { cmd: string; params: Map<string, string> }[] {
    return ps1
      .split(/\r\n/)
      .filter((l) => l && !l.startsWith('#') && !/^(param\(|\s|\)|\$ErrorAction)/.test(l))
      .map((l) => {
        const body = l.replace(/^\$\w+ = /, '');
        const tokens = body.match(/'(?:[^']|'')*'|\([^)]*\)|@\([^)]*\)|\S+/g) ?? [];
        const params = new Map<string, string>();
        for (let i = 1; i < tokens.length; i++) {
          if (tokens[i]!.startsWith('-')) {
            const next = tokens[i + 1];
            if (next !== undefined && !next.startsWith('-')) {
              params.set(tokens[i]!, next);
              i++;
            } else params.set(tokens[i]!, '');
          }
        }
        return { cmd: tokens[0]!, params };
      });
  }

  test('the corpus VM (Gen1) becomes New-VM -Generation 1 with its IDE disk, DVD and adapter', async () => {
    const m = await hypervReader.read(VMCX, {});
    m.nics[0]!.mac = '00:15:5d:01:02:03';
    const out = tmpDir();
    const files = await hypervTarget.write(
      m,
      [{ index: 0, fileName: 'Other-Location-disk0.vhd', format: 'vpc', capacity: 8 * MiB }],
      out,
    );
    assert.deepEqual(files, ['Other-Location.ps1']);
    const cmds = commands(readFileSync(join(out, 'Other-Location.ps1'), 'utf8'));
    const one = (name: string) => {
      const found = cmds.filter((c) => c.cmd === name);
      assert.equal(found.length, 1, `${name} appears ${found.length} times`);
      return found[0]!.params;
    };
    assert.equal(one('New-VM').get('-Generation'), '1');
    assert.equal(one('New-VM').get('-MemoryStartupBytes'), String(1024 * MiB));
    assert.equal(one('New-VM').get('-Name'), "'Other-Location'");
    assert.equal(one('Set-VMProcessor').get('-Count'), '1');
    assert.equal(one('Set-VMMemory').get('-StartupBytes'), String(1024 * MiB));
    const hd = one('Add-VMHardDiskDrive');
    assert.equal(hd.get('-ControllerType'), 'IDE');
    assert.equal(hd.get('-ControllerNumber'), '0');
    assert.equal(hd.get('-ControllerLocation'), '0');
    assert.match(hd.get('-Path')!, /'Other-Location-disk0\.vhd'/);
    assert.equal(one('Add-VMDvdDrive').get('-ControllerNumber'), '1');
    assert.ok(one('Set-VMBios').has('-StartupOrder'));
    assert.equal(cmds.filter((c) => c.cmd === 'Set-VMFirmware').length, 0, 'Set-VMFirmware is for Generation 2 only');
    assert.equal(one('Add-VMNetworkAdapter').get('-Name'), "'nic0'");
    assert.equal(one('Set-VMNetworkAdapter').get('-StaticMacAddress'), "'00155D010203'");
  });

  test('a UEFI Linux VM with secure boot becomes Generation 2, SCSI, the UEFI CA template', async () => {
    const m = await hypervReader.read(VMCX, {});
    m.firmware = 'uefi';
    m.secureBoot = true;
    m.guest = { family: 'linux' };
    m.controllers = [{ id: 'scsi0', bus: 'scsi', model: 'hyperv-scsi' }];
    m.disks = [
      { path: '/x/a', bus: 'scsi', controller: 'scsi0', unit: 0, bootOrder: 1 },
      { path: '/x/b', bus: 'scsi', controller: 'scsi0', unit: 1 },
    ];
    m.cdroms = [];
    const out = tmpDir();
    const disks = m.disks.map((_, i) => ({ index: i, fileName: `d${i}.vhdx`, format: 'vhdx', capacity: MiB }));
    await hypervTarget.write(m, disks, out);
    const cmds = commands(readFileSync(join(out, 'Other-Location.ps1'), 'utf8'));
    assert.equal(cmds.find((c) => c.cmd === 'New-VM')!.params.get('-Generation'), '2');
    const fw = cmds.find((c) => c.cmd === 'Set-VMFirmware')!.params;
    assert.equal(fw.get('-EnableSecureBoot'), 'On');
    assert.equal(fw.get('-SecureBootTemplate'), 'MicrosoftUEFICertificateAuthority');
    assert.equal(fw.get('-FirstBootDevice'), '$disk0');
    const drives = cmds
      .filter((c) => c.cmd === 'Add-VMHardDiskDrive')
      .map((c) => [c.params.get('-ControllerType'), c.params.get('-ControllerLocation')]);
    assert.deepEqual(drives, [
      ['SCSI', '0'],
      ['SCSI', '1'],
    ]);
    assert.equal(cmds.filter((c) => c.cmd === 'Add-VMScsiController').length, 0, 'Generation 2 has SCSI controller 0 already');
    // Generation 2 cannot use VHD.
    await assert.rejects(
      hypervTarget.write(
        m,
        disks.map((d) => ({ ...d, format: 'vpc' })),
        tmpDir(),
      ),
      /Generation 2 VM takes VHDX/,
    );
  });
});
