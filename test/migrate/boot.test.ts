/**
 * The proof that migrate moves a machine, not just bytes: a real bootable Linux disk (Debian's
 * kernel + a busybox initramfs, BIOS/syslinux and UEFI/GRUB variants, built from Debian packages by
 * test/helpers/bootdisk.ts), described as a VMware VM (VMX + VMDK by qemu-img) and as an OVA (OVF +
 * streamOptimized VMDK by qemu-img + SHA256 manifest by sha256sum), migrated --to libvirt and
 * --to qemu, then booted under qemu-system-x86_64 until the guest prints its marker on the serial
 * console, naming the firmware it found itself booted by.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { before, describe, test } from 'node:test';
import { XMLParser } from 'fast-xml-parser';
import { BOOT_MARKER, type BootDisk, type BootFirmware, bootDisk, missingBootTools } from '../helpers/bootdisk.js';
import { qemuImg, run, runOk, sha256File, tmpDir, vmferry } from '../helpers/index.js';

const BOOT_TIMEOUT_MS = 150_000;
const NAME = 'bootvm';

/** Runs a QEMU command line until it exits or the time runs out; returns the serial log. */
async function boot(cmd: string, args: string[], serial: string, env: NodeJS.ProcessEnv = process.env): Promise<string> {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
  let output = '';
  child.stdout.on('data', (d: Buffer) => {
    output += d.toString();
  });
  child.stderr.on('data', (d: Buffer) => {
    output += d.toString();
  });
  const seen = () => existsSync(serial) && readFileSync(serial, 'utf8').includes(BOOT_MARKER);
  await new Promise<void>((resolve) => {
    const timer = setTimeout(() => child.kill('SIGKILL'), BOOT_TIMEOUT_MS);
    // The guest powers off by itself; a marker already printed lets a slow shutdown be cut short.
    const poll = setInterval(() => {
      if (seen()) setTimeout(() => child.kill('SIGKILL'), 5000).unref();
    }, 1000);
    child.on('exit', () => {
      clearTimeout(timer);
      clearInterval(poll);
      resolve();
    });
  });
  const log = existsSync(serial) ? readFileSync(serial, 'utf8') : '';
  if (!log.includes(BOOT_MARKER)) {
    assert.fail(
      `the guest never printed its marker within ${BOOT_TIMEOUT_MS / 1000} s\nserial:\n${log.slice(-3000)}\nqemu:\n${output.slice(-2000)}`,
    );
  }
  return log;
}

function vmxSource(disk: BootDisk, dir: string): string {
  const folder = join(dir, `vmware-${disk.firmware}`);
  mkdirSync(folder);
  qemuImg('convert', '-f', 'raw', '-O', 'vmdk', disk.path, join(folder, `${NAME}.vmdk`));
  const vmx = [
    '.encoding = "UTF-8"',
    'config.version = "8"',
    'virtualHW.version = "19"',
    `displayName = "${NAME}"`,
    'guestOS = "debian11-64"',
    'memsize = "512"',
    'numvcpus = "1"',
    ...(disk.firmware === 'uefi' ? ['firmware = "efi"'] : []),
    'scsi0.present = "TRUE"',
    'scsi0.virtualDev = "pvscsi"',
    'scsi0:0.present = "TRUE"',
    `scsi0:0.fileName = "${NAME}.vmdk"`,
    'ethernet0.present = "TRUE"',
    'ethernet0.virtualDev = "vmxnet3"',
    'ethernet0.addressType = "generated"',
    'ethernet0.generatedAddress = "00:0c:29:12:34:56"',
    'floppy0.present = "FALSE"',
  ].join('\n');
  writeFileSync(join(folder, `${NAME}.vmx`), `${vmx}\n`);
  return join(folder, `${NAME}.vmx`);
}

function ovaSource(disk: BootDisk, dir: string): string {
  const folder = join(dir, `ova-${disk.firmware}`);
  mkdirSync(folder);
  const vmdk = `${NAME}-disk1.vmdk`;
  qemuImg('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', disk.path, join(folder, vmdk));
  const ovf = `<?xml version="1.0" encoding="UTF-8"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf">
  <References>
    <File ovf:href="${vmdk}" ovf:id="file1" ovf:size="${statSync(join(folder, vmdk)).size}"/>
  </References>
  <DiskSection>
    <Info>Virtual disks</Info>
    <Disk ovf:capacity="${disk.size}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk1" ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"/>
  </DiskSection>
  <NetworkSection>
    <Info>Networks</Info>
    <Network ovf:name="VM Network"><Description>VM Network</Description></Network>
  </NetworkSection>
  <VirtualSystem ovf:id="${NAME}">
    <Info>A virtual machine</Info>
    <Name>${NAME}</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian11_64Guest"><Info>Guest OS</Info></OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>${NAME}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-19</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:ElementName>1 virtual CPU</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>1</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:ElementName>512MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>512</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="${disk.firmware === 'uefi' ? 'efi' : 'bios'}"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
`;
  writeFileSync(join(folder, `${NAME}.ovf`), ovf);
  const sums = runOk('sha256sum', [`${NAME}.ovf`, vmdk], { cwd: folder })
    .trim()
    .split('\n')
    .map((l) => {
      const [hex, file] = l.split(/\s+\*?/);
      return `SHA256(${file})= ${hex}`;
    });
  writeFileSync(join(folder, `${NAME}.mf`), `${sums.join('\n')}\n`);
  const ova = join(dir, `${NAME}-${disk.firmware}.ova`);
  runOk('tar', ['--format=ustar', '-cf', ova, `${NAME}.ovf`, vmdk, `${NAME}.mf`], { cwd: folder });
  return ova;
}

interface Domain {
  machine: string;
  memoryMiB: number;
  loader?: string;
  nvramTemplate?: string;
  disks: { file: string; format: string; bus: string; controller?: string }[];
  scsiModels: string[];
}

/** What a libvirt domain XML says about booting: machine, firmware, memory, disks and their buses. */
function readDomain(xml: string): Domain {
  const parser = new XMLParser({
    ignoreAttributes: false,
    attributeNamePrefix: '@',
    isArray: (n) => ['disk', 'controller'].includes(n),
  });
  const d = parser.parse(xml).domain;
  const unitBytes: Record<string, number> = { KiB: 1024, MiB: 1024 ** 2, GiB: 1024 ** 3, b: 1, bytes: 1 };
  const memory = typeof d.memory === 'object' ? d.memory : { '#text': d.memory, '@unit': 'KiB' };
  const loader = d.os.loader;
  return {
    machine: d.os.type['@machine'] ?? 'pc',
    memoryMiB: Math.round((Number(memory['#text']) * (unitBytes[memory['@unit'] ?? 'KiB'] ?? 1024)) / 1024 ** 2),
    loader: typeof loader === 'object' ? loader['#text'] : loader,
    nvramTemplate: d.os.nvram?.['@template'],
    disks: (d.devices.disk ?? [])
      .filter((x: Record<string, string>) => (x['@device'] ?? 'disk') === 'disk')
      .map((x: Record<string, Record<string, string>>) => ({
        file: x.source!['@file']!,
        format: x.driver?.['@type'] ?? 'raw',
        bus: x.target!['@bus']!,
        controller: x.address?.['@controller'],
      })),
    scsiModels: (d.devices.controller ?? [])
      .filter((c: Record<string, string>) => c['@type'] === 'scsi')
      .map((c: Record<string, string>) => c['@model'] ?? 'lsilogic'),
  };
}

/** The qemu-system-x86_64 command line a libvirt host would start for this domain (the parts that decide booting). */
function qemuArgsFor(dom: Domain, work: string, serial: string): string[] {
  const args = ['-machine', `${dom.machine},accel=tcg`, '-m', `${dom.memoryMiB}M`, '-nodefaults', '-display', 'none'];
  args.push('-serial', `file:${serial}`, '-no-reboot');
  if (dom.loader) {
    const vars = join(work, 'VARS.fd');
    copyFileSync(dom.nvramTemplate!, vars);
    args.push('-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${dom.loader}`);
    args.push('-drive', `if=pflash,format=raw,unit=1,file=${vars}`);
  }
  const scsiDevice: Record<string, string> = {
    'virtio-scsi': 'virtio-scsi-pci',
    lsilogic: 'lsi53c895a',
    lsisas1068: 'mptsas1068',
  };
  dom.scsiModels.forEach((m, i) => {
    args.push('-device', `${scsiDevice[m] ?? assert.fail(`no qemu device for SCSI model ${m}`)},id=scsi${i}`);
  });
  const q35 = /q35/.test(dom.machine);
  if (!q35 && dom.disks.some((d) => d.bus === 'sata')) args.push('-device', 'ahci,id=ahci0');
  dom.disks.forEach((d, i) => {
    args.push('-drive', `if=none,id=d${i},format=${d.format},file=${d.file}`);
    const boot = i === 0 ? ',bootindex=1' : '';
    if (d.bus === 'virtio') args.push('-device', `virtio-blk-pci,drive=d${i}${boot}`);
    else if (d.bus === 'scsi') args.push('-device', `scsi-hd,drive=d${i},bus=scsi${d.controller ?? 0}.0${boot}`);
    else if (d.bus === 'sata') args.push('-device', `ide-hd,drive=d${i},bus=${q35 ? `ide.${i}` : `ahci0.${i}`}${boot}`);
    else if (d.bus === 'ide') args.push('-device', `ide-hd,drive=d${i},bus=ide.${Math.floor(i / 2)}${boot}`);
    else assert.fail(`unexpected disk bus ${d.bus}`);
  });
  return args;
}

for (const firmware of ['bios', 'uefi'] as BootFirmware[]) {
  describe(`a ${firmware.toUpperCase()} Linux VM migrates and boots`, { concurrency: 2 }, () => {
    const dir = tmpDir(`vmferry-boot-${firmware}-`);
    let disk: BootDisk;
    const sources: Record<string, string> = {};
    let rawSha = '';

    before(async () => {
      const missing = missingBootTools(firmware);
      assert.deepEqual(missing, [], `the boot test needs these Debian packages: apt-get install ${missing.join(' ')}`);
      disk = bootDisk(firmware);
      rawSha = await sha256File(disk.path);
      sources.vmx = vmxSource(disk, dir);
      sources.ova = ovaSource(disk, dir);
    });

    for (const source of ['vmx', 'ova']) {
      for (const target of ['qemu', 'libvirt']) {
        test(`${source} -> ${target}: the result boots to the marker with ${firmware.toUpperCase()} firmware`, async () => {
          const out = join(dir, `out-${source}-${target}`);
          const r = vmferry('migrate', sources[source]!, '--to', target, '--out', out, '--output=json');
          assert.equal(r.code, 0, r.stderr);
          const report = JSON.parse(r.stdout);
          assert.equal(report.firmware, firmware);
          assert.equal(report.disks.length, 1);
          // The guest content the target holds is the raw disk's, by sha256 of the raw file and by qemu-img compare.
          assert.equal(report.disks[0].sourceSha256, rawSha);
          assert.equal(report.disks[0].targetSha256, rawSha);
          const targetDisk = join(out, `${NAME}-disk0.qcow2`);
          assert.equal(run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', disk.path, targetDisk]).code, 0);
          assert.equal(run('qemu-img', ['check', targetDisk]).code, 0);
          // The mapping is in the report: pvscsi and vmxnet3 do not survive onto KVM.
          const mapped = report.mappings.map((m: { from: string; to: string }) => `${m.from} -> ${m.to}`).join('\n');
          assert.match(mapped, /disk0 on scsi \(pvscsi\) -> scsi \(virtio-scsi\)/);
          assert.match(mapped, /nic0 vmxnet3( \(VmxNet3\))? -> virtio/);

          const serial = join(out, '..', `serial-${source}-${target}.txt`);
          let log: string;
          if (target === 'qemu') {
            const script = join(out, `${NAME}.sh`);
            assert.equal(run('sh', ['-n', script]).code, 0);
            // TCG always: the same emulation everywhere (a half-working /dev/kvm in a container must not decide).
            log = await boot('sh', [script, '-serial', `file:${serial}`, '-display', 'none', '-no-reboot'], serial, {
              ...process.env,
              ACCEL: 'tcg',
            });
          } else {
            const xmlPath = join(out, `${NAME}.xml`);
            const valid = run('virt-xml-validate', [xmlPath, 'domain']);
            assert.equal(valid.code, 0, valid.stderr + valid.stdout);
            const dom = readDomain(readFileSync(xmlPath, 'utf8'));
            assert.equal(dom.disks[0]!.file, targetDisk, 'the domain names the disk where migrate put it');
            assert.equal(dom.loader !== undefined, firmware === 'uefi', 'UEFI exactly when the source was UEFI');
            const work = join(out, '..', `work-${source}-${target}`);
            mkdirSync(work);
            log = await boot('qemu-system-x86_64', qemuArgsFor(dom, work, serial), serial);
          }
          assert.match(log, new RegExp(`${BOOT_MARKER} firmware=${firmware}`));
        });
      }
    }
  });
}
