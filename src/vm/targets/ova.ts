/**
 * OVA target (--to ova): NAME.ova = tar of NAME.ovf (first), the streamOptimized disks, and
 * NAME.mf (SHA256 lines). The OVF follows what vSphere writes and accepts (vmx-NN system type,
 * streamOptimized disk format URI, lsilogic/VirtualSCSI controllers, vmw:Config firmware) and is
 * valid against the DMTF OVF 1.1 schema.
 */
import '../../formats/index.js';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { ioError, UnsupportedFeatureError } from '../../disk/errors.js';
import { openImage } from '../../disk/registry.js';
import { writeOva } from '../../package/ova.js';
import type { TargetDisk, TargetWriter } from '../dialect.js';
import { safeVmName, type VmModel } from '../model.js';
import { apiGuestFromVmx } from '../readers/vmx.js';
import { placeDevices, vmwareGuestId, vmwareHwVersion, vmwareMemoryMiB, vmwareTarget } from './vmware.js';

export const STREAM_OPTIMIZED_URI = 'http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized';

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

const SCSI_SUBTYPE: Record<string, string> = {
  lsilogic: 'lsilogic',
  lsisas1068: 'lsilogicsas',
  buslogic: 'buslogic',
  pvscsi: 'VirtualSCSI',
};
const NIC_SUBTYPE: Record<string, string> = { e1000: 'E1000', e1000e: 'E1000e', vmxnet3: 'VmxNet3' };

/** CIM OsType for the OperatingSystemSection (vmw:osType carries the precise id). */
function cimOsId(vmx: string): number {
  if (/^ubuntu-64/.test(vmx)) return 94;
  if (/^ubuntu/.test(vmx)) return 93;
  if (/^debian.*-64/.test(vmx)) return 96;
  if (/^freebsd-64/.test(vmx)) return 78;
  if (/^freebsd/.test(vmx)) return 42;
  if (/linux.*-64|^rhel|^centos|^sles/.test(vmx)) return 101;
  if (/linux/.test(vmx)) return 36;
  return /-64$/.test(vmx) ? 102 : 1;
}

export interface OvfDisk extends TargetDisk {
  /** Bytes of the disk file. */
  fileSize: number;
  /** Guest bytes the image actually stores. */
  populatedSize?: number;
}

/** The OVF descriptor for `model`, whose disks are packaged as `disks`. */
export function buildOvf(model: VmModel, disks: OvfDisk[]): string {
  const name = model.name;
  const hw = vmwareHwVersion(model);
  const guestVmx = vmwareGuestId(model.guest);
  const { controllers, devices } = placeDevices(model, 'ova');
  const o: string[] = [];
  const p = (s: string) => o.push(s);
  p('<?xml version="1.0" encoding="UTF-8"?>');
  p(
    '<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:cim="http://schemas.dmtf.org/wbem/wscim/1/common" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" xmlns:vmw="http://www.vmware.com/schema/ovf" xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">',
  );
  p('  <References>');
  disks.forEach((d, i) => {
    p(`    <File ovf:href="${esc(d.fileName)}" ovf:id="file${i + 1}" ovf:size="${d.fileSize}"/>`);
  });
  p('  </References>');
  p('  <DiskSection>');
  p('    <Info>Virtual disk information</Info>');
  disks.forEach((d, i) => {
    const populated = d.populatedSize !== undefined ? ` ovf:populatedSize="${d.populatedSize}"` : '';
    p(
      `    <Disk ovf:capacity="${d.capacity}" ovf:capacityAllocationUnits="byte" ovf:diskId="vmdisk${i + 1}" ovf:fileRef="file${i + 1}" ovf:format="${STREAM_OPTIMIZED_URI}"${populated}/>`,
    );
  });
  p('  </DiskSection>');
  const networks = [...new Set(model.nics.map((n) => n.network ?? 'VM Network'))];
  if (networks.length) {
    p('  <NetworkSection>');
    p('    <Info>The list of logical networks</Info>');
    for (const n of networks) {
      p(`    <Network ovf:name="${esc(n)}">`);
      p(`      <Description>The ${esc(n)} network</Description>`);
      p('    </Network>');
    }
    p('  </NetworkSection>');
  }
  p(`  <VirtualSystem ovf:id="${esc(name)}">`);
  p('    <Info>A virtual machine</Info>');
  p(`    <Name>${esc(name)}</Name>`);
  p(`    <OperatingSystemSection ovf:id="${cimOsId(guestVmx)}" vmw:osType="${esc(apiGuestFromVmx(guestVmx))}">`);
  p('      <Info>The kind of installed guest operating system</Info>');
  if (model.guest.description) p(`      <Description>${esc(model.guest.description)}</Description>`);
  p('    </OperatingSystemSection>');
  p('    <VirtualHardwareSection>');
  p('      <Info>Virtual hardware requirements</Info>');
  p('      <System>');
  p('        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>');
  p('        <vssd:InstanceID>0</vssd:InstanceID>');
  p(`        <vssd:VirtualSystemIdentifier>${esc(model.uuid ?? name)}</vssd:VirtualSystemIdentifier>`);
  p(`        <vssd:VirtualSystemType>vmx-${String(hw).padStart(2, '0')}</vssd:VirtualSystemType>`);
  p('      </System>');
  let instance = 0;
  // Each item's RASD elements in the schema's (alphabetical) order; vmw extras after them.
  const item = (fields: [string, string | number | undefined][], extra: string[] = [], required = true) => {
    p(required ? '      <Item>' : '      <Item ovf:required="false">');
    for (const [k, v] of fields) if (v !== undefined) p(`        <rasd:${k}>${esc(String(v))}</rasd:${k}>`);
    for (const x of extra) p(`        ${x}`);
    p('      </Item>');
  };
  const cores = model.coresPerSocket && model.cpus % model.coresPerSocket === 0 ? model.coresPerSocket : undefined;
  item(
    [
      ['AllocationUnits', 'hertz * 10^6'],
      ['Description', 'Number of Virtual CPUs'],
      ['ElementName', `${model.cpus} virtual CPU(s)`],
      ['InstanceID', ++instance],
      ['ResourceType', 3],
      ['VirtualQuantity', model.cpus],
    ],
    cores ? [`<vmw:CoresPerSocket ovf:required="false">${cores}</vmw:CoresPerSocket>`] : [],
  );
  const mem = vmwareMemoryMiB(model.memory);
  item([
    ['AllocationUnits', 'byte * 2^20'],
    ['Description', 'Memory Size'],
    ['ElementName', `${mem}MB of memory`],
    ['InstanceID', ++instance],
    ['ResourceType', 4],
    ['VirtualQuantity', mem],
  ]);
  const controllerIds = new Map<string, number>();
  for (const c of controllers) {
    const id = ++instance;
    controllerIds.set(c.id, id);
    if (c.bus === 'scsi') {
      item([
        ['Address', c.index],
        ['Description', 'SCSI Controller'],
        ['ElementName', `SCSI controller ${c.index}`],
        ['InstanceID', id],
        ['ResourceSubType', SCSI_SUBTYPE[c.model ?? 'lsilogic'] ?? 'lsilogic'],
        ['ResourceType', 6],
      ]);
    } else if (c.bus === 'ide') {
      item([
        ['Address', c.index],
        ['Description', 'IDE Controller'],
        ['ElementName', `IDE ${c.index}`],
        ['InstanceID', id],
        ['ResourceType', 5],
      ]);
    } else if (c.bus === 'sata') {
      item([
        ['Address', c.index],
        ['Description', 'SATA Controller'],
        ['ElementName', `SATA controller ${c.index}`],
        ['InstanceID', id],
        ['ResourceSubType', 'vmware.sata.ahci'],
        ['ResourceType', 20],
      ]);
    } else if (c.bus === 'nvme') {
      item([
        ['Address', c.index],
        ['Description', 'NVME Controller'],
        ['ElementName', `NVME controller ${c.index}`],
        ['InstanceID', id],
        ['ResourceSubType', 'vmware.nvme.controller'],
        ['ResourceType', 20],
      ]);
    }
  }
  let cdNumber = 0;
  for (const d of devices) {
    const parent = controllerIds.get(d.controller.id)!;
    if (d.kind === 'disk') {
      const at = disks.findIndex((x) => x.index === d.index);
      if (at < 0) throw new UnsupportedFeatureError(`disk ${d.index} has no converted file`, model.name);
      item([
        ['AddressOnParent', d.unit],
        ['ElementName', `Hard disk ${at + 1}`],
        ['HostResource', `ovf:/disk/vmdisk${at + 1}`],
        ['InstanceID', ++instance],
        ['Parent', parent],
        ['ResourceType', 17],
      ]);
    } else {
      item(
        [
          ['AddressOnParent', d.unit],
          ['AutomaticAllocation', 'false'],
          ['ElementName', `CD/DVD drive ${++cdNumber}`],
          ['InstanceID', ++instance],
          ['Parent', parent],
          ['ResourceSubType', 'vmware.cdrom.remotepassthrough'],
          ['ResourceType', 15],
        ],
        [],
        false,
      );
    }
  }
  model.nics.forEach((nic, i) => {
    const sub = NIC_SUBTYPE[nic.model] ?? 'E1000';
    const net = nic.network ?? 'VM Network';
    item([
      ['Address', nic.mac],
      ['AddressOnParent', 7 + i],
      ['AutomaticAllocation', 'true'],
      ['Connection', net],
      ['Description', `${sub} ethernet adapter on "${net}"`],
      ['ElementName', `Network adapter ${i + 1}`],
      ['InstanceID', ++instance],
      ['ResourceSubType', sub],
      ['ResourceType', 10],
    ]);
  });
  const config = (key: string, value: string) =>
    p(`      <vmw:Config ovf:required="false" vmw:key="${esc(key)}" vmw:value="${esc(value)}"/>`);
  config('firmware', model.firmware === 'uefi' ? 'efi' : 'bios');
  if (model.firmware === 'uefi') config('bootOptions.efiSecureBootEnabled', model.secureBoot ? 'true' : 'false');
  p('    </VirtualHardwareSection>');
  p('  </VirtualSystem>');
  p('</Envelope>');
  return `${o.join('\n')}\n`;
}

/** Bytes of guest data a disk image stores (its data extents, backing chain included). */
async function populatedSize(path: string): Promise<number> {
  const reader = await openImage(path);
  try {
    let n = 0;
    for await (const e of reader.extents()) if (e.kind === 'data') n += e.length;
    return n;
  } finally {
    await reader.close();
  }
}

export const ovaTarget: TargetWriter = {
  // The devices vSphere takes, as for --to vmware; the disks travel streamOptimized.
  profile: { ...vmwareTarget.profile, target: 'ova', diskOptions: { subformat: 'streamOptimized' } },
  async write(model, disks, outDir) {
    const base = safeVmName(model.name);
    const ordered = [...disks].sort((a, b) => a.index - b.index);
    const described: OvfDisk[] = [];
    for (const d of ordered) {
      const path = join(outDir, d.fileName);
      let fileSize: number;
      try {
        fileSize = statSync(path).size;
      } catch (err) {
        throw ioError(err, path);
      }
      described.push({ ...d, fileSize, populatedSize: await populatedSize(path) });
    }
    const ovf = Buffer.from(buildOvf(model, described), 'utf8');
    await writeOva(
      join(outDir, `${base}.ova`),
      [{ name: `${base}.ovf`, data: ovf }, ...described.map((d) => ({ name: d.fileName, path: join(outDir, d.fileName) }))],
      `${base}.mf`,
    );
    return [`${base}.ova`];
  },
};
