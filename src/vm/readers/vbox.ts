/**
 * VirtualBox .vbox machine settings (XML, settings versions 1.x): machine identity, hardware,
 * storage controllers and attachments resolved through the media registry (differencing children
 * nested under their parents; an attachment names the image of the current state), network
 * adapters and the snapshot tree. An encrypted machine or encrypted disk is refused clearly.
 */
import { readFileSync, statSync } from 'node:fs';
import { basename, dirname, resolve } from 'node:path';
import { CorruptImageError, ioError, MissingFileError, UnsupportedFeatureError } from '../../disk/errors.js';
import { resolveReference } from '../../disk/refs.js';
import type { ReadVmOptions, VmReader } from '../dialect.js';
import {
  type DiskBus,
  type DiskController,
  emptyModel,
  type GuestHints,
  MiB,
  type NicModel,
  type ScsiModel,
  type VmModel,
  type VmSnapshot,
} from '../model.js';
import { attr, child, children, normalizeMac, parseXml, text, type XmlNode } from './xml.js';

/** VirtualBox controller types -> bus and SCSI model. */
const CONTROLLER_TYPES: Record<string, { bus: DiskBus; model?: ScsiModel }> = {
  PIIX3: { bus: 'ide' },
  PIIX4: { bus: 'ide' },
  ICH6: { bus: 'ide' },
  AHCI: { bus: 'sata' },
  LsiLogic: { bus: 'scsi', model: 'lsilogic' },
  BusLogic: { bus: 'scsi', model: 'buslogic' },
  LsiLogicSas: { bus: 'scsi', model: 'lsisas1068' },
  NVMe: { bus: 'nvme' },
  VirtioSCSI: { bus: 'scsi', model: 'virtio-scsi' },
};

/** VirtualBox adapter types -> NIC model. Am79C973 is VirtualBox's default when none is named. */
const ADAPTER_TYPES: Record<string, NicModel> = {
  Am79C970A: 'pcnet',
  Am79C973: 'pcnet',
  Am79C960: 'pcnet',
  '82540EM': 'e1000',
  '82543GC': 'e1000',
  '82545EM': 'e1000',
  virtio: 'virtio',
};

/** Media formats as VirtualBox names them -> vmferry's format names. */
const MEDIA_FORMATS: Record<string, string> = {
  vdi: 'vdi',
  vmdk: 'vmdk',
  vhd: 'vpc',
  vhdx: 'vhdx',
  qcow: 'qcow',
  qcow2: 'qcow2',
  raw: 'raw',
  parallels: 'parallels',
};

const OS_DESCRIPTIONS: Record<string, string> = {
  Windows2003: 'Windows Server 2003',
  Windows2008: 'Windows Server 2008',
  Windows2012: 'Windows Server 2012',
  Windows2016: 'Windows Server 2016',
  Windows2019: 'Windows Server 2019',
  Windows2022: 'Windows Server 2022',
  Windows2025: 'Windows Server 2025',
  WindowsXP: 'Windows XP',
  WindowsVista: 'Windows Vista',
  Windows7: 'Windows 7',
  Windows8: 'Windows 8',
  Windows81: 'Windows 8.1',
  Windows10: 'Windows 10',
  Windows11: 'Windows 11',
  Ubuntu: 'Ubuntu',
  Debian: 'Debian',
  RedHat: 'Red Hat',
  Fedora: 'Fedora',
  OpenSUSE: 'openSUSE',
  Oracle: 'Oracle Linux',
  ArchLinux: 'Arch Linux',
  Gentoo: 'Gentoo',
  Linux26: 'Linux 2.6 / 3.x / 4.x / 5.x',
  Linux: 'Linux',
  FreeBSD: 'FreeBSD',
  OpenBSD: 'OpenBSD',
  NetBSD: 'NetBSD',
};

export function vboxGuestHints(osType: string | undefined): GuestHints {
  if (!osType) return {};
  const m = /^(.*?)(?:_(64|x64|arm64))?$/.exec(osType)!;
  const base = m[1]!;
  const is64bit = m[2] !== undefined;
  let family: GuestHints['family'] = 'other';
  if (/^Win/i.test(base)) family = 'windows';
  else if (/BSD/i.test(base)) family = 'bsd';
  else if (
    /Linux|Ubuntu|Debian|RedHat|Fedora|OpenSUSE|SUSE|Oracle|Arch|Gentoo|Mandriva|Turbolinux|Xandros|Red ?Hat|CentOS|Rocky|Alma/i.test(
      base,
    )
  ) {
    family = 'linux';
  }
  const name = OS_DESCRIPTIONS[base] ?? base;
  return { sourceId: osType, family, description: `${name}${is64bit ? ' (64-bit)' : ''}`, is64bit };
}

/** The OSType id VirtualBox uses for a guest hint (the writer's direction). */
export function vboxOsType(guest: GuestHints): string {
  if (guest.sourceId && /^[A-Za-z0-9]+(_(64|x64))?$/.test(guest.sourceId) && guest.sourceId.length < 24) {
    // A VirtualBox id read from a .vbox survives as is.
    const known = Object.keys(OS_DESCRIPTIONS).some((k) => guest.sourceId!.replace(/_(64|x64)$/, '') === k);
    if (known) return guest.sourceId;
  }
  const d = `${guest.description ?? ''} ${guest.sourceId ?? ''}`;
  const s64 = guest.is64bit === false ? '' : '_64';
  if (guest.family === 'windows') {
    for (const year of ['2025', '2022', '2019', '2016', '2012', '2008']) if (d.includes(year)) return `Windows${year}${s64}`;
    if (/11/.test(d)) return `Windows11_64`;
    if (/10/.test(d)) return `Windows10${s64}`;
    return `Windows10${s64}`;
  }
  if (guest.family === 'linux') {
    if (/ubuntu/i.test(d)) return `Ubuntu${s64}`;
    if (/debian/i.test(d)) return `Debian${s64}`;
    if (/red ?hat|rhel|centos|rocky|alma/i.test(d)) return `RedHat${s64}`;
    if (/fedora/i.test(d)) return `Fedora${s64}`;
    return `Linux26${s64}`;
  }
  if (guest.family === 'bsd') return `FreeBSD${s64}`;
  return 'Other';
}

interface Medium {
  uuid: string;
  location: string;
  format?: string;
  parent?: string;
  encrypted: boolean;
}

function stripBraces(uuid: string | undefined): string | undefined {
  return uuid?.replace(/^\{|\}$/g, '').toLowerCase();
}

function collectMedia(list: XmlNode[], parent: string | undefined, into: Map<string, Medium>): void {
  for (const hd of list) {
    const uuid = stripBraces(attr(hd, 'uuid'));
    const location = attr(hd, 'location');
    if (!uuid || location === undefined) continue;
    const encrypted = children(hd, 'Property').some((p) => /^CRYPT\//.test(attr(p, 'name') ?? ''));
    into.set(uuid, { uuid, location, format: attr(hd, 'format'), parent, encrypted });
    collectMedia(children(hd, 'HardDisk'), uuid, into);
  }
}

function chainOf(media: Map<string, Medium>, uuid: string): Medium[] {
  const chain: Medium[] = [];
  let cur = media.get(uuid);
  while (cur && chain.length < 256) {
    chain.push(cur);
    cur = cur.parent ? media.get(cur.parent) : undefined;
  }
  return chain;
}

function collectSnapshots(
  node: XmlNode | undefined,
  parent: string | undefined,
  current: string | undefined,
  out: VmSnapshot[],
): void {
  if (!node) return;
  const id = stripBraces(attr(node, 'uuid')) ?? `snapshot${out.length}`;
  const snap: VmSnapshot = { id, name: attr(node, 'name') ?? id };
  const description = text(child(node, 'Description')) ?? attr(node, 'Description');
  if (description) snap.description = description;
  if (parent) snap.parent = parent;
  const ts = attr(node, 'timeStamp');
  if (ts) snap.createdAt = ts;
  if (current && id === current) snap.current = true;
  out.push(snap);
  for (const list of children(node, 'Snapshots')) {
    for (const s of children(list, 'Snapshot')) collectSnapshots(s, id, current, out);
  }
}

function isTrue(v: string | undefined, fallback: boolean): boolean {
  if (v === undefined) return fallback;
  return v === 'true' || v === '1' || v === 'yes';
}

export async function readVbox(path: string, options: ReadVmOptions = {}): Promise<VmModel> {
  let textContent: string;
  try {
    textContent = readFileSync(path, 'utf8');
  } catch (err) {
    throw ioError(err, path);
  }
  const doc = parseXml(textContent, path, 'VirtualBox settings file');
  const vbox = child(doc, 'VirtualBox');
  if (!vbox) throw new CorruptImageError('not a VirtualBox settings file (no <VirtualBox> root element)', path);
  if (child(vbox, 'MachineEncrypted')) {
    throw new UnsupportedFeatureError(
      'encrypted VM: the VirtualBox machine settings are encrypted; decrypt it in VirtualBox first',
      path,
    );
  }
  const machine = child(vbox, 'Machine');
  if (!machine) throw new CorruptImageError('no <Machine> element in the VirtualBox settings file', path);

  const name = attr(machine, 'name') ?? basename(path).replace(/\.vbox$/i, '');
  const model = emptyModel(name, 'virtualbox');
  model.sourceFile = resolve(path);
  const uuid = stripBraces(attr(machine, 'uuid'));
  if (uuid) model.uuid = uuid;
  model.guest = vboxGuestHints(attr(machine, 'OSType'));
  const version = attr(vbox, 'version');
  if (version) model.unmapped.push({ key: 'settings.version', value: version });

  // Media registry: every hard disk with its differencing children.
  const media = new Map<string, Medium>();
  const registry = child(machine, 'MediaRegistry');
  collectMedia(children(child(registry, 'HardDisks'), 'HardDisk'), undefined, media);
  const dvdImages = new Map<string, string>();
  for (const img of children(child(registry, 'DVDImages'), 'Image')) {
    const id = stripBraces(attr(img, 'uuid'));
    const loc = attr(img, 'location');
    if (id && loc) dvdImages.set(id, loc);
  }
  const encrypted = [...media.values()].filter((m) => m.encrypted);
  if (encrypted.length > 0) {
    throw new UnsupportedFeatureError(
      `encrypted VM: disk '${encrypted[0]!.location}' is encrypted by VirtualBox (CRYPT/KeyStore); decrypt it in VirtualBox (VBoxManage encryptmedium --newpassword "") first`,
      path,
    );
  }

  const hw = child(machine, 'Hardware');
  if (!hw) throw new CorruptImageError('no <Hardware> element in the VirtualBox machine', path);
  const platform = child(hw, 'Platform');
  const cpu = child(hw, 'CPU') ?? child(platform, 'CPU');
  const count = Number(attr(cpu, 'count') ?? '1');
  if (!Number.isInteger(count) || count < 1 || count > 1024)
    throw new CorruptImageError(`bad CPU count '${attr(cpu, 'count')}'`, path);
  model.cpus = count;
  const ram = Number(attr(child(hw, 'Memory'), 'RAMSize') ?? '128');
  if (!Number.isFinite(ram) || ram <= 0 || ram > 16 * 1024 * 1024) {
    throw new CorruptImageError(`bad memory size '${attr(child(hw, 'Memory'), 'RAMSize')}'`, path);
  }
  model.memory = ram * MiB;
  const firmware = child(hw, 'Firmware') ?? child(platform, 'Firmware');
  const fwType = attr(firmware, 'type') ?? 'BIOS';
  model.firmware = /^EFI/i.test(fwType) ? 'uefi' : 'bios';
  const nvram = child(child(hw, 'BIOS') ?? child(platform, 'BIOS'), 'NVRAM') ?? child(hw, 'NVRAM');
  if (nvram) model.unmapped.push({ key: 'nvram', value: attr(nvram, 'path') ?? '' });
  const secureBoot = child(nvram, 'SecureBoot') ?? child(child(hw, 'BIOS'), 'SecureBoot');
  if (secureBoot && isTrue(attr(secureBoot, 'enabled'), false)) model.secureBoot = true;
  const tpm = child(hw, 'TrustedPlatformModule');
  if (tpm && attr(tpm, 'type') && attr(tpm, 'type') !== 'None') model.unmapped.push({ key: 'tpm', value: attr(tpm, 'type')! });

  // Boot order: the position of the first hard disk entry.
  const order = children(child(hw, 'Boot'), 'Order')
    .filter((o) => attr(o, 'device') !== 'None')
    .sort((a, b) => Number(attr(a, 'position')) - Number(attr(b, 'position')));
  const diskBootPos = order.findIndex((o) => attr(o, 'device') === 'HardDisk');
  const dvdBootPos = order.findIndex((o) => attr(o, 'device') === 'DVD');
  if (dvdBootPos >= 0 && (diskBootPos < 0 || dvdBootPos < diskBootPos)) {
    model.unmapped.push({ key: 'boot.order', value: order.map((o) => attr(o, 'device')).join(',') });
  }

  // Storage.
  const controllersNode = child(hw, 'StorageControllers') ?? child(child(hw, 'Storage'), 'StorageControllers');
  const busCount = new Map<DiskBus, number>();
  const newId = (bus: DiskBus) => {
    const n = busCount.get(bus) ?? 0;
    busCount.set(bus, n + 1);
    return `${bus}${n}`;
  };
  let firstDiskBoot = diskBootPos >= 0;
  let ideControllers = 0;
  for (const sc of children(controllersNode, 'StorageController')) {
    const type = attr(sc, 'type') ?? '';
    const scName = attr(sc, 'name') ?? type;
    const kind = CONTROLLER_TYPES[type];
    const attached = children(sc, 'AttachedDevice');
    if (!kind) {
      if (type === 'I82078') {
        for (const _ of attached) model.unmapped.push({ key: 'floppy', value: `floppy drive on '${scName}'` });
      } else if (attached.length > 0) {
        model.warnings.push(
          `storage controller '${scName}' of type '${type}' is not understood; its ${attached.length} device(s) are not read`,
        );
        model.unmapped.push({ key: `controller.${scName}`, value: type });
      }
      continue;
    }
    // IDE: one vmferry controller per channel (port), the unit being master/slave (device).
    const ids = new Map<number, string>();
    // IDE channels are numbered across controllers: the first controller's ports are ide0/ide1.
    const ideBase = kind.bus === 'ide' ? ideControllers++ * 2 : 0;
    const controllerId = (port: number): string => {
      const key = kind.bus === 'ide' ? port : 0;
      let id = ids.get(key);
      if (!id) {
        id = kind.bus === 'ide' ? `ide${ideBase + port}` : newId(kind.bus);
        ids.set(key, id);
        const ctl: DiskController = { id, bus: kind.bus };
        if (kind.model) ctl.model = kind.model;
        model.controllers.push(ctl);
      }
      return id;
    };
    for (const dev of attached) {
      const port = Number(attr(dev, 'port') ?? '0');
      const device = Number(attr(dev, 'device') ?? '0');
      if (!Number.isInteger(port) || port < 0 || !Number.isInteger(device) || device < 0) {
        throw new CorruptImageError(`bad port/device on controller '${scName}'`, path);
      }
      const unit = kind.bus === 'ide' ? device : port;
      const devType = attr(dev, 'type');
      const imageUuid = stripBraces(attr(child(dev, 'Image'), 'uuid'));
      if (devType === 'HardDisk') {
        if (!imageUuid) {
          model.warnings.push(`hard disk on '${scName}' port ${port} names no image; skipped`);
          continue;
        }
        const chain = chainOf(media, imageUuid);
        const top = chain[0];
        if (!top)
          throw new CorruptImageError(
            `hard disk on '${scName}' port ${port} names image {${imageUuid}}, which is not in the media registry`,
            path,
          );
        const diskPath = locate(path, top.location, options, model.warnings);
        const notes: string[] = [`VirtualBox controller '${scName}' (${type}) port ${port} device ${device}`];
        if (chain.length > 1) {
          notes.push(`differencing chain: ${chain.map((m) => m.location).join(' -> ')}`);
        }
        const disk: VmModel['disks'][number] = {
          path: diskPath,
          bus: kind.bus,
          controller: controllerId(port),
          unit,
          notes,
        };
        const fmt = MEDIA_FORMATS[(top.format ?? '').toLowerCase()];
        if (fmt) disk.format = fmt;
        if (firstDiskBoot) {
          disk.bootOrder = 1;
          firstDiskBoot = false;
        }
        model.disks.push(disk);
      } else if (devType === 'DVD') {
        const cd: VmModel['cdroms'][number] = { bus: kind.bus, controller: controllerId(port), unit };
        const loc = imageUuid ? dvdImages.get(imageUuid) : undefined;
        if (loc) cd.path = resolve(dirname(path), loc);
        model.cdroms.push(cd);
      } else if (devType === 'Floppy') {
        model.unmapped.push({ key: 'floppy', value: `floppy drive on '${scName}'` });
      } else {
        model.unmapped.push({ key: `storage.${scName}.${port}.${device}`, value: devType ?? 'unknown' });
      }
    }
  }

  // Network adapters (enabled ones; DisabledModes hold settings of attachment types not in use).
  const network = child(hw, 'Network');
  for (const ad of children(network, 'Adapter')) {
    if (!isTrue(attr(ad, 'enabled'), false)) continue;
    const type = attr(ad, 'type') ?? 'Am79C973';
    const nic: VmModel['nics'][number] = { model: ADAPTER_TYPES[type] ?? 'unknown', sourceModel: type };
    const mac = normalizeMac(attr(ad, 'MACAddress'));
    if (mac) nic.mac = mac;
    if (child(ad, 'NAT')) nic.network = 'nat';
    for (const [el, prefix] of [
      ['BridgedInterface', 'bridged'],
      ['HostOnlyInterface', 'hostonly'],
      ['InternalNetwork', 'intnet'],
      ['NATNetwork', 'natnetwork'],
      ['GenericInterface', 'generic'],
      ['HostOnlyNetwork', 'hostonlynet'],
    ] as const) {
      const n = child(ad, el);
      if (n) nic.network = attr(n, 'name') ?? prefix;
    }
    if (nic.model === 'unknown') model.warnings.push(`network adapter slot ${attr(ad, 'slot')} has unknown type '${type}'`);
    model.nics.push(nic);
  }

  // Devices the neutral model has no field for, kept for the report.
  const audio = child(hw, 'AudioAdapter');
  if (audio && isTrue(attr(audio, 'enabled'), false)) {
    model.unmapped.push({ key: 'sound', value: `${attr(audio, 'controller') ?? 'AC97'} audio adapter` });
  }
  for (const c of children(child(child(hw, 'USB'), 'Controllers'), 'Controller')) {
    model.unmapped.push({ key: 'usb', value: `${attr(c, 'type') ?? 'USB'} controller` });
  }
  for (const port of children(child(hw, 'UART'), 'Port')) {
    if (isTrue(attr(port, 'enabled'), false))
      model.unmapped.push({ key: `serial${attr(port, 'slot') ?? ''}`, value: attr(port, 'hostMode') ?? 'enabled' });
  }
  for (const port of children(child(hw, 'LPT'), 'Port')) {
    if (isTrue(attr(port, 'enabled'), false))
      model.unmapped.push({ key: `parallel${attr(port, 'slot') ?? ''}`, value: 'enabled' });
  }

  // Snapshot tree.
  const current = stripBraces(attr(machine, 'currentSnapshot'));
  collectSnapshots(child(machine, 'Snapshot'), undefined, current, model.snapshots);
  return model;
}

/** Resolves a medium location relative to the .vbox folder; a missing file is a warning, not an error. */
function locate(vboxPath: string, location: string, options: ReadVmOptions, warnings: string[]): string {
  try {
    return resolveReference(vboxPath, location, 'disk', { allowExternalFiles: options.allowExternalFiles });
  } catch (err) {
    if (err instanceof MissingFileError) {
      const where = resolve(dirname(vboxPath), location);
      warnings.push(`disk '${location}' not found (looked for ${where})`);
      return where;
    }
    throw err;
  }
}

export const vboxReader: VmReader = {
  platform: 'virtualbox',
  detect(path, head) {
    const s = head.subarray(0, 4096).toString('utf8');
    if (/<VirtualBox[\s>]/.test(s) && /<Machine(Encrypted)?[\s>]/.test(head.toString('utf8'))) return 95;
    if (/\.vbox$/i.test(path) && /<VirtualBox[\s>]/.test(s)) return 90;
    return 0;
  },
  read: async (path, options) => {
    try {
      if (!statSync(path).isFile()) throw new CorruptImageError('is not a file', path);
    } catch (err) {
      throw ioError(err, path);
    }
    return readVbox(path, options);
  },
};
