/**
 * libvirt domain XML: name, uuid, memory (with unit), vcpus and topology, firmware (os
 * firmware='efi' or a pflash loader), disks and CD-ROMs with their bus and controller, SCSI
 * controller models and network interfaces.
 */
import { readFileSync, statSync } from 'node:fs';
import { dirname, isAbsolute, relative, resolve } from 'node:path';
import { CorruptImageError, ioError, MissingFileError } from '../../disk/errors.js';
import { resolveReference } from '../../disk/refs.js';
import type { ReadVmOptions, VmReader } from '../dialect.js';
import { type DiskBus, emptyModel, type NicModel, type ScsiModel, type VmModel } from '../model.js';
import { attr, child, children, normalizeMac, parseXml, text, type XmlNode } from './xml.js';

const UNITS: Record<string, number> = {
  b: 1,
  bytes: 1,
  k: 1024,
  kib: 1024,
  kb: 1000,
  m: 1024 ** 2,
  mib: 1024 ** 2,
  mb: 1000 ** 2,
  g: 1024 ** 3,
  gib: 1024 ** 3,
  gb: 1000 ** 3,
  t: 1024 ** 4,
  tib: 1024 ** 4,
  tb: 1000 ** 4,
};

/** libvirt SCSI controller models -> neutral names. */
const SCSI_MODELS: Record<string, ScsiModel> = {
  'virtio-scsi': 'virtio-scsi',
  'virtio-transitional': 'virtio-scsi',
  'virtio-non-transitional': 'virtio-scsi',
  lsilogic: 'lsilogic',
  lsisas1068: 'lsisas1068',
  buslogic: 'buslogic',
  vmpvscsi: 'pvscsi',
  ibmvscsi: 'unknown',
};

/** libvirt/QEMU NIC models -> neutral names. */
const NIC_MODELS: Record<string, NicModel> = {
  virtio: 'virtio',
  'virtio-net': 'virtio',
  'virtio-net-pci': 'virtio',
  'virtio-transitional': 'virtio',
  'virtio-non-transitional': 'virtio',
  e1000: 'e1000',
  'e1000-82540em': 'e1000',
  'e1000-82545em': 'e1000',
  e1000e: 'e1000e',
  rtl8139: 'rtl8139',
  vmxnet3: 'vmxnet3',
  pcnet: 'pcnet',
};

const DISK_BUSES: Record<string, DiskBus> = { virtio: 'virtio', sata: 'sata', scsi: 'scsi', ide: 'ide', nvme: 'nvme' };

/** Driver type -> vmferry format name. */
const FORMATS: Record<string, string> = { raw: 'raw', qcow2: 'qcow2', vmdk: 'vmdk', vpc: 'vpc', vhdx: 'vhdx', vdi: 'vdi' };

export function parseMemory(node: XmlNode | undefined, file: string): number | undefined {
  if (!node) return undefined;
  const value = Number(text(node));
  const unit = (attr(node, 'unit') ?? 'KiB').toLowerCase();
  const mult = UNITS[unit];
  if (!Number.isFinite(value) || value <= 0 || mult === undefined) {
    throw new CorruptImageError(`bad memory '${text(node)} ${attr(node, 'unit') ?? ''}'`, file);
  }
  return value * mult;
}

/** vda -> 0, sdb -> 1, hdc -> 2, sdaa -> 26. */
function devIndex(dev: string | undefined): number | undefined {
  const m = /^(?:vd|sd|hd|xvd|nvme\d*n?)([a-z]+)$/.exec(dev ?? '');
  if (!m) return undefined;
  let n = 0;
  for (const ch of m[1]!) n = n * 26 + (ch.charCodeAt(0) - 96);
  return n - 1;
}

/** A disk source path: inside the XML's folder (relative, or absolute but within it), else only when allowed. */
function locate(xmlPath: string, source: string, options: ReadVmOptions, warnings: string[]): string {
  let ref = source;
  if (isAbsolute(source)) {
    const rel = relative(dirname(resolve(xmlPath)), source);
    if (rel && !rel.startsWith('..') && !isAbsolute(rel)) ref = rel;
  }
  try {
    return resolveReference(xmlPath, ref, 'disk', { allowExternalFiles: options.allowExternalFiles });
  } catch (err) {
    if (err instanceof MissingFileError) {
      const where = resolve(dirname(xmlPath), source);
      warnings.push(`disk '${source}' not found (looked for ${where})`);
      return where;
    }
    throw err;
  }
}

export async function readLibvirt(path: string, options: ReadVmOptions = {}): Promise<VmModel> {
  let content: string;
  try {
    if (!statSync(path).isFile()) throw new CorruptImageError('is not a file', path);
    content = readFileSync(path, 'utf8');
  } catch (err) {
    throw ioError(err, path);
  }
  const doc = parseXml(content, path, 'libvirt domain XML');
  const domain = child(doc, 'domain');
  if (!domain) throw new CorruptImageError('not a libvirt domain (no <domain> root element)', path);
  const name = text(child(domain, 'name'));
  if (!name) throw new CorruptImageError('libvirt domain has no <name>', path);
  const model = emptyModel(name, 'libvirt');
  model.sourceFile = resolve(path);
  const uuid = text(child(domain, 'uuid'));
  if (uuid) model.uuid = uuid.toLowerCase();
  const type = attr(domain, 'type');
  if (type) model.unmapped.push({ key: 'domain.type', value: type });

  const memory = parseMemory(child(domain, 'memory'), path) ?? parseMemory(child(domain, 'currentMemory'), path);
  if (memory === undefined) throw new CorruptImageError('libvirt domain has no <memory>', path);
  model.memory = memory;
  const vcpu = Number(text(child(domain, 'vcpu')) ?? '1');
  if (!Number.isInteger(vcpu) || vcpu < 1 || vcpu > 4096)
    throw new CorruptImageError(`bad <vcpu> '${text(child(domain, 'vcpu'))}'`, path);
  model.cpus = vcpu;
  const topo = child(child(domain, 'cpu'), 'topology');
  if (topo) {
    const cores = Number(attr(topo, 'cores') ?? '1');
    const threads = Number(attr(topo, 'threads') ?? '1');
    if (Number.isInteger(cores) && cores >= 1 && Number.isInteger(threads) && threads >= 1)
      model.coresPerSocket = cores * threads;
  }

  const os = child(domain, 'os');
  const loader = child(os, 'loader');
  const osFirmware = attr(os, 'firmware');
  if (osFirmware === 'efi' || attr(loader, 'type') === 'pflash' || /OVMF|edk2|AAVMF/i.test(text(loader) ?? ''))
    model.firmware = 'uefi';
  if (attr(loader, 'secure') === 'yes') model.secureBoot = true;
  for (const f of children(child(os, 'firmware'), 'feature')) {
    if (attr(f, 'name') === 'secure-boot') model.secureBoot = attr(f, 'enabled') === 'yes';
  }
  const osType = child(os, 'type');
  if (attr(osType, 'machine')) model.unmapped.push({ key: 'os.machine', value: attr(osType, 'machine')! });
  const osBoot = children(os, 'boot').map((b) => attr(b, 'dev'));

  // libosinfo metadata, when virt-install wrote it, hints the guest.
  const meta = child(domain, 'metadata');
  const libosinfo = child(meta, 'libosinfo:libosinfo');
  const osId = attr(child(libosinfo, 'libosinfo:os'), 'id');
  if (osId) {
    model.guest.sourceId = osId;
    model.guest.family = /win/i.test(osId)
      ? 'windows'
      : /bsd/i.test(osId)
        ? 'bsd'
        : /linux|debian|ubuntu|fedora|rhel|centos|suse|alpine|arch/i.test(osId)
          ? 'linux'
          : 'other';
    model.guest.description = osId.replace(/^https?:\/\/[^/]+\//, '');
  }

  const devices = child(domain, 'devices');
  // SCSI controllers by index.
  const scsiModels = new Map<number, ScsiModel>();
  for (const c of children(devices, 'controller')) {
    if (attr(c, 'type') !== 'scsi') continue;
    const idx = Number(attr(c, 'index') ?? '0');
    const m = attr(c, 'model');
    scsiModels.set(idx, m ? (SCSI_MODELS[m] ?? 'unknown') : 'lsilogic');
  }
  const ensureController = (bus: DiskBus, index: number): string | undefined => {
    if (bus === 'virtio') return undefined;
    const id = `${bus}${index}`;
    if (!model.controllers.some((c) => c.id === id)) {
      const ctl: VmModel['controllers'][number] = { id, bus };
      if (bus === 'scsi') ctl.model = scsiModels.get(index) ?? 'lsilogic';
      model.controllers.push(ctl);
    }
    return id;
  };

  for (const d of children(devices, 'disk')) {
    const device = attr(d, 'device') ?? 'disk';
    const target = child(d, 'target');
    const dev = attr(target, 'dev');
    const busName = attr(target, 'bus') ?? (dev?.startsWith('vd') ? 'virtio' : dev?.startsWith('hd') ? 'ide' : 'scsi');
    const bus = DISK_BUSES[busName];
    if (!bus) {
      model.warnings.push(`disk ${dev ?? '?'} on bus '${busName}' is not understood; skipped`);
      model.unmapped.push({ key: `disk.${dev}`, value: `bus ${busName}` });
      continue;
    }
    const address = child(d, 'address');
    const idx = devIndex(dev);
    let ctlIndex = Number(attr(address, 'controller') ?? '0');
    let unit = attr(address, 'unit') !== undefined ? Number(attr(address, 'unit')) : idx;
    if (bus === 'ide') {
      // One vmferry controller per IDE channel: libvirt's bus attribute (or hda/hdb -> 0, hdc/hdd -> 1).
      const channel = attr(address, 'bus') !== undefined ? Number(attr(address, 'bus')) : idx !== undefined ? idx >> 1 : 0;
      ctlIndex = ctlIndex * 2 + channel;
      if (attr(address, 'unit') === undefined && idx !== undefined) unit = idx & 1;
    }
    const source = child(d, 'source');
    const file = attr(source, 'file') ?? attr(source, 'dev') ?? attr(source, 'name');
    const sourceType = attr(d, 'type') ?? 'file';
    if (device === 'cdrom') {
      const cd: VmModel['cdroms'][number] = { bus, controller: ensureController(bus, ctlIndex) };
      if (unit !== undefined) cd.unit = unit;
      if (file) cd.path = isAbsolute(file) ? file : resolve(dirname(path), file);
      model.cdroms.push(cd);
      continue;
    }
    if (device === 'floppy') {
      model.unmapped.push({ key: 'floppy', value: file ?? 'empty' });
      continue;
    }
    if (device === 'lun' || (sourceType !== 'file' && sourceType !== 'block')) {
      model.warnings.push(`disk ${dev ?? '?'} of type '${sourceType}'/${device} (network or LUN) cannot be read; skipped`);
      model.unmapped.push({ key: `disk.${dev}`, value: `${sourceType} ${device} ${file ?? ''}`.trim() });
      continue;
    }
    if (!file) {
      model.warnings.push(`disk ${dev ?? '?'} has no source file; skipped`);
      continue;
    }
    const disk: VmModel['disks'][number] = {
      path: locate(path, file, options, model.warnings),
      bus,
      controller: ensureController(bus, ctlIndex),
      notes: [`libvirt target ${dev ?? '?'} bus ${busName}`],
    };
    if (disk.controller === undefined) delete disk.controller;
    if (unit !== undefined && Number.isInteger(unit)) disk.unit = unit;
    const fmt = attr(child(d, 'driver'), 'type');
    if (fmt && FORMATS[fmt]) disk.format = FORMATS[fmt];
    const bootOrder = attr(child(d, 'boot'), 'order');
    if (bootOrder !== undefined) disk.bootOrder = Number(bootOrder);
    if (child(d, 'readonly')) disk.notes!.push('read-only');
    if (child(d, 'shareable')) disk.notes!.push('shareable');
    model.disks.push(disk);
  }
  // <os><boot dev='hd'/>: the first disk boots.
  if (!model.disks.some((d) => d.bootOrder !== undefined) && osBoot.includes('hd') && model.disks[0])
    model.disks[0].bootOrder = 1;

  for (const i of children(devices, 'interface')) {
    const typeName = attr(child(i, 'model'), 'type') ?? 'rtl8139';
    const nic: VmModel['nics'][number] = { model: NIC_MODELS[typeName] ?? 'unknown', sourceModel: typeName };
    const mac = normalizeMac(attr(child(i, 'mac'), 'address'));
    if (mac) nic.mac = mac;
    const src = child(i, 'source');
    const network = attr(src, 'network') ?? attr(src, 'bridge') ?? attr(src, 'dev');
    if (network) nic.network = network;
    else if (attr(i, 'type') === 'user') nic.network = 'user';
    model.nics.push(nic);
  }
  for (const [el, key] of [
    ['sound', 'sound'],
    ['serial', 'serial'],
    ['parallel', 'parallel'],
    ['hostdev', 'hostdev'],
    ['tpm', 'tpm'],
  ] as const) {
    for (const [n, node] of children(devices, el).entries()) {
      model.unmapped.push({ key: `${key}${n}`, value: attr(node, 'model') ?? attr(node, 'type') ?? el });
    }
  }
  for (const c of children(devices, 'controller')) {
    if (attr(c, 'type') === 'usb' && attr(c, 'model') !== 'none')
      model.unmapped.push({ key: 'usb', value: attr(c, 'model') ?? 'usb controller' });
  }
  return model;
}

export const libvirtReader: VmReader = {
  platform: 'libvirt',
  detect(path, head) {
    const s = head.subarray(0, 8192).toString('utf8');
    if (/^\s*(<\?xml[^>]*>\s*)?(<!--[\s\S]*?-->\s*)*<domain[\s>]/.test(s)) return 95;
    if (/\.xml$/i.test(path) && /<domain[\s>]/.test(s)) return 80;
    return 0;
  },
  read: (path, options) => readLibvirt(path, options),
};
