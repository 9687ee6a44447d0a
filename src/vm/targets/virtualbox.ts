/**
 * VirtualBox target: NAME.vbox (settings version 1.16, which VirtualBox 6.1 and later load) with
 * the converted VDI disks in its media registry. Each disk's registry UUID is the one in its VDI
 * header (VirtualBox refuses a mismatch); a disk not yet on disk gets a fresh one. Register with
 * `VBoxManage registervm /path/NAME.vbox`.
 */
import { randomUUID } from 'node:crypto';
import { closeSync, openSync, readSync } from 'node:fs';
import { join } from 'node:path';
import { UnsupportedFeatureError } from '../../disk/errors.js';
import { decodeHeader, formatUuid, isNullUuid } from '../../formats/vdi/layout.js';
import type { TargetDisk, TargetProfile, TargetWriter } from '../dialect.js';
import { type DiskBus, safeVmName, type VmModel } from '../model.js';
import { vboxOsType } from '../readers/vbox.js';
import { xmlEscape } from '../readers/xml.js';
import { diskFor, mib, writeOutputs } from './files.js';

export const virtualboxProfile: TargetProfile = {
  target: 'virtualbox',
  firmware: ['bios', 'uefi'],
  diskBuses: ['sata', 'scsi', 'ide', 'nvme'],
  scsiModels: ['lsilogic', 'lsisas1068', 'buslogic', 'virtio-scsi'],
  nicModels: ['e1000', 'pcnet', 'virtio'],
  diskFormat: 'vdi',
  diskOptions: {},
  diskExtension: 'vdi',
};

const CONTROLLER: Record<string, { type: string; name: string; ports: number }> = {
  ide: { type: 'PIIX4', name: 'IDE', ports: 2 },
  sata: { type: 'AHCI', name: 'SATA', ports: 30 },
  nvme: { type: 'NVMe', name: 'NVMe', ports: 255 },
  'scsi:lsilogic': { type: 'LsiLogic', name: 'SCSI', ports: 16 },
  'scsi:buslogic': { type: 'BusLogic', name: 'SCSI', ports: 16 },
  'scsi:lsisas1068': { type: 'LsiLogicSas', name: 'SAS', ports: 255 },
  'scsi:virtio-scsi': { type: 'VirtioSCSI', name: 'VirtioSCSI', ports: 255 },
};
const ADAPTER: Record<string, string> = { e1000: '82540EM', pcnet: 'Am79C973', virtio: 'virtio' };
const FORMATS: Record<string, string> = { vdi: 'VDI', vmdk: 'VMDK', vpc: 'VHD', vhdx: 'VHDX', raw: 'RAW', qcow2: 'QCOW2' };

/** The creation UUID in a VDI header, when the file exists and has one. */
export function vdiUuid(path: string): string | undefined {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch {
    return undefined;
  }
  try {
    const buf = Buffer.alloc(512);
    const n = readSync(fd, buf, 0, 512, 0);
    const h = decodeHeader(buf.subarray(0, n), Number.MAX_SAFE_INTEGER, path);
    return isNullUuid(h.uuidCreate) ? undefined : formatUuid(h.uuidCreate);
  } catch {
    return undefined;
  } finally {
    closeSync(fd);
  }
}

export function vboxXml(model: VmModel, disks: TargetDisk[], outDir: string): string {
  const name = safeVmName(model.name);
  const uuid = model.uuid && /^[0-9a-f-]{36}$/i.test(model.uuid) ? model.uuid.toLowerCase() : randomUUID();
  const L: string[] = [];
  const p = (s: string) => L.push(s);
  // Controllers: one VirtualBox controller per vmferry controller, except IDE channels ide0/ide1,
  // which are the two ports of one PIIX4 controller.
  type Ctl = { name: string; type: string; ports: number; devices: string[] };
  const ctls = new Map<string, Ctl>();
  const names = new Set<string>();
  const ctlFor = (id: string | undefined, bus: DiskBus, what: string): { ctl: Ctl; port: number; device: number } => {
    const c = model.controllers.find((x) => x.id === id);
    if (!c && bus !== 'ide')
      throw new UnsupportedFeatureError(`${what} names controller '${id}', which the model does not define`, outDir);
    const key = bus === 'scsi' ? `scsi:${c?.model ?? 'lsilogic'}` : bus;
    const spec = CONTROLLER[key];
    if (!spec)
      throw new UnsupportedFeatureError(`${what}: VirtualBox has no ${key.replace(':', ' ')} controller; map it first`, outDir);
    const ideChannel = bus === 'ide' ? Number(/(\d+)$/.exec(id ?? 'ide0')?.[1] ?? '0') : 0;
    const groupKey = bus === 'ide' ? `ide${ideChannel >> 1}` : (id ?? key);
    let ctl = ctls.get(groupKey);
    if (!ctl) {
      let n = spec.name;
      for (let i = 2; names.has(n); i++) n = `${spec.name} ${i}`;
      names.add(n);
      ctl = { name: n, type: spec.type, ports: 0, devices: [] };
      ctls.set(groupKey, ctl);
    }
    return { ctl, port: bus === 'ide' ? ideChannel & 1 : -1, device: 0 };
  };
  const hardDisks: string[] = [];
  model.disks.forEach((d, i) => {
    const td = diskFor(disks, i, outDir);
    if (d.bus === 'virtio')
      throw new UnsupportedFeatureError(`disk ${i} is on virtio-blk, which VirtualBox does not have; map it first`, outDir);
    const id = vdiUuid(join(outDir, td.fileName)) ?? randomUUID();
    hardDisks.push(
      `        <HardDisk uuid="{${id}}" location="${xmlEscape(td.fileName)}" format="${FORMATS[td.format] ?? td.format.toUpperCase()}" type="Normal"/>`,
    );
    const { ctl, port } = ctlFor(d.controller, d.bus, `disk ${i}`);
    const unit = d.unit ?? 0;
    const [prt, dev] = d.bus === 'ide' ? [port, unit] : [unit, 0];
    ctl.ports = Math.max(ctl.ports, prt + 1);
    ctl.devices.push(
      `          <AttachedDevice type="HardDisk" hotpluggable="false" port="${prt}" device="${dev}">\n            <Image uuid="{${id}}"/>\n          </AttachedDevice>`,
    );
  });
  model.cdroms.forEach((c, i) => {
    if (c.bus === 'virtio') throw new UnsupportedFeatureError(`cdrom ${i} cannot sit on virtio`, outDir);
    const { ctl, port } = ctlFor(c.controller, c.bus, `cdrom ${i}`);
    const unit = c.unit ?? 0;
    const [prt, dev] = c.bus === 'ide' ? [port, unit] : [unit, 0];
    ctl.ports = Math.max(ctl.ports, prt + 1);
    ctl.devices.push(
      `          <AttachedDevice passthrough="false" type="DVD" hotpluggable="false" port="${prt}" device="${dev}"/>`,
    );
  });

  p('<?xml version="1.0"?>');
  p(`<!-- Written by vmferry. Register with: VBoxManage registervm "$PWD/${xmlEscape(name)}.vbox" -->`);
  p('<VirtualBox xmlns="http://www.virtualbox.org/" version="1.16-linux">');
  p(
    `  <Machine uuid="{${uuid}}" name="${xmlEscape(name)}" OSType="${xmlEscape(vboxOsType(model.guest))}" snapshotFolder="Snapshots">`,
  );
  p('    <MediaRegistry>');
  p('      <HardDisks>');
  for (const h of hardDisks) p(h);
  p('      </HardDisks>');
  p('    </MediaRegistry>');
  p('    <Hardware>');
  p(`      <CPU count="${model.cpus}">`);
  p('        <PAE enabled="true"/>');
  p(`        <LongMode enabled="${model.guest.is64bit === false ? 'false' : 'true'}"/>`);
  p('        <HardwareVirtExLargePages enabled="true"/>');
  p('      </CPU>');
  p(`      <Memory RAMSize="${mib(model.memory)}"/>`);
  if (model.firmware === 'uefi') p('      <Firmware type="EFI"/>');
  p('      <Boot>');
  const order = ['HardDisk', 'DVD', 'None', 'None'];
  if (model.disks.length === 0 && model.cdroms.length > 0) order.splice(0, 2, 'DVD', 'HardDisk');
  order.forEach((dev, i) => {
    p(`        <Order position="${i + 1}" device="${dev}"/>`);
  });
  p('      </Boot>');
  p('      <Display VRAMSize="16"/>');
  p('      <BIOS>');
  p('        <IOAPIC enabled="true"/>');
  p('      </BIOS>');
  p('      <Network>');
  model.nics.forEach((n, i) => {
    const type = ADAPTER[n.model];
    if (!type)
      throw new UnsupportedFeatureError(`nic ${i} model '${n.model}' has no VirtualBox equivalent; map it first`, outDir);
    const mac = n.mac ? ` MACAddress="${n.mac.replace(/:/g, '').toUpperCase()}"` : '';
    p(`        <Adapter slot="${i}" enabled="true"${mac} type="${type}">`);
    p('          <NAT/>');
    p('        </Adapter>');
  });
  p('      </Network>');
  p('      <UART>');
  p('        <Port slot="0" enabled="false" IOBase="0x3f8" IRQ="4" hostMode="Disconnected"/>');
  p('      </UART>');
  p('      <StorageControllers>');
  for (const ctl of ctls.values()) {
    p(
      `        <StorageController name="${xmlEscape(ctl.name)}" type="${ctl.type}" PortCount="${ctl.type === 'PIIX4' ? 2 : Math.max(ctl.ports, 1)}" useHostIOCache="false" Bootable="true">`,
    );
    for (const d of ctl.devices) p(d);
    p('        </StorageController>');
  }
  p('      </StorageControllers>');
  p(`      <RTC localOrUTC="${model.guest.family === 'windows' ? 'local' : 'UTC'}"/>`);
  p('    </Hardware>');
  p('  </Machine>');
  p('</VirtualBox>');
  return `${L.join('\n')}\n`;
}

export const virtualboxTarget: TargetWriter = {
  profile: virtualboxProfile,
  write: async (model, disks, outDir) => {
    const name = safeVmName(model.name);
    return writeOutputs(outDir, [{ name: `${name}.vbox`, content: vboxXml(model, disks, outDir) }]);
  },
};
