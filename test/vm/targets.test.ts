import assert from 'node:assert/strict';
import { chmodSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { UnsupportedFeatureError } from '../../src/disk/errors.js';
import type { TargetDisk } from '../../src/vm/dialect.js';
import { emptyModel, MiB, type VmModel } from '../../src/vm/model.js';
import { azureTarget, checkAzureVhd } from '../../src/vm/targets/azure.js';
import { proxmoxTarget } from '../../src/vm/targets/proxmox.js';
import { qemuTarget } from '../../src/vm/targets/qemu.js';
import { qemuImg, run, runOk, tmpDir } from '../helpers/index.js';

function uefiLinux(): VmModel {
  const m = emptyModel('web01', 'vmware');
  m.uuid = '564d1e2f-0000-4000-8000-00000000abcd';
  m.firmware = 'uefi';
  m.secureBoot = true;
  m.cpus = 4;
  m.coresPerSocket = 2;
  m.memory = 1536 * MiB;
  m.guest = { family: 'linux', description: 'Debian 12 (64-bit)' };
  m.controllers = [
    { id: 'scsi0', bus: 'scsi', model: 'virtio-scsi' },
    { id: 'sata0', bus: 'sata' },
  ];
  m.disks = [
    { path: '/src/a.vmdk', bus: 'scsi', controller: 'scsi0', unit: 0, bootOrder: 1 },
    { path: '/src/b.vmdk', bus: 'virtio' },
    { path: '/src/c.vmdk', bus: 'sata', controller: 'sata0', unit: 2 },
  ];
  m.cdroms = [{ bus: 'sata', controller: 'sata0', unit: 0 }];
  m.nics = [
    { model: 'virtio', mac: '52:54:00:aa:bb:cc', network: 'VM Network' },
    { model: 'e1000', mac: '52:54:00:aa:bb:cd' },
  ];
  return m;
}

function biosIde(): VmModel {
  const m = emptyModel('old box', 'virtualbox');
  m.cpus = 2;
  m.memory = 512 * MiB;
  m.guest = { family: 'windows', description: 'Windows Server 2016 (64-bit)' };
  m.controllers = [
    { id: 'ide0', bus: 'ide' },
    { id: 'ide1', bus: 'ide' },
    { id: 'scsi0', bus: 'scsi', model: 'lsilogic' },
  ];
  m.disks = [
    { path: '/src/x.vdi', bus: 'ide', controller: 'ide0', unit: 0, bootOrder: 1 },
    { path: '/src/y.vdi', bus: 'scsi', controller: 'scsi0', unit: 1 },
  ];
  m.cdroms = [{ bus: 'ide', controller: 'ide1', unit: 1 }];
  m.nics = [{ model: 'rtl8139', mac: '52:54:00:00:00:01' }];
  return m;
}

function disksOf(m: VmModel, dir: string, ext = 'qcow2', format = 'qcow2'): TargetDisk[] {
  return m.disks.map((_, i) => {
    const fileName = `${m.name.replace(/ /g, '-')}-disk${i}.${ext}`;
    qemuImg('create', '-q', '-f', format, join(dir, fileName), '16M');
    return { index: i, fileName, format, capacity: 16 * MiB };
  });
}

/** Runs NAME.sh paused (-S) with QMP on stdio: QEMU answers only once every argument was accepted and every device built. */
function qmp(script: string, ...commands: object[]): unknown[] {
  const input = [{ execute: 'qmp_capabilities' }, ...commands, { execute: 'quit' }].map((c) => JSON.stringify(c)).join('\n');
  const r = run(script, ['-S', '-display', 'none', '-serial', 'none', '-qmp', 'stdio'], {
    input: `${input}\n`,
    env: { ...process.env, ACCEL: 'tcg' },
  });
  assert.equal(r.code, 0, `${script} failed (${r.code}):\n${r.stderr}\n${r.stdout}`);
  const replies = r.stdout
    .split('\n')
    .filter((l) => l.trim())
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((o) => 'return' in o || 'error' in o);
  for (const o of replies) assert.ok(!('error' in o), JSON.stringify(o));
  // The first reply answers qmp_capabilities, the last one quit.
  return replies.slice(1).map((o) => o.return);
}

describe('QEMU launch script: sh -n, then qemu-system-x86_64 accepts every argument', () => {
  test('UEFI + secure boot, virtio-scsi, virtio-blk, SATA disk and DVD, two NICs', async () => {
    const m = uefiLinux();
    const out = tmpDir();
    const disks = disksOf(m, out);
    assert.deepEqual(await qemuTarget.write(m, disks, out), ['web01.sh']);
    const script = join(out, 'web01.sh');
    runOk('sh', ['-n', script]);
    const [blocks, mac0, mac1] = qmp(
      script,
      { execute: 'query-block' },
      { execute: 'qom-get', arguments: { path: '/machine/peripheral/nic0', property: 'mac' } },
      { execute: 'qom-get', arguments: { path: '/machine/peripheral/nic1', property: 'mac' } },
    ) as [{ device: string; inserted?: { file: string } }[], string, string];
    const files = new Map(blocks.map((b) => [b.device, b.inserted?.file]));
    for (const [i, d] of disks.entries()) assert.equal(files.get(`disk${i}`), join(out, d.fileName));
    assert.ok(files.has('cd0'), 'the DVD drive exists');
    assert.equal(files.get('pflash0'), '/usr/share/OVMF/OVMF_CODE_4M.secboot.fd');
    assert.equal(files.get('pflash1'), join(out, 'web01_VARS.fd'));
    assert.ok(existsSync(join(out, 'web01_VARS.fd')), 'the VARS template was copied beside the script');
    assert.deepEqual([mac0, mac1], ['52:54:00:aa:bb:cc', '52:54:00:aa:bb:cd']);
    const text = readFileSync(script, 'utf8');
    assert.match(text, /-machine q35,smm=on/);
    assert.match(text, /-smp 4,sockets=2,cores=2,threads=1/);
    assert.match(text, /-m 1536M/);
    assert.match(text, /bootindex=1/);
    assert.match(text, /"\$@"\n$/, '"$@" comes last so callers override');
  });

  test('BIOS on PIIX IDE (pc machine) with an LSI SCSI data disk, in a folder whose name has spaces and commas', async () => {
    const m = biosIde();
    const out = join(tmpDir(), 'my vms, 2024');
    runOk('mkdir', ['-p', out]);
    const disks = disksOf(m, out);
    const [name] = await qemuTarget.write(m, disks, out);
    assert.equal(name, 'old-box.sh');
    const script = join(out, name!);
    runOk('sh', ['-n', script]);
    const [blocks] = qmp(script, { execute: 'query-block' }) as [{ device: string; inserted?: { file: string } }[]];
    const files = new Map(blocks.map((b) => [b.device, b.inserted?.file]));
    for (const [i, d] of disks.entries()) assert.equal(files.get(`disk${i}`), join(out, d.fileName));
    assert.match(readFileSync(script, 'utf8'), /-machine pc,/);
  });

  test('a model the script cannot express is a typed error', async () => {
    const m = biosIde();
    m.nics[0]!.model = 'hyperv';
    await assert.rejects(qemuTarget.write(m, disksOf(m, tmpDir()), tmpDir()), UnsupportedFeatureError);
  });
});

/** key: value lines of a qemu-server config. */
function parseConf(text: string): Map<string, string> {
  const out = new Map<string, string>();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([a-z0-9]+): (.*)$/.exec(line);
    assert.ok(m, `not a qemu-server line: ${line}`);
    out.set(m[1]!, m[2]!);
  }
  return out;
}

describe('Proxmox VE: NAME.conf and NAME-import.sh', () => {
  test('UEFI VM: bios ovmf + efidisk0, scsihw, disks with import-from, net0 with MAC, ostype, topology', async () => {
    const m = uefiLinux();
    m.controllers = [
      { id: 'scsi0', bus: 'scsi', model: 'virtio-scsi' },
      { id: 'sata0', bus: 'sata' },
    ];
    const out = tmpDir();
    const disks = disksOf(m, out);
    assert.deepEqual(await proxmoxTarget.write(m, disks, out), ['web01.conf', 'web01-import.sh']);
    const conf = parseConf(readFileSync(join(out, 'web01.conf'), 'utf8'));
    assert.equal(conf.get('name'), 'web01');
    assert.equal(conf.get('bios'), 'ovmf');
    assert.equal(conf.get('machine'), 'q35');
    assert.equal(conf.get('efidisk0'), 'STORAGE:1,efitype=4m,pre-enrolled-keys=1');
    assert.equal(conf.get('ostype'), 'l26');
    assert.equal(conf.get('memory'), '1536');
    assert.equal(conf.get('sockets'), '2');
    assert.equal(conf.get('cores'), '2');
    assert.equal(conf.get('scsihw'), 'virtio-scsi-pci');
    assert.equal(conf.get('scsi0'), `STORAGE:0,import-from=${join(out, 'web01-disk0.qcow2')},discard=on`);
    assert.equal(conf.get('virtio0'), `STORAGE:0,import-from=${join(out, 'web01-disk1.qcow2')},discard=on`);
    assert.equal(conf.get('sata0'), `STORAGE:0,import-from=${join(out, 'web01-disk2.qcow2')}`);
    assert.equal(conf.get('sata1'), 'none,media=cdrom');
    assert.equal(conf.get('net0'), 'virtio=52:54:00:AA:BB:CC,bridge=vmbr0');
    assert.equal(conf.get('net1'), 'e1000=52:54:00:AA:BB:CD,bridge=vmbr0');
    assert.equal(conf.get('boot'), 'order=scsi0;sata1;net0;net1');
    assert.equal(conf.get('serial0'), 'socket');
    assert.equal(conf.get('smbios1'), 'uuid=564d1e2f-0000-4000-8000-00000000abcd');
  });

  test('the import script runs against a stand-in qm: create, importdisk each disk, attach the imported volume, set boot', async () => {
    const m = uefiLinux();
    const out = tmpDir();
    await proxmoxTarget.write(m, disksOf(m, out), out);
    const script = join(out, 'web01-import.sh');
    runOk('sh', ['-n', script]);
    const bin = tmpDir();
    const log = join(bin, 'qm.log');
    writeFileSync(
      join(bin, 'qm'),
      `#!/bin/sh\nprintf '%s\\n' "$*" >> '${log}'\nif [ "$1" = importdisk ]; then n=$(grep -c '^importdisk' '${log}'); echo "Successfully imported disk as 'unused$((n-1)):$4:vm-$2-disk-$n'"; fi\n`,
    );
    chmodSync(join(bin, 'qm'), 0o755);
    runOk('sh', [script, '123', 'tank', 'vmbr7'], { env: { ...process.env, PATH: `${bin}:${process.env.PATH}` } });
    const calls = readFileSync(log, 'utf8').trim().split('\n');
    assert.match(
      calls[0]!,
      /^create 123 --name web01 .*--bios ovmf .*--net0 virtio=52:54:00:AA:BB:CC,bridge=vmbr7 .*--efidisk0 tank:1,efitype=4m,pre-enrolled-keys=1/,
    );
    assert.ok(!calls[0]!.includes('--boot'), 'the boot order is set once the disks exist');
    assert.deepEqual(calls.slice(1), [
      `importdisk 123 ${join(out, 'web01-disk0.qcow2')} tank`,
      'set 123 --scsi0 tank:vm-123-disk-1,discard=on',
      `importdisk 123 ${join(out, 'web01-disk1.qcow2')} tank`,
      'set 123 --virtio0 tank:vm-123-disk-2,discard=on',
      `importdisk 123 ${join(out, 'web01-disk2.qcow2')} tank`,
      'set 123 --sata0 tank:vm-123-disk-3',
      'set 123 --boot order=scsi0;sata1;net0;net1',
    ]);
  });

  test('BIOS Windows on IDE: no efidisk, machine pc, ostype win10, LSI SCSI as scsihw lsi', async () => {
    const m = biosIde();
    const out = tmpDir();
    await proxmoxTarget.write(m, disksOf(m, out), out);
    const conf = parseConf(readFileSync(join(out, 'old-box.conf'), 'utf8'));
    assert.equal(conf.get('bios'), undefined);
    assert.equal(conf.get('efidisk0'), undefined);
    assert.equal(conf.get('machine'), 'pc');
    assert.equal(conf.get('ostype'), 'win10');
    assert.equal(conf.get('scsihw'), 'lsi');
    assert.equal(conf.get('boot'), 'order=ide0;ide1;net0');
  });
});

describe('Azure: fixed, MiB-aligned VHDs and the VM description', () => {
  test('accepts a fixed VHD qemu-img made with force_size at a whole MiB; writes json and an az script', async () => {
    const m = uefiLinux();
    m.disks = [m.disks[0]!];
    m.controllers = [m.controllers[0]!];
    m.cdroms = [];
    const out = tmpDir();
    qemuImg('create', '-q', '-f', 'vpc', '-o', 'subformat=fixed,force_size=on', join(out, 'web01-disk0.vhd'), '10M');
    const disks = [{ index: 0, fileName: 'web01-disk0.vhd', format: 'vpc', capacity: 10 * MiB }];
    assert.equal(checkAzureVhd(join(out, 'web01-disk0.vhd')), 10 * MiB);
    assert.deepEqual(await azureTarget.write(m, disks, out), ['web01-azure.json', 'web01-azure.sh']);
    const desc = JSON.parse(readFileSync(join(out, 'web01-azure.json'), 'utf8'));
    assert.equal(desc.hyperVGeneration, 'V2');
    assert.equal(desc.securityType, 'TrustedLaunch');
    assert.equal(desc.osType, 'Linux');
    assert.equal(desc.sizeHint, 'Standard_D4s_v5');
    assert.deepEqual(desc.disks, [{ file: 'web01-disk0.vhd', role: 'os', sizeBytes: 10 * MiB }]);
    runOk('sh', ['-n', join(out, 'web01-azure.sh')]);
    const sh = readFileSync(join(out, 'web01-azure.sh'), 'utf8');
    assert.match(sh, /--upload-size-bytes 10486272 /);
    assert.match(sh, /--hyper-v-generation V2/);
  });

  test('refuses a dynamic VHD and a fixed VHD whose size is not a whole MiB', async () => {
    const m = uefiLinux();
    m.disks = [m.disks[0]!];
    const out = tmpDir();
    qemuImg('create', '-q', '-f', 'vpc', '-o', 'subformat=dynamic', join(out, 'dyn.vhd'), '10M');
    await assert.rejects(
      azureTarget.write(m, [{ index: 0, fileName: 'dyn.vhd', format: 'vpc', capacity: 10 * MiB }], out),
      /not a fixed VHD/,
    );
    qemuImg('create', '-q', '-f', 'vpc', '-o', 'subformat=fixed,force_size=on', join(out, 'odd.vhd'), `${10 * MiB + 4096}`);
    await assert.rejects(
      azureTarget.write(m, [{ index: 0, fileName: 'odd.vhd', format: 'vpc', capacity: 10 * MiB }], out),
      /whole number of MiB/,
    );
    assert.ok(!existsSync(join(out, 'web01-azure.json')));
  });
});
