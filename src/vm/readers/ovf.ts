/**
 * OVF 1.x/2.x reader (.ovf beside its files, or an .ova read in place), as ovftool, vSphere and
 * VirtualBox write them: References, DiskSection, NetworkSection, the VirtualHardwareSection's
 * items by ResourceType, vmw:Config extras and the OperatingSystemSection. A manifest (.mf) is
 * checked against the files it lists before anything is trusted.
 */
import { readFileSync, statSync } from 'node:fs';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { XMLParser, XMLValidator } from 'fast-xml-parser';
import { CorruptImageError, ioError, MissingFileError, UnsupportedFeatureError } from '../../disk/errors.js';
import { resolveReference } from '../../disk/refs.js';
import { FileSource } from '../../disk/source.js';
import { parseManifest, verifyManifest } from '../../package/manifest.js';
import { looksLikeTar, openOva } from '../../package/ova.js';
import type { TarMember } from '../../package/tar.js';
import type { ReadVmOptions, VmReader } from '../dialect.js';
import {
  type DiskBus,
  type DiskController,
  emptyModel,
  type GuestHints,
  type NicModel,
  type ScsiModel,
  type StoredImage,
  type VmModel,
} from '../model.js';
import { vmwareGuestHints } from './vmx.js';

const MAX_OVF_BYTES = 64 * 1024 * 1024;

// biome-ignore lint/suspicious/noExplicitAny: parsed XML is untyped until checked field by field
type Node = any;

const ARRAYS = new Set([
  'File',
  'Disk',
  'Network',
  'VirtualSystem',
  'VirtualHardwareSection',
  'Item',
  'StorageItem',
  'EthernetPortItem',
  'Config',
  'ExtraConfig',
  'HostResource',
  'Connection',
]);

/** Text content of an element that may carry attributes. */
function text(v: Node): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (Array.isArray(v)) return text(v[0]);
  if (typeof v === 'object') return v['#text'] === undefined ? undefined : String(v['#text']).trim();
  return String(v).trim();
}

function list(v: Node): Node[] {
  if (v === undefined || v === null) return [];
  return Array.isArray(v) ? v : [v];
}

/** Bytes per unit of a DMTF programmatic unit ("byte * 2^20") or the older names ("MegaBytes"). */
export function allocationUnits(units: string | undefined, file: string): number {
  if (units === undefined || units.trim() === '') return 1;
  const u = units.replace(/\s+/g, ' ').trim();
  const m = /^byte(?: ?\* ?(\d+)(?: ?\^ ?(\d+))?)?$/i.exec(u);
  if (m) {
    const base = m[1] === undefined ? 1 : Number(m[1]);
    const exp = m[2] === undefined ? 1 : Number(m[2]);
    const v = base ** exp;
    if (Number.isSafeInteger(v) && v > 0) return v;
  }
  const named: Record<string, number> = {
    bytes: 1,
    b: 1,
    kilobytes: 1024,
    kb: 1024,
    megabytes: 2 ** 20,
    mb: 2 ** 20,
    gigabytes: 2 ** 30,
    gb: 2 ** 30,
    terabytes: 2 ** 40,
    tb: 2 ** 40,
  };
  const n = named[u.toLowerCase()];
  if (n) return n;
  throw new UnsupportedFeatureError(`allocation units '${units}' are not understood`, file);
}

const SCSI_SUBTYPES: Record<string, ScsiModel> = {
  lsilogic: 'lsilogic',
  lsilogicsas: 'lsisas1068',
  lsisas1068: 'lsisas1068',
  buslogic: 'buslogic',
  virtualscsi: 'pvscsi',
  pvscsi: 'pvscsi',
  'virtio-scsi': 'virtio-scsi',
};

const NIC_SUBTYPES: Record<string, NicModel> = {
  e1000: 'e1000',
  e1000e: 'e1000e',
  vmxnet3: 'vmxnet3',
  vmxnet2: 'vmxnet2',
  vmxnet: 'vmxnet2',
  pcnet32: 'pcnet',
  pcnet: 'pcnet',
  virtio: 'virtio',
  rtl8139: 'rtl8139',
};

/** CIM ResourceType numbers vmferry names in reports. */
const RESOURCE_NAMES: Record<number, string> = {
  1: 'other device',
  3: 'processor',
  4: 'memory',
  5: 'IDE controller',
  6: 'SCSI controller',
  10: 'ethernet adapter',
  14: 'floppy drive',
  15: 'CD drive',
  16: 'DVD drive',
  17: 'disk drive',
  20: 'storage controller',
  21: 'serial port',
  22: 'parallel port',
  23: 'USB controller',
  24: 'graphics controller',
  35: 'sound card',
};

/** A few CIM_OperatingSystem OsType values, for when the OVF has no description of its own. */
const CIM_OS: Record<number, GuestHints> = {
  1: { family: 'other', description: 'Other' },
  36: { family: 'linux', description: 'Linux', is64bit: false },
  42: { family: 'bsd', description: 'FreeBSD', is64bit: false },
  78: { family: 'bsd', description: 'FreeBSD 64-Bit', is64bit: true },
  93: { family: 'linux', description: 'Ubuntu', is64bit: false },
  94: { family: 'linux', description: 'Ubuntu 64-Bit', is64bit: true },
  95: { family: 'linux', description: 'Debian', is64bit: false },
  96: { family: 'linux', description: 'Debian 64-Bit', is64bit: true },
  101: { family: 'linux', description: 'Linux 64-Bit', is64bit: true },
  102: { family: 'other', description: 'Other 64-Bit', is64bit: true },
};

function formatFromUri(uri: string | undefined): string | undefined {
  if (!uri) return undefined;
  const u = uri.toLowerCase();
  if (u.includes('vmdk')) return 'vmdk';
  if (u.includes('qcow')) return 'qcow2';
  if (u.includes('vhdx')) return 'vhdx';
  if (u.includes('vhd')) return 'vpc';
  if (u.includes('vdi')) return 'vdi';
  if (u.includes('raw')) return 'raw';
  return undefined;
}

function normaliseMac(text: string | undefined): string | undefined {
  const hex = (text ?? '').replace(/[:-]/g, '').toLowerCase();
  if (!/^[0-9a-f]{12}$/.test(hex)) return undefined;
  return hex.match(/../g)!.join(':');
}

/** Parses OVF XML text into its Envelope element; bad XML is a one-line error. */
export function parseOvfXml(xml: string, file: string): Node {
  if (/<!DOCTYPE/i.test(xml)) throw new CorruptImageError('OVF descriptor has a DOCTYPE, which vmferry refuses', file);
  const valid = XMLValidator.validate(xml);
  if (valid !== true) {
    throw new CorruptImageError(`is not well-formed XML: ${valid.err.msg} (line ${valid.err.line})`, file);
  }
  const parser = new XMLParser({
    ignoreAttributes: false,
    attributeNamePrefix: '@',
    removeNSPrefix: true,
    parseTagValue: false,
    parseAttributeValue: false,
    trimValues: true,
    processEntities: true,
    htmlEntities: false,
    isArray: (name) => ARRAYS.has(name),
  });
  const doc = parser.parse(xml);
  const env = doc?.Envelope;
  if (!env || typeof env !== 'object') throw new CorruptImageError('is not an OVF descriptor (no Envelope element)', file);
  return env;
}

/** Where the descriptor's files are: next to an .ovf, or members of an .ova. */
interface FileLocator {
  /** The path of the named file, or undefined when it is missing; throws for unsafe names. */
  stored(href: string, compression: 'gzip' | undefined): { path: string; stored?: StoredImage } | undefined;
}

function folderLocator(ovfPath: string, options: ReadVmOptions): FileLocator {
  return {
    stored(href, compression) {
      let path: string;
      try {
        path = resolveReference(ovfPath, href, 'disk file', options);
      } catch (err) {
        if (err instanceof MissingFileError) return undefined;
        throw err;
      }
      if (!compression) return { path };
      return { path, stored: { file: path, offset: 0, size: statSync(path).size, compression } };
    },
  };
}

function archiveLocator(ovaPath: string, members: TarMember[]): FileLocator {
  return {
    stored(href, compression) {
      const m = members.find((x) => x.name === href);
      if (!m) return undefined;
      return {
        path: `${ovaPath}/${href}`,
        stored: { file: ovaPath, member: href, offset: m.offset, size: m.size, ...(compression ? { compression } : {}) },
      };
    },
  };
}

/** Builds the model from a parsed Envelope. `file` names the descriptor in messages. */
export function modelFromEnvelope(env: Node, file: string, locator: FileLocator, fallbackName: string): VmModel {
  const model = emptyModel(fallbackName, 'ovf');
  const unmapped = (key: string, value: string) => model.unmapped.push({ key, value });

  // References and disks.
  const files = new Map<string, Node>();
  for (const f of list(env.References?.File)) {
    const id = f['@id'];
    if (id) files.set(id, f);
  }
  const disks = new Map<string, Node>();
  for (const d of list(env.DiskSection?.Disk)) {
    const id = d['@diskId'];
    if (id) disks.set(id, d);
  }

  let systems = list(env.VirtualSystem);
  if (systems.length === 0 && env.VirtualSystemCollection) {
    systems = list(env.VirtualSystemCollection.VirtualSystem);
    if (systems.length > 1) {
      model.warnings.push(`the package holds ${systems.length} virtual systems; only the first is read`);
    }
  }
  const vs = systems[0];
  if (!vs) throw new CorruptImageError('OVF descriptor has no VirtualSystem', file);
  model.name = text(vs.Name) ?? vs['@id'] ?? fallbackName;

  // Guest OS.
  const os = vs.OperatingSystemSection;
  if (os) {
    const osType: string | undefined = os['@osType'];
    const cimId = Number(os['@id']);
    const description = text(os.Description);
    if (osType) model.guest = vmwareGuestHints(osType);
    else if (Number.isFinite(cimId) && CIM_OS[cimId]) model.guest = { ...CIM_OS[cimId], sourceId: String(cimId) };
    else if (Number.isFinite(cimId)) model.guest = { sourceId: String(cimId) };
    const vboxType = text(os.OSType);
    if (!osType && vboxType) {
      model.guest.sourceId = vboxType;
      model.guest.is64bit = /_64$/.test(vboxType);
      if (/^win/i.test(vboxType)) model.guest.family = 'windows';
      else if (/bsd/i.test(vboxType)) model.guest.family = 'bsd';
      else if (/linux|ubuntu|debian|fedora|redhat|oracle|suse|gentoo|arch|mandriva|turbolinux|xandros/i.test(vboxType))
        model.guest.family = 'linux';
    }
    if (description) model.guest.description = description;
  }

  // The hardware section: prefer a VMware one when there are several.
  const sections = list(vs.VirtualHardwareSection);
  if (sections.length === 0) throw new CorruptImageError('VirtualSystem has no VirtualHardwareSection', file);
  let hw = sections.find((s) => /vmx-/.test(text(s.System?.VirtualSystemType) ?? ''));
  if (!hw) {
    if (sections.length > 1) model.warnings.push('several hardware sections; the first is read');
    hw = sections[0];
  }
  const systemType = text(hw.System?.VirtualSystemType);
  if (systemType) {
    const vmx = /vmx-(\d+)/.exec(systemType);
    if (vmx) unmapped('virtualHW.version', String(Number(vmx[1])));
    unmapped('VirtualSystemType', systemType);
  }
  const uuid = text(hw.System?.VirtualSystemIdentifier);
  if (uuid && /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(uuid)) model.uuid = uuid.toLowerCase();

  const items = [...list(hw.Item), ...list(hw.StorageItem), ...list(hw.EthernetPortItem)];
  const controllers = new Map<string, DiskController>();
  const counters = new Map<string, number>();
  const newController = (bus: DiskBus, address: string | undefined, scsi?: ScsiModel): DiskController => {
    let n = address !== undefined && /^\d+$/.test(address) ? Number(address) : (counters.get(bus) ?? 0);
    while ([...controllers.values()].some((c) => c.id === `${bus}${n}`)) n++;
    counters.set(bus, n + 1);
    return { id: `${bus}${n}`, bus, ...(scsi ? { model: scsi } : {}) };
  };
  // Controllers first: devices name them by InstanceID.
  const byType = (item: Node) => Number(text(item.ResourceType));
  const ordered = [...items].sort((a, b) => {
    const ca = [5, 6, 20].includes(byType(a)) ? 0 : 1;
    const cb = [5, 6, 20].includes(byType(b)) ? 0 : 1;
    return ca - cb;
  });
  for (const item of ordered) {
    const type = byType(item);
    const instance = text(item.InstanceID) ?? '';
    const subtype = text(item.ResourceSubType);
    const name = text(item.ElementName) ?? RESOURCE_NAMES[type] ?? `ResourceType ${type}`;
    const parent = text(item.Parent);
    const unit = text(item.AddressOnParent);
    const unitNumber = unit !== undefined && /^\d+$/.test(unit) ? Number(unit) : undefined;
    const onController = () => {
      const c = parent !== undefined ? controllers.get(parent) : undefined;
      if (!c) model.warnings.push(`${name}: parent controller '${parent ?? '(none)'}' not found; assuming IDE`);
      return c;
    };
    for (const cfg of list(item.Config)) {
      if (cfg['@key'] !== undefined) unmapped(`${name}: vmw:${cfg['@key']}`, String(cfg['@value'] ?? ''));
    }
    switch (type) {
      case 3: {
        const n = Number(text(item.VirtualQuantity));
        if (Number.isSafeInteger(n) && n > 0) model.cpus = n;
        else model.warnings.push(`CPU count '${text(item.VirtualQuantity)}' is not a positive number; assuming 1`);
        const cores = Number(text(item.CoresPerSocket));
        if (Number.isSafeInteger(cores) && cores > 0) model.coresPerSocket = cores;
        break;
      }
      case 4: {
        const n = Number(text(item.VirtualQuantity));
        const bytes = n * allocationUnits(text(item.AllocationUnits) ?? 'byte * 2^20', file);
        if (Number.isSafeInteger(bytes) && bytes > 0) model.memory = bytes;
        else model.warnings.push(`memory '${text(item.VirtualQuantity)}' is not a positive size; assuming 1024 MiB`);
        break;
      }
      case 5:
        controllers.set(instance, newController('ide', text(item.Address)));
        if (subtype) unmapped(`${name}: ResourceSubType`, subtype);
        break;
      case 6: {
        const key = (subtype ?? '').toLowerCase();
        const scsi = SCSI_SUBTYPES[key] ?? 'unknown';
        if (scsi === 'unknown') model.warnings.push(`${name}: unknown SCSI controller type '${subtype ?? ''}'`);
        controllers.set(instance, newController('scsi', text(item.Address), scsi));
        break;
      }
      case 20: {
        const key = (subtype ?? '').toLowerCase();
        const bus: DiskBus = key.includes('nvme') ? 'nvme' : 'sata';
        if (!key.includes('nvme') && !key.includes('ahci') && !key.includes('sata')) {
          model.warnings.push(`${name}: storage controller '${subtype ?? ''}' read as SATA`);
        }
        controllers.set(instance, newController(bus, text(item.Address)));
        break;
      }
      case 17: {
        const c = onController();
        const host = text(item.HostResource) ?? '';
        const m = /^(?:ovf:)?\/(disk|file)\/(.+)$/.exec(host);
        if (!m) {
          model.warnings.push(`${name}: HostResource '${host}' names no disk; skipped`);
          break;
        }
        let fileRef: string | undefined;
        let capacity: number | undefined;
        let format: string | undefined;
        if (m[1] === 'disk') {
          const d = disks.get(m[2]!);
          if (!d) throw new CorruptImageError(`${name} names disk '${m[2]}', which the DiskSection does not define`, file);
          fileRef = d['@fileRef'];
          format = formatFromUri(d['@format']);
          const cap = Number(d['@capacity']);
          if (Number.isFinite(cap) && cap > 0) {
            capacity = cap * allocationUnits(d['@capacityAllocationUnits'], file);
            if (!Number.isSafeInteger(capacity)) throw new CorruptImageError(`disk '${m[2]}' capacity is out of range`, file);
          } else model.warnings.push(`disk '${m[2]}' capacity '${d['@capacity']}' is not a number`);
        } else fileRef = m[2];
        if (!fileRef) {
          model.warnings.push(`${name} is a blank disk with no file; skipped`);
          break;
        }
        const f = files.get(fileRef);
        if (!f) throw new CorruptImageError(`${name} names file '${fileRef}', which References does not list`, file);
        const href: string = f['@href'];
        if (!href) throw new CorruptImageError(`file '${fileRef}' has no href`, file);
        if (f['@chunkSize']) throw new UnsupportedFeatureError(`file '${href}' is split into chunks (chunkSize)`, file);
        const compression = f['@compression'];
        if (compression && compression !== 'gzip' && compression !== 'identity') {
          throw new UnsupportedFeatureError(`file '${href}' uses compression '${compression}'`, file);
        }
        const where = locator.stored(href, compression === 'gzip' ? 'gzip' : undefined);
        if (!where) throw new MissingFileError(`disk file '${href}' is missing from the package`, file);
        model.disks.push({
          path: where.path,
          ...(format ? { format } : {}),
          ...(capacity ? { capacity } : {}),
          bus: c?.bus ?? 'ide',
          ...(c ? { controller: c.id } : {}),
          ...(unitNumber !== undefined ? { unit: unitNumber } : {}),
          ...(where.stored ? { stored: where.stored } : {}),
        });
        break;
      }
      case 15:
      case 16: {
        const c = onController();
        const cd: VmModel['cdroms'][number] = { bus: c?.bus ?? 'ide' };
        if (c) cd.controller = c.id;
        if (unitNumber !== undefined) cd.unit = unitNumber;
        const host = /^(?:ovf:)?\/file\/(.+)$/.exec(text(item.HostResource) ?? '');
        const href = host ? files.get(host[1]!)?.['@href'] : undefined;
        if (href) cd.path = locator.stored(href, undefined)?.path ?? href;
        model.cdroms.push(cd);
        break;
      }
      case 10: {
        const key = (subtype ?? '').toLowerCase().replace(/^virtual/, '');
        const nic: VmModel['nics'][number] = { model: NIC_SUBTYPES[key] ?? 'unknown' };
        if (subtype) nic.sourceModel = subtype;
        const mac = normaliseMac(text(item.Address));
        if (mac) nic.mac = mac;
        const net = text(item.Connection);
        if (net) nic.network = net;
        model.nics.push(nic);
        break;
      }
      default:
        unmapped(`${RESOURCE_NAMES[type] ?? `ResourceType ${type}`}`, `${name}${subtype ? ` (${subtype})` : ''}`);
    }
  }
  model.controllers = [...controllers.values()].sort((a, b) => a.id.localeCompare(b.id));

  // vmw:Config and vmw:ExtraConfig at the hardware level.
  for (const cfg of [...list(hw.Config), ...list(hw.ExtraConfig)]) {
    const key: string | undefined = cfg['@key'];
    const value = String(cfg['@value'] ?? '');
    if (key === undefined) continue;
    if (key === 'firmware') model.firmware = value.toLowerCase() === 'efi' ? 'uefi' : 'bios';
    else if (key === 'bootOptions.efiSecureBootEnabled' || key === 'uefi.secureBoot.enabled')
      model.secureBoot = value.toLowerCase() === 'true';
    else unmapped(`vmw:${key}`, value);
  }
  // VirtualBox keeps its own settings in vbox:Machine; its firmware choice is the one we need.
  const vboxFirmware = vs.Machine?.Hardware?.Firmware?.['@type'];
  if (typeof vboxFirmware === 'string' && /efi/i.test(vboxFirmware)) model.firmware = 'uefi';
  if (vs.Machine) unmapped('vbox:Machine', 'VirtualBox settings present (not read beyond firmware)');

  // Networks the descriptor declares but no NIC uses, for the report.
  for (const n of list(env.NetworkSection?.Network)) {
    const name = n['@name'];
    if (name && !model.nics.some((x) => x.network === name)) unmapped('network', `${name} (no adapter connected)`);
  }
  return model;
}

function readOvfText(path: string): string {
  try {
    if (statSync(path).size > MAX_OVF_BYTES) throw new CorruptImageError('is too large to be an OVF descriptor', path);
    return readFileSync(path, 'utf8');
  } catch (err) {
    throw ioError(err, path);
  }
}

/** Reads an .ovf (with its files beside it) or an .ova (in place). */
export async function readOvf(path: string, options: ReadVmOptions = {}): Promise<VmModel> {
  const abs = resolve(path);
  const head = Buffer.alloc(512);
  const src = FileSource.open(abs);
  try {
    await src.read(0, Math.min(512, src.size), head);
  } finally {
    await src.close();
  }
  let model: VmModel;
  if (looksLikeTar(head)) {
    const ova = await openOva(abs);
    const env = parseOvfXml(ova.ovfText, `${abs}/${ova.ovf.name}`);
    model = modelFromEnvelope(env, `${abs}/${ova.ovf.name}`, archiveLocator(abs, ova.members), basename(abs, extname(abs)));
    if (!ova.manifest) model.warnings.push('the package has no manifest; its contents are not verified');
    else model.unmapped.push({ key: 'manifest', value: `${ova.manifest.name}: ${ova.verified.length} file(s) verified` });
    if (ova.certificate) model.warnings.push(`certificate ${ova.certificate.name} is not checked`);
  } else {
    const env = parseOvfXml(readOvfText(abs), abs);
    model = modelFromEnvelope(env, abs, folderLocator(abs, options), basename(abs, extname(abs)));
    const mf = join(dirname(abs), `${basename(abs, extname(abs))}.mf`);
    let manifestText: string | undefined;
    try {
      manifestText = readFileSync(mf, 'utf8');
    } catch {
      manifestText = undefined;
    }
    if (manifestText === undefined) model.warnings.push('no manifest beside the descriptor; its files are not verified');
    else {
      const verified = await verifyManifest(parseManifest(manifestText, mf), mf, (name) => {
        try {
          return FileSource.open(resolveReference(mf, name, 'manifest entry', options));
        } catch (err) {
          if (err instanceof MissingFileError) return undefined;
          throw err;
        }
      });
      model.unmapped.push({ key: 'manifest', value: `${basename(mf)}: ${verified.length} file(s) verified` });
    }
  }
  model.sourceFile = abs;
  if (options.name) model.name = options.name;
  return model;
}

export const ovfReader: VmReader = {
  platform: 'ovf',
  detect(path, head) {
    const t = head.toString('utf8', 0, Math.min(head.length, 16384));
    if (/Envelope[\s>]/.test(t) && /schemas\.dmtf\.org\/ovf\/envelope/.test(t)) return 100;
    if (looksLikeTar(head)) {
      const first = head.subarray(0, 100).toString('utf8').replace(/\0.*$/s, '');
      if (/\.ovf$/i.test(first)) return 100;
      if (/\.ova$/i.test(path)) return 60;
    }
    if (/\.(ovf|ova)$/i.test(path)) return 30;
    return 0;
  },
  read: (path, options) => readOvf(path, options),
};
