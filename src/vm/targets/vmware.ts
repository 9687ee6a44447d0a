/**
 * VMware target (--to vmware): NAME.vmx beside monolithicSparse NAME-diskN.vmdk files (converted
 * by the migrate pipeline). Also the VMware vocabulary the OVA writer shares: guest OS ids, the
 * hardware version, and controller/unit placement within VMware's limits.
 */
import { join } from 'node:path';
import { UnsupportedFeatureError } from '../../disk/errors.js';
import { AtomicFileSink } from '../../disk/sink.js';
import type { TargetDisk, TargetWriter } from '../dialect.js';
import { type DiskBus, type GuestHints, MiB, safeVmName, type VmModel } from '../model.js';
import { escapeVmx, VMWARE_GUESTS, vmxGuestFromApi } from '../readers/vmx.js';

export const DEFAULT_HW_VERSION = 19;

/** The VMX guestOS id for the model's guest hints. */
export function vmwareGuestId(g: GuestHints): string {
  const id = g.sourceId ?? '';
  if (/Guest(64)?$/.test(id)) return vmxGuestFromApi(id);
  const vmxLike =
    /^(other(\d+x|26x)?linux|other|windows\d+(srv|srvnext|server)?|rhel\d+|centos\d+|debian\d+|ubuntu|sles\d+|freebsd\d*|darwin\d*|solaris\d+|oraclelinux\d*|vmware-photon|almalinux|rockylinux|amazonlinux\d*)(-64)?$/i;
  if (VMWARE_GUESTS.some((x) => x.vmx === id.toLowerCase()) || vmxLike.test(id)) return id.toLowerCase();
  const t = `${id} ${g.description ?? ''}`.toLowerCase();
  const is64 = g.is64bit ?? !/(^|[^0-9])(32|x86)([^0-9_]|$)|i386|i686/.test(t);
  const b = (name: string) => (is64 ? `${name}-64` : name);
  const family =
    g.family ??
    (/win/.test(t)
      ? 'windows'
      : /linux|ubuntu|debian|rhel|red ?hat|centos|suse|fedora/.test(t)
        ? 'linux'
        : /bsd/.test(t)
          ? 'bsd'
          : 'other');
  if (family === 'windows') {
    if (/2025/.test(t)) return 'windows2022srvnext-64';
    if (/2022/.test(t)) return 'windows2019srvnext-64';
    if (/2019/.test(t)) return 'windows2019srv-64';
    if (/2016/.test(t)) return 'windows9srv-64';
    if (/2012/.test(t)) return 'windows8srv-64';
    if (/2008/.test(t)) return 'windows7srv-64';
    if (/\b11\b|windows11/.test(t)) return 'windows11-64';
    if (/\b8(\.1)?\b|windows8/.test(t)) return b('windows8');
    if (/\b7\b|windows7/.test(t)) return b('windows7');
    return b('windows9');
  }
  if (family === 'linux') {
    if (/ubuntu/.test(t)) return b('ubuntu');
    const debian = /debian\D{0,20}?(\d+)/.exec(t);
    if (/debian/.test(t)) return `debian${debian && Number(debian[1]) >= 10 && Number(debian[1]) <= 12 ? debian[1] : '10'}-64`;
    const rhel = /(?:rhel|red ?hat(?: enterprise linux)?)\D{0,3}(\d+)/.exec(t);
    if (rhel && Number(rhel[1]) >= 7 && Number(rhel[1]) <= 9) return `rhel${rhel[1]}-64`;
    const centos = /centos\D{0,10}?(\d+)/.exec(t);
    if (centos && Number(centos[1]) >= 7 && Number(centos[1]) <= 8) return `centos${centos[1]}-64`;
    return is64 ? 'other4xlinux-64' : 'otherlinux';
  }
  if (family === 'bsd' && /freebsd/.test(t)) return b('freebsd');
  return b('other');
}

/** The hardware version to write: the source's when it was VMware, at least what the devices need. */
export function vmwareHwVersion(model: VmModel): number {
  let v = DEFAULT_HW_VERSION;
  if (model.sourcePlatform === 'vmware' || model.sourcePlatform === 'ovf') {
    const src = Number(model.unmapped.find((u) => u.key.toLowerCase() === 'virtualhw.version')?.value);
    if (Number.isSafeInteger(src) && src >= 4 && src <= 99) v = src;
  }
  const needs = Math.max(
    model.controllers.some((c) => c.bus === 'nvme') || model.secureBoot ? 13 : 0,
    model.controllers.some((c) => c.model === 'pvscsi') || model.nics.some((n) => n.model === 'vmxnet3') ? 7 : 0,
    model.nics.some((n) => n.model === 'e1000e') || model.firmware === 'uefi' ? 8 : 0,
  );
  return Math.max(v, needs);
}

const MAX_CONTROLLERS: Record<string, number> = { ide: 2, scsi: 4, sata: 4, nvme: 4 };
const UNITS: Record<string, number[]> = {
  ide: [0, 1],
  scsi: [0, 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15],
  sata: Array.from({ length: 30 }, (_, i) => i),
  nvme: Array.from({ length: 15 }, (_, i) => i),
};

export interface PlacedController {
  /** VMware's name: scsi0, sata1, ide0, nvme0. */
  id: string;
  bus: DiskBus;
  index: number;
  model?: string;
}
export interface PlacedDevice {
  kind: 'disk' | 'cdrom';
  /** Index in model.disks or model.cdroms. */
  index: number;
  controller: PlacedController;
  unit: number;
}

/**
 * Places every disk and CD-ROM on a VMware controller and unit: the model's own where they are
 * valid for VMware, the next free ones otherwise. Buses VMware lacks (virtio) are an error: the
 * mapping step must translate them first.
 */
export function placeDevices(model: VmModel, target: string): { controllers: PlacedController[]; devices: PlacedDevice[] } {
  const controllers = new Map<string, PlacedController>();
  const rename = new Map<string, PlacedController>();
  const supported = (bus: string) => bus in MAX_CONTROLLERS;
  const add = (bus: DiskBus, wanted?: number, scsiModel?: string): PlacedController => {
    let index = wanted ?? 0;
    const taken = (i: number) => controllers.has(`${bus}${i}`);
    if (wanted === undefined || taken(index) || index >= MAX_CONTROLLERS[bus]!) {
      index = 0;
      while (taken(index)) index++;
    }
    if (index >= MAX_CONTROLLERS[bus]!) {
      throw new UnsupportedFeatureError(`${target} allows at most ${MAX_CONTROLLERS[bus]} ${bus} controllers`, model.name);
    }
    const c: PlacedController = { id: `${bus}${index}`, bus, index, ...(scsiModel ? { model: scsiModel } : {}) };
    controllers.set(c.id, c);
    return c;
  };
  for (const c of model.controllers) {
    if (!supported(c.bus)) {
      throw new UnsupportedFeatureError(
        `controller ${c.id} is on bus ${c.bus}, which ${target} does not have; map it first`,
        model.name,
      );
    }
    const m = new RegExp(`^${c.bus}(\\d+)$`).exec(c.id);
    rename.set(c.id, add(c.bus, m ? Number(m[1]) : undefined, c.bus === 'scsi' ? (c.model ?? 'lsilogic') : undefined));
  }
  const used = new Set<string>();
  const devices: PlacedDevice[] = [];
  const place = (kind: 'disk' | 'cdrom', index: number, bus: DiskBus, controllerId?: string, unit?: number) => {
    if (!supported(bus)) {
      throw new UnsupportedFeatureError(
        `${kind} ${index} is on bus ${bus}, which ${target} does not have; map it first`,
        model.name,
      );
    }
    let c = controllerId ? rename.get(controllerId) : undefined;
    if (c && c.bus !== bus) c = undefined;
    const candidates = c ? [c] : [...controllers.values()].filter((x) => x.bus === bus);
    for (const cand of candidates) {
      const units = UNITS[bus]!;
      const u =
        unit !== undefined && units.includes(unit) && !used.has(`${cand.id}:${unit}`)
          ? unit
          : units.find((x) => !used.has(`${cand.id}:${x}`));
      if (u !== undefined) {
        used.add(`${cand.id}:${u}`);
        devices.push({ kind, index, controller: cand, unit: u });
        return;
      }
    }
    // No room: a new controller on the same bus.
    const fresh = add(bus, undefined, bus === 'scsi' ? (c?.model ?? 'lsilogic') : undefined);
    const u = UNITS[bus]![0]!;
    used.add(`${fresh.id}:${u}`);
    devices.push({ kind, index, controller: fresh, unit: u });
  };
  model.disks.forEach((d, i) => {
    place('disk', i, d.bus, d.controller, d.unit);
  });
  model.cdroms.forEach((d, i) => {
    place('cdrom', i, d.bus, d.controller, d.unit);
  });
  return { controllers: [...controllers.values()].sort((a, b) => a.id.localeCompare(b.id)), devices };
}

/** Memory in MiB as VMware wants it: a multiple of 4. */
export function vmwareMemoryMiB(bytes: number): number {
  return Math.max(4, Math.ceil(bytes / MiB / 4) * 4);
}

/** A VMware-generated MAC (00:0c:29) stays generated; any other is kept as a static address. */
function macLines(p: string, mac: string | undefined): [string, string][] {
  if (!mac) return [[`${p}.addressType`, 'generated']];
  if (mac.startsWith('00:0c:29')) {
    return [
      [`${p}.addressType`, 'generated'],
      [`${p}.generatedAddress`, mac],
      [`${p}.generatedAddressOffset`, '0'],
    ];
  }
  const lines: [string, string][] = [
    [`${p}.addressType`, 'static'],
    [`${p}.address`, mac],
  ];
  // VMware accepts static addresses only in 00:50:56:00:00:00-3f:ff:ff unless told not to check.
  const inRange = mac.startsWith('00:50:56:') && Number.parseInt(mac.slice(9, 11), 16) <= 0x3f;
  if (!inRange) lines.push([`${p}.checkMACAddress`, 'FALSE']);
  return lines;
}

/** The VMX text for a model whose disks are `disks` (file names beside the VMX). */
export function buildVmx(model: VmModel, disks: TargetDisk[]): string {
  const lines: [string, string][] = [];
  const set = (k: string, v: string | number) => lines.push([k, String(v)]);
  set('.encoding', 'UTF-8');
  set('config.version', 8);
  set('virtualHW.version', vmwareHwVersion(model));
  set('displayName', model.name);
  set('guestOS', vmwareGuestId(model.guest));
  set('firmware', model.firmware === 'uefi' ? 'efi' : 'bios');
  if (model.firmware === 'uefi' && model.secureBoot !== undefined)
    set('uefi.secureBoot.enabled', model.secureBoot ? 'TRUE' : 'FALSE');
  set('memsize', vmwareMemoryMiB(model.memory));
  set('numvcpus', model.cpus);
  if (model.coresPerSocket && model.cpus % model.coresPerSocket === 0) set('cpuid.coresPerSocket', model.coresPerSocket);
  if (model.uuid) {
    const hex = model.uuid.replace(/-/g, '');
    const bytes = hex.match(/../g)!;
    set('uuid.bios', `${bytes.slice(0, 8).join(' ')}-${bytes.slice(8).join(' ')}`);
  }
  set('pciBridge0.present', 'TRUE');
  for (const n of [4, 5, 6, 7]) {
    set(`pciBridge${n}.present`, 'TRUE');
    set(`pciBridge${n}.virtualDev`, 'pcieRootPort');
    set(`pciBridge${n}.functions`, 8);
  }
  const { controllers, devices } = placeDevices(model, 'vmware');
  for (const c of controllers) {
    if (c.bus === 'ide') continue;
    set(`${c.id}.present`, 'TRUE');
    if (c.bus === 'scsi') set(`${c.id}.virtualDev`, c.model === 'unknown' ? 'lsilogic' : c.model!);
  }
  for (const d of devices) {
    const p = `${d.controller.id}:${d.unit}`;
    set(`${p}.present`, 'TRUE');
    if (d.kind === 'disk') {
      const td = disks.find((x) => x.index === d.index);
      if (!td) throw new UnsupportedFeatureError(`disk ${d.index} has no converted file`, model.name);
      set(`${p}.fileName`, td.fileName);
      const mode = model.disks[d.index]!.notes?.find((n) => n.startsWith('mode '))?.slice(5);
      if (mode && /^(independent-persistent|independent-nonpersistent|nonpersistent)$/.test(mode)) set(`${p}.mode`, mode);
    } else {
      const cd = model.cdroms[d.index]!;
      if (cd.path) {
        set(`${p}.deviceType`, 'cdrom-image');
        set(`${p}.fileName`, cd.path);
      } else {
        set(`${p}.deviceType`, 'cdrom-raw');
        set(`${p}.fileName`, 'auto detect');
        set(`${p}.autodetect`, 'TRUE');
      }
      set(`${p}.startConnected`, 'FALSE');
    }
  }
  model.nics.forEach((nic, i) => {
    const p = `ethernet${i}`;
    set(`${p}.present`, 'TRUE');
    const dev = nic.model === 'e1000' || nic.model === 'e1000e' || nic.model === 'vmxnet3' ? nic.model : 'e1000';
    set(`${p}.virtualDev`, dev);
    if (nic.network) set(`${p}.networkName`, nic.network);
    if (nic.network && /^(nat|bridged|hostonly)$/.test(nic.network)) set(`${p}.connectionType`, nic.network);
    for (const [k, v] of macLines(p, nic.mac)) set(k, v);
  });
  return lines.map(([k, v]) => `${k} = "${escapeVmx(v)}"\n`).join('');
}

/** Writes `data` as `path`, atomically. */
export async function writeAtomic(path: string, data: Buffer): Promise<void> {
  const sink = new AtomicFileSink(path);
  try {
    await sink.write(data, 0);
    await sink.commit();
  } catch (err) {
    await sink.abort();
    throw err;
  }
}

export const vmwareTarget: TargetWriter = {
  profile: {
    target: 'vmware',
    firmware: ['bios', 'uefi'],
    diskBuses: ['ide', 'sata', 'scsi', 'nvme'],
    scsiModels: ['lsilogic', 'pvscsi', 'buslogic', 'lsisas1068'],
    nicModels: ['e1000', 'e1000e', 'vmxnet3'],
    diskFormat: 'vmdk',
    diskOptions: { subformat: 'monolithicSparse' },
    diskExtension: 'vmdk',
  },
  async write(model, disks, outDir) {
    const name = `${safeVmName(model.name)}.vmx`;
    await writeAtomic(join(outDir, name), Buffer.from(buildVmx(model, disks), 'utf8'));
    return [name];
  },
};
