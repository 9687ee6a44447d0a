/**
 * VMware .vmx reader (Workstation, Fusion, ESXi): `key = "value"` lines, keys case-insensitive,
 * special characters escaped as `|XX` hex. Devices hang on scsiN/sataN/nvmeN/ideN controllers as
 * `busN:U.*`; NICs are `ethernetN.*`. The disk a device names is the top of its chain (the current
 * snapshot's delta when there are snapshots); the .vmsd beside the .vmx lists the snapshot tree.
 */
import '../../formats/index.js';
import { readFileSync, statSync } from 'node:fs';
import { basename, dirname, extname, isAbsolute, join, resolve } from 'node:path';
import { CorruptImageError, ioError, MissingFileError, UnsupportedFeatureError, VmferryError } from '../../disk/errors.js';
import { resolveReference } from '../../disk/refs.js';
import { openImage } from '../../disk/registry.js';
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

const MAX_VMX_BYTES = 4 * 1024 * 1024;

export interface VmxEntry {
  /** The key as written. */
  key: string;
  value: string;
}

/** Undoes VMware's `|XX` escapes (e.g. |22 is ", |7C is |). */
export function unescapeVmx(value: string): string {
  return value.replace(/\|([0-9A-Fa-f]{2})/g, (_, hex: string) => String.fromCharCode(Number.parseInt(hex, 16)));
}

/** Escapes what a quoted VMX value cannot hold: `"`, `|`, `#` and control characters. */
export function escapeVmx(value: string): string {
  return value.replace(/[|"#\u0000-\u001f\u007f]/g, (c) => `|${c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`);
}

/** Parses VMX-syntax text (also .vmsd, .vmxf-less dictionaries) into entries keyed by lower-case key. */
export function parseVmx(text: string, file: string): Map<string, VmxEntry> {
  const out = new Map<string, VmxEntry>();
  for (const [i, raw] of text.split(/\r?\n/).entries()) {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) continue;
    const m = /^([^=\s][^=]*?)\s*=\s*(.*)$/.exec(line);
    if (!m) throw new CorruptImageError(`line ${i + 1} is not 'key = "value"': '${line.slice(0, 80)}'`, file);
    let value = m[2]!;
    if (value.startsWith('"')) {
      const end = value.lastIndexOf('"');
      if (end <= 0) throw new CorruptImageError(`line ${i + 1}: the value of '${m[1]}' has no closing quote`, file);
      value = value.slice(1, end);
    } else {
      value = value.replace(/\s+#.*$/, '').trim();
    }
    out.set(m[1]!.toLowerCase(), { key: m[1]!, value: unescapeVmx(value) });
  }
  return out;
}

function decodeText(buf: Buffer): string {
  const utf8 = buf.toString('utf8');
  const enc = /^\s*\.encoding\s*=\s*"([^"]*)"/im.exec(utf8)?.[1]?.toLowerCase();
  if (enc && enc !== 'utf-8' && enc !== 'utf8' && /^(windows-1252|iso-8859-1|latin1|us-ascii)$/.test(enc)) {
    return buf.toString('latin1');
  }
  return utf8;
}

function readVmxFile(path: string): Map<string, VmxEntry> {
  let buf: Buffer;
  try {
    if (statSync(path).size > MAX_VMX_BYTES) throw new CorruptImageError('is too large to be a VMX file', path);
    buf = readFileSync(path);
  } catch (err) {
    throw ioError(err, path);
  }
  if (buf.includes(0)) throw new CorruptImageError('is not a VMX file (binary content)', path);
  return parseVmx(decodeText(buf), path);
}

const TRUE = /^(true|yes|1|on)$/i;

// ---- guest OS ids -------------------------------------------------------------------------------

/** VMX guestOS ids with their vSphere API (OVF vmw:osType) names and descriptions. */
export const VMWARE_GUESTS: { vmx: string; api: string; description: string }[] = [
  { vmx: 'other', api: 'otherGuest', description: 'Other (32-bit)' },
  { vmx: 'other-64', api: 'otherGuest64', description: 'Other (64-bit)' },
  { vmx: 'otherlinux', api: 'otherLinuxGuest', description: 'Other Linux (32-bit)' },
  { vmx: 'otherlinux-64', api: 'otherLinux64Guest', description: 'Other Linux (64-bit)' },
  { vmx: 'other26xlinux-64', api: 'other26xLinux64Guest', description: 'Other 2.6.x Linux (64-bit)' },
  { vmx: 'other3xlinux-64', api: 'other3xLinux64Guest', description: 'Other 3.x Linux (64-bit)' },
  { vmx: 'other4xlinux-64', api: 'other4xLinux64Guest', description: 'Other 4.x Linux (64-bit)' },
  { vmx: 'other5xlinux-64', api: 'other5xLinux64Guest', description: 'Other 5.x Linux (64-bit)' },
  { vmx: 'other6xlinux-64', api: 'other6xLinux64Guest', description: 'Other 6.x Linux (64-bit)' },
  { vmx: 'ubuntu', api: 'ubuntuGuest', description: 'Ubuntu Linux (32-bit)' },
  { vmx: 'ubuntu-64', api: 'ubuntu64Guest', description: 'Ubuntu Linux (64-bit)' },
  { vmx: 'debian10-64', api: 'debian10_64Guest', description: 'Debian GNU/Linux 10 (64-bit)' },
  { vmx: 'debian11-64', api: 'debian11_64Guest', description: 'Debian GNU/Linux 11 (64-bit)' },
  { vmx: 'debian12-64', api: 'debian12_64Guest', description: 'Debian GNU/Linux 12 (64-bit)' },
  { vmx: 'rhel7-64', api: 'rhel7_64Guest', description: 'Red Hat Enterprise Linux 7 (64-bit)' },
  { vmx: 'rhel8-64', api: 'rhel8_64Guest', description: 'Red Hat Enterprise Linux 8 (64-bit)' },
  { vmx: 'rhel9-64', api: 'rhel9_64Guest', description: 'Red Hat Enterprise Linux 9 (64-bit)' },
  { vmx: 'centos7-64', api: 'centos7_64Guest', description: 'CentOS 7 (64-bit)' },
  { vmx: 'centos8-64', api: 'centos8_64Guest', description: 'CentOS 8 (64-bit)' },
  { vmx: 'sles15-64', api: 'sles15_64Guest', description: 'SUSE Linux Enterprise 15 (64-bit)' },
  { vmx: 'freebsd', api: 'freebsdGuest', description: 'FreeBSD (32-bit)' },
  { vmx: 'freebsd-64', api: 'freebsd64Guest', description: 'FreeBSD (64-bit)' },
  { vmx: 'windows7', api: 'windows7Guest', description: 'Windows 7 (32-bit)' },
  { vmx: 'windows7-64', api: 'windows7_64Guest', description: 'Windows 7 (64-bit)' },
  { vmx: 'windows8-64', api: 'windows8_64Guest', description: 'Windows 8 (64-bit)' },
  { vmx: 'windows9', api: 'windows9Guest', description: 'Windows 10 (32-bit)' },
  { vmx: 'windows9-64', api: 'windows9_64Guest', description: 'Windows 10 (64-bit)' },
  { vmx: 'windows11-64', api: 'windows11_64Guest', description: 'Windows 11 (64-bit)' },
  { vmx: 'windows7srv-64', api: 'windows7Server64Guest', description: 'Windows Server 2008 R2 (64-bit)' },
  { vmx: 'windows8srv-64', api: 'windows8Server64Guest', description: 'Windows Server 2012 (64-bit)' },
  { vmx: 'windows9srv-64', api: 'windows9Server64Guest', description: 'Windows Server 2016 (64-bit)' },
  { vmx: 'windows2019srv-64', api: 'windows2019srv_64Guest', description: 'Windows Server 2019 (64-bit)' },
  { vmx: 'windows2019srvnext-64', api: 'windows2019srvNext_64Guest', description: 'Windows Server 2022 (64-bit)' },
  { vmx: 'windows2022srvnext-64', api: 'windows2022srvNext_64Guest', description: 'Windows Server 2025 (64-bit)' },
];

/** The VMX id for a vSphere API guest id (OVF vmw:osType), e.g. other4xLinux64Guest -> other4xlinux-64. */
export function vmxGuestFromApi(api: string): string {
  const known = VMWARE_GUESTS.find((g) => g.api.toLowerCase() === api.toLowerCase());
  if (known) return known.vmx;
  return api
    .replace(/Guest$/, '')
    .replace(/_?64$/, '-64')
    .replace(/Server/, 'srv')
    .toLowerCase();
}

/** The vSphere API guest id for a VMX id (the reverse of vmxGuestFromApi). */
export function apiGuestFromVmx(vmx: string): string {
  const known = VMWARE_GUESTS.find((g) => g.vmx === vmx.toLowerCase());
  if (known) return known.api;
  return vmx.endsWith('-64') ? `${vmx.slice(0, -3)}_64Guest` : `${vmx}Guest`;
}

/** Guest hints from a VMware guest id (VMX form or API form). */
export function vmwareGuestHints(id: string): GuestHints {
  const vmx = /Guest/.test(id) ? vmxGuestFromApi(id) : id.toLowerCase();
  const known = VMWARE_GUESTS.find((g) => g.vmx === vmx);
  let family: GuestHints['family'] = 'other';
  if (/^win|^longhorn|^nt/.test(vmx)) family = 'windows';
  else if (
    /linux|ubuntu|debian|rhel|centos|sles|suse|oracle|fedora|photon|coreos|asianux|mandr|redhat|turbo|nld|amazon|alma|rocky|vmware-photon/.test(
      vmx,
    )
  )
    family = 'linux';
  else if (/bsd/.test(vmx)) family = 'bsd';
  return {
    sourceId: id,
    family,
    is64bit: /-64$|64/.test(vmx),
    ...(known ? { description: known.description } : {}),
  };
}

// ---- the reader ---------------------------------------------------------------------------------

const SCSI_MODELS: Record<string, ScsiModel> = {
  lsilogic: 'lsilogic',
  lsisas1068: 'lsisas1068',
  buslogic: 'buslogic',
  pvscsi: 'pvscsi',
};

const NIC_MODELS: Record<string, NicModel> = {
  e1000: 'e1000',
  e1000e: 'e1000e',
  vmxnet3: 'vmxnet3',
  vmxnet: 'vmxnet2',
  vmxnet2: 'vmxnet2',
  vlance: 'pcnet',
};

function formatUuid(text: string): string | undefined {
  const hex = text.replace(/[\s-]/g, '').toLowerCase();
  if (!/^[0-9a-f]{32}$/.test(hex)) return undefined;
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function normaliseMac(text: string): string | undefined {
  const hex = text.replace(/[:-]/g, '').toLowerCase();
  if (!/^[0-9a-f]{12}$/.test(hex)) return undefined;
  return hex.match(/../g)!.join(':');
}

/** Reads the .vmsd snapshot dictionary beside a .vmx. */
function readSnapshots(vmsdPath: string, warnings: string[]): VmSnapshot[] {
  let entries: Map<string, VmxEntry>;
  try {
    entries = readVmxFile(vmsdPath);
  } catch (err) {
    if (err instanceof MissingFileError) return [];
    if (err instanceof VmferryError) {
      warnings.push(`snapshot list ${basename(vmsdPath)} unreadable: ${err.message}`);
      return [];
    }
    throw err;
  }
  const get = (k: string) => entries.get(k.toLowerCase())?.value;
  const current = get('snapshot.current');
  const out: VmSnapshot[] = [];
  const indexes = new Set<number>();
  for (const k of entries.keys()) {
    const m = /^snapshot(\d+)\.uid$/.exec(k);
    if (m) indexes.add(Number(m[1]));
  }
  for (const i of [...indexes].sort((a, b) => a - b)) {
    const uid = get(`snapshot${i}.uid`)!;
    const snap: VmSnapshot = { id: uid, name: get(`snapshot${i}.displayName`) ?? `snapshot ${uid}` };
    const description = get(`snapshot${i}.description`);
    if (description) snap.description = description;
    const parent = get(`snapshot${i}.parent`);
    if (parent) snap.parent = parent;
    const hi = Number(get(`snapshot${i}.createTimeHigh`));
    const lo = Number(get(`snapshot${i}.createTimeLow`));
    if (Number.isFinite(hi) && Number.isFinite(lo) && get(`snapshot${i}.createTimeHigh`) !== undefined) {
      const micros = hi * 2 ** 32 + (lo >>> 0);
      const date = new Date(micros / 1000);
      if (!Number.isNaN(date.getTime())) snap.createdAt = date.toISOString();
    }
    if (current !== undefined && uid === current) snap.current = true;
    out.push(snap);
  }
  return out;
}

/** Reads a .vmx into the neutral model. */
export async function readVmx(path: string, options: ReadVmOptions = {}): Promise<VmModel> {
  const entries = readVmxFile(path);
  const used = new Set<string>(['.encoding', 'config.version']);
  const get = (key: string): string | undefined => {
    const k = key.toLowerCase();
    const e = entries.get(k);
    if (e) used.add(k);
    return e?.value;
  };
  if (entries.has('encryption.keysafe') || entries.has('encryption.data')) {
    throw new UnsupportedFeatureError(
      'encrypted VM: its configuration and disks are encrypted (encryption.keySafe / encryption.data); decrypt it in VMware first',
      path,
    );
  }
  const dir = dirname(resolve(path));
  const model = emptyModel(get('displayName') ?? basename(path, extname(path)), 'vmware');
  model.sourceFile = resolve(path);
  if (options.name) model.name = options.name;
  const uuid = formatUuid(get('uuid.bios') ?? '');
  if (uuid) model.uuid = uuid;

  const firmware = get('firmware')?.toLowerCase();
  model.firmware = firmware === 'efi' ? 'uefi' : 'bios';
  if (firmware && firmware !== 'efi' && firmware !== 'bios') model.warnings.push(`unknown firmware '${firmware}', assuming BIOS`);
  const secure = get('uefi.secureBoot.enabled');
  if (secure !== undefined) model.secureBoot = TRUE.test(secure);

  const intOf = (key: string): number | undefined => {
    const v = get(key);
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isSafeInteger(n) || n <= 0) {
      model.warnings.push(`${key} = '${v}' is not a positive number; ignored`);
      return undefined;
    }
    return n;
  };
  model.cpus = intOf('numvcpus') ?? 1;
  const cores = intOf('cpuid.coresPerSocket');
  if (cores) model.coresPerSocket = cores;
  const memsize = intOf('memsize');
  if (memsize) model.memory = memsize * MiB;
  else model.warnings.push('memsize is missing; assuming 1024 MiB');
  const guest = get('guestOS');
  if (guest) model.guest = vmwareGuestHints(guest);

  // Controllers and the devices on them.
  const controllers = new Map<string, DiskController>();
  const controller = (bus: string, n: string): DiskController => {
    const id = `${bus}${n}`;
    let c = controllers.get(id);
    if (!c) {
      c = { id, bus: bus as DiskBus };
      if (bus === 'scsi') {
        const dev = get(`${id}.virtualDev`)?.toLowerCase();
        c.model = dev === undefined ? 'buslogic' : (SCSI_MODELS[dev] ?? 'unknown');
        if (dev !== undefined && !SCSI_MODELS[dev]) model.warnings.push(`${id}: unknown SCSI adapter '${dev}'`);
      }
      controllers.set(id, c);
    }
    return c;
  };
  for (const [k, e] of entries) {
    const m = /^(scsi|sata|nvme)(\d+)\.present$/.exec(k);
    if (m && TRUE.test(e.value)) {
      used.add(k);
      controller(m[1]!, m[2]!);
    } else if (m) used.add(k);
  }

  const devices = new Map<string, { bus: string; ctl: string; unit: number }>();
  for (const k of entries.keys()) {
    const m = /^(scsi|sata|nvme|ide)(\d+):(\d+)\./.exec(k);
    if (m) devices.set(`${m[1]}${m[2]}:${m[3]}`, { bus: m[1]!, ctl: m[2]!, unit: Number(m[3]) });
  }
  const sorted = [...devices.entries()].sort(([, a], [, b]) =>
    a.bus === b.bus ? Number(a.ctl) - Number(b.ctl) || a.unit - b.unit : a.bus.localeCompare(b.bus),
  );
  for (const [id, d] of sorted) {
    const present = get(`${id}.present`);
    if (!present || !TRUE.test(present)) continue;
    if (d.bus !== 'ide' && !controllers.has(`${d.bus}${d.ctl}`)) {
      model.warnings.push(`${id} is present but its controller ${d.bus}${d.ctl} is not; skipped`);
      continue;
    }
    const c = controller(d.bus, d.ctl);
    const type = (get(`${id}.deviceType`) ?? '').toLowerCase();
    const fileName = get(`${id}.fileName`);
    if (type.includes('cdrom') || type.includes('atapi')) {
      const cd = { bus: c.bus, controller: c.id, unit: d.unit } as VmModel['cdroms'][number];
      if (type === 'cdrom-image' && fileName) cd.path = isAbsolute(fileName) ? fileName : join(dir, fileName);
      get(`${id}.startConnected`);
      get(`${id}.autodetect`);
      model.cdroms.push(cd);
      continue;
    }
    if (!fileName) {
      model.warnings.push(`${id} is a disk with no fileName; skipped`);
      continue;
    }
    const notes: string[] = [];
    const mode = get(`${id}.mode`);
    if (mode && mode !== 'persistent') notes.push(`mode ${mode}`);
    if (type === 'rawdisk') notes.push('raw device mapping');
    let diskPath: string;
    try {
      diskPath = resolveReference(path, fileName, 'disk', options);
    } catch (err) {
      if (!(err instanceof MissingFileError)) throw err;
      diskPath = isAbsolute(fileName) ? fileName : join(dir, fileName);
      model.warnings.push(`${id}: disk '${fileName}' not found`);
      model.disks.push({ path: diskPath, format: 'vmdk', bus: c.bus, controller: c.id, unit: d.unit, notes });
      continue;
    }
    const disk: VmModel['disks'][number] = { path: diskPath, bus: c.bus, controller: c.id, unit: d.unit };
    try {
      const reader = await openImage(diskPath, { noBacking: true, allowExternalFiles: options.allowExternalFiles });
      try {
        disk.format = reader.format;
        disk.capacity = reader.virtualSize;
        if (reader.details.backingFilename) notes.push(`snapshot delta; parent '${reader.details.backingFilename}'`);
      } finally {
        await reader.close();
      }
    } catch (err) {
      if (!(err instanceof VmferryError)) throw err;
      disk.format = 'vmdk';
      model.warnings.push(`${id}: disk '${fileName}' cannot be opened: ${err.message}`);
    }
    if (notes.length) disk.notes = notes;
    model.disks.push(disk);
  }
  model.controllers = [...controllers.values()].sort((a, b) => a.id.localeCompare(b.id));

  // NICs.
  const nicIndexes = new Set<number>();
  for (const k of entries.keys()) {
    const m = /^ethernet(\d+)\./.exec(k);
    if (m) nicIndexes.add(Number(m[1]));
  }
  for (const n of [...nicIndexes].sort((a, b) => a - b)) {
    const p = `ethernet${n}`;
    const present = get(`${p}.present`);
    if (!present || !TRUE.test(present)) continue;
    const dev = get(`${p}.virtualDev`)?.toLowerCase();
    const nic: VmModel['nics'][number] = {
      model: dev === undefined ? 'pcnet' : (NIC_MODELS[dev] ?? 'unknown'),
      sourceModel: dev ?? 'vlance (default)',
    };
    const addressType = get(`${p}.addressType`)?.toLowerCase();
    const stat = get(`${p}.address`);
    const generated = get(`${p}.generatedAddress`);
    get(`${p}.generatedAddressOffset`);
    get(`${p}.checkMACAddress`);
    const mac = normaliseMac((addressType === 'static' ? stat : generated) ?? stat ?? generated ?? '');
    if (mac) nic.mac = mac;
    const networkName = get(`${p}.networkName`);
    const connectionType = get(`${p}.connectionType`);
    const vnet = get(`${p}.vnet`);
    const network = networkName ?? (connectionType === 'custom' ? vnet : connectionType) ?? vnet;
    if (network) nic.network = network;
    model.nics.push(nic);
  }

  model.snapshots = readSnapshots(join(dir, `${basename(path, extname(path))}.vmsd`), model.warnings);

  for (const [k, e] of entries) if (!used.has(k)) model.unmapped.push({ key: e.key, value: e.value });
  return model;
}

export const vmxReader: VmReader = {
  platform: 'vmware',
  detect(path, head) {
    const text = head.toString('latin1');
    const named = /\.vmtx?$/i.test(path);
    const keys = /^\s*(config\.version|virtualhw\.version|\.encoding|displayname|guestos|memsize)\s*=\s*"/im.test(text);
    if (named && keys) return 100;
    if (keys && !text.includes('\0') && /^\s*[\w.:]+\s*=\s*"/.test(text.replace(/^\s*#.*$/gm, '').trim())) return 70;
    return named ? 40 : 0;
  },
  read: (path, options) => readVmx(path, options),
};
