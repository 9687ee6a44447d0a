/**
 * Hyper-V VMs: an exported VM folder (Virtual Machines/<GUID>.vmcx, Virtual Hard Disks/*,
 * Snapshots/*.vmcx) or a lone .vmcx file. The binary configuration is decoded by vmcx.ts; here
 * its keys become the neutral model.
 *
 * Keys used (configuration/...):
 *   properties/name, properties/global_id, properties/subtype (0 = Generation 1, 1 = Generation 2)
 *   settings/processors/count, settings/memory/bank/size (MiB), .../dynamic_memory_enabled
 *   manifest/vdevNNN/{device,instance,name}: the virtual devices; each instance's settings are
 *   under _<instance>_/ (IDE and SCSI controllers: controllerN/driveN/{type,pathname};
 *   NICs: MacAddress, MacAddressIsStatic, SwitchName; firmware: secure_boot_enabled)
 */
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { CorruptImageError, ioError, MissingFileError, UnsupportedFeatureError } from '../../disk/errors.js';
import { resolveReference } from '../../disk/refs.js';
import type { ReadVmOptions, VmReader } from '../dialect.js';
import { type DiskBus, emptyModel, MiB, type NicModel, type VmModel, type VmSnapshot } from '../model.js';
import { isVmcx, KeyType, parseVmcx, type VmcxNode, vmcxGet } from './vmcx.js';
import { normalizeMac } from './xml.js';

/** Device class ids from the VMCX manifest (the same on every Hyper-V host). */
const DEVICE = {
  ideController: '83f8638b-8dca-4152-9eda-2ca8b33039b4',
  scsiController: 'd422512d-2bf2-4752-809d-7b82b5fcb1b4',
  syntheticNic: '2fc216b0-d2e2-4967-9b6d-b8a5c9ca2778',
  floppyController: '8f0d2762-0b00-4e04-af4f-19010527cb93',
  serialController: '8e3a359f-559a-4b6a-98a9-1690a6100ed7',
} as const;

const MAX_VMCX_SIZE = 64 * MiB;

function str(node: VmcxNode | undefined, path: string): string | undefined {
  const n = node ? vmcxGet(node, path) : undefined;
  if (!n || n.type === KeyType.Node) return undefined;
  if (typeof n.value === 'string') return n.value;
  if (typeof n.value === 'bigint' || typeof n.value === 'number' || typeof n.value === 'boolean') return String(n.value);
  return undefined;
}

function num(node: VmcxNode | undefined, path: string): number | undefined {
  const n = node ? vmcxGet(node, path) : undefined;
  if (!n) return undefined;
  if (typeof n.value === 'bigint') return n.value > BigInt(Number.MAX_SAFE_INTEGER) ? undefined : Number(n.value);
  if (typeof n.value === 'number') return n.value;
  return undefined;
}

function bool(node: VmcxNode | undefined, path: string): boolean | undefined {
  const n = node ? vmcxGet(node, path) : undefined;
  return typeof n?.value === 'boolean' ? n.value : undefined;
}

function readVmcxFile(path: string): VmcxNode {
  let buf: Buffer;
  try {
    const st = statSync(path);
    if (!st.isFile()) throw new CorruptImageError('is not a file', path);
    if (st.size > MAX_VMCX_SIZE) throw new CorruptImageError(`is ${st.size} bytes, far larger than any VMCX configuration`, path);
    buf = readFileSync(path);
  } catch (err) {
    throw ioError(err, path);
  }
  if (!isVmcx(buf)) throw new CorruptImageError('not a Hyper-V VMCX file (bad signature)', path);
  const file = parseVmcx(buf, path);
  const config = file.root.children.get('configuration');
  if (!config) throw new CorruptImageError('VMCX file holds no configuration tree', path);
  return config;
}

/** The .vmcx of an exported VM folder (or the file itself), and the folder disks are looked for in. */
function findVmcx(path: string): { vmcx: string; exportRoot?: string } {
  let st: ReturnType<typeof statSync>;
  try {
    st = statSync(path);
  } catch (err) {
    throw ioError(err, path);
  }
  if (st.isFile()) {
    const parent = dirname(resolve(path));
    const root = basename(parent).toLowerCase() === 'virtual machines' ? dirname(parent) : undefined;
    return { vmcx: path, exportRoot: root };
  }
  const vmDir = readdirSync(path).find((n) => n.toLowerCase() === 'virtual machines');
  const folder = vmDir ? join(path, vmDir) : path;
  const found = readdirSync(folder).filter((n) => /\.vmcx$/i.test(n));
  if (found.length === 0)
    throw new MissingFileError('no .vmcx file in the folder (expected "Virtual Machines/<GUID>.vmcx")', path);
  if (found.length > 1) {
    throw new UnsupportedFeatureError(
      `the folder holds ${found.length} VM configurations (${found.join(', ')}); name one .vmcx file`,
      folder,
    );
  }
  return { vmcx: join(folder, found[0]!), exportRoot: vmDir ? path : undefined };
}

/** A Windows path stored in the VMCX -> the file in the export (Virtual Hard Disks/NAME), else a warning. */
function locateDisk(
  vmcx: string,
  exportRoot: string | undefined,
  winPath: string,
  options: ReadVmOptions,
  warnings: string[],
): string {
  const name = winPath.split(/[\\/]/).pop() ?? winPath;
  const candidates: { base: string; ref: string }[] = [];
  if (exportRoot) {
    const vhdDir = existsSync(exportRoot)
      ? readdirSync(exportRoot).find((n) => n.toLowerCase() === 'virtual hard disks')
      : undefined;
    if (vhdDir) candidates.push({ base: join(exportRoot, 'descriptor'), ref: `${vhdDir}/${name}` });
  }
  candidates.push({ base: vmcx, ref: name });
  for (const c of candidates) {
    try {
      // The reference is resolved relative to `base`'s folder, inside it only.
      return resolveReference(c.base, c.ref, 'disk', { allowExternalFiles: options.allowExternalFiles });
    } catch (err) {
      if (!(err instanceof MissingFileError)) throw err;
    }
  }
  warnings.push(`disk '${winPath}' not found in the export (looked for '${name}' in "Virtual Hard Disks" and next to the .vmcx)`);
  return winPath;
}

function formatOf(path: string): string | undefined {
  if (/\.a?vhdx$/i.test(path)) return 'vhdx';
  if (/\.a?vhd$/i.test(path)) return 'vpc';
  return undefined;
}

export async function readHyperv(path: string, options: ReadVmOptions = {}): Promise<VmModel> {
  const { vmcx, exportRoot } = findVmcx(path);
  const config = readVmcxFile(vmcx);
  const name = str(config, 'properties/name') || basename(vmcx).replace(/\.vmcx$/i, '');
  const model = emptyModel(name, 'hyperv');
  model.sourceFile = resolve(vmcx);
  const id = str(config, 'properties/global_id');
  if (id) model.uuid = id.toLowerCase();
  const subtype = num(config, 'properties/subtype');
  model.generation = subtype === 1 ? 2 : 1;
  model.firmware = model.generation === 2 ? 'uefi' : 'bios';
  const version = num(config, 'properties/version');
  if (version !== undefined) model.unmapped.push({ key: 'configuration.version', value: `${version >> 8}.${version & 0xff}` });

  const cpus = num(config, 'settings/processors/count') ?? 1;
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > 2048) throw new CorruptImageError(`bad processor count ${cpus}`, vmcx);
  model.cpus = cpus;
  const memMiB = num(config, 'settings/memory/bank/size') ?? 1024;
  if (!Number.isInteger(memMiB) || memMiB < 1 || memMiB > 256 * 1024 * 1024)
    throw new CorruptImageError(`bad memory size ${memMiB} MiB`, vmcx);
  model.memory = memMiB * MiB;
  if (bool(config, 'settings/memory/bank/dynamic_memory_enabled')) {
    model.unmapped.push({
      key: 'memory.dynamic',
      value: `dynamic memory ${num(config, 'settings/memory/bank/reservation') ?? '?'}..${num(config, 'settings/memory/bank/limit') ?? '?'} MiB (startup ${memMiB} MiB is used)`,
    });
  }
  if (bool(config, 'settings/processors/nested_virtualization/enabled'))
    model.unmapped.push({ key: 'cpu.nested', value: 'nested virtualization' });

  // The manifest lists every virtual device: class id (device), instance id, name.
  const manifest = vmcxGet(config, 'manifest');
  const devices: { device: string; instance: string; name: string }[] = [];
  for (const entry of manifest?.children.values() ?? []) {
    if (entry.type !== KeyType.Node) continue;
    const device = str(entry, 'device')?.toLowerCase();
    const instance = str(entry, 'instance')?.toLowerCase();
    if (device && instance) devices.push({ device, instance, name: str(entry, 'name') ?? device });
  }
  const settingsOf = (instance: string): VmcxNode | undefined => {
    for (const [key, node] of config.children) if (key.toLowerCase() === `_${instance}_`) return node;
    return undefined;
  };

  // Secure boot lives with the firmware device (Virtual BIOS on Gen1, the UEFI device on Gen2).
  for (const d of devices) {
    const s = settingsOf(d.instance);
    const sb = bool(s, 'secure_boot_enabled');
    if (sb !== undefined && model.generation === 2) model.secureBoot = sb;
    const template = str(s, 'secure_boot_template_id');
    if (sb && template && !/^0{8}-/.test(template)) model.unmapped.push({ key: 'secureboot.template', value: template });
  }

  // Controllers and drives.
  let scsiN = 0;
  for (const d of devices) {
    const isIde = d.device === DEVICE.ideController;
    const isScsi = d.device === DEVICE.scsiController;
    if (!isIde && !isScsi) continue;
    const s = settingsOf(d.instance);
    if (!s) continue;
    const bus: DiskBus = isIde ? 'ide' : 'scsi';
    for (const [ctlKey, ctlNode] of s.children) {
      const ctlMatch = /^controller(\d+)$/.exec(ctlKey);
      if (!ctlMatch || ctlNode.type !== KeyType.Node) continue;
      // IDE: controllerN is a channel (two drives); SCSI: one synthetic controller per instance.
      const ctlId = isIde ? `ide${Number(ctlMatch[1])}` : `scsi${scsiN}`;
      let declared = false;
      const declare = () => {
        if (declared) return;
        declared = true;
        if (!model.controllers.some((c) => c.id === ctlId)) {
          model.controllers.push(isIde ? { id: ctlId, bus } : { id: ctlId, bus, model: 'hyperv-scsi' });
        }
      };
      const drives = [...ctlNode.children.entries()]
        .map(([k, v]) => ({ m: /^drive(\d+)$/.exec(k), v }))
        .filter((x) => x.m && x.v.type === KeyType.Node)
        .sort((a, b) => Number(a.m![1]) - Number(b.m![1]));
      for (const { m, v } of drives) {
        const unit = Number(m![1]);
        const type = (str(v, 'type') ?? 'NONE').toUpperCase();
        const pathname = str(v, 'pathname') ?? '';
        if (type === 'VHD') {
          declare();
          const diskPath = pathname ? locateDisk(vmcx, exportRoot, pathname, options, model.warnings) : '';
          if (!pathname) {
            model.warnings.push(`${ctlId} drive ${unit} is a hard drive with no file; skipped`);
            continue;
          }
          const notes = [`Hyper-V ${isIde ? 'IDE' : 'SCSI'} controller ${ctlMatch[1]} location ${unit}: ${pathname}`];
          if (/\.avhdx?$/i.test(pathname))
            notes.push('checkpoint differencing disk (.avhdx): its parent chain is read through the VHDX parent locator');
          const disk: VmModel['disks'][number] = { path: diskPath, bus, controller: ctlId, unit, notes };
          const fmt = formatOf(pathname);
          if (fmt) disk.format = fmt;
          model.disks.push(disk);
        } else if (type === 'ISO') {
          declare();
          const cd: VmModel['cdroms'][number] = { bus, controller: ctlId, unit };
          if (pathname) cd.path = pathname;
          model.cdroms.push(cd);
        } else if (type === 'PASSTHRU' || type === 'PHYSICAL') {
          model.warnings.push(`${ctlId} drive ${unit} is a pass-through physical disk; it cannot be migrated`);
          model.unmapped.push({ key: `storage.${ctlId}.${unit}`, value: 'physical pass-through disk' });
        }
      }
    }
    if (isScsi) scsiN++;
  }

  // Boot order (Gen1: the BIOS device list; Gen2 keeps a boot entry list, reported only).
  const bootDevs: string[] = [];
  for (const d of devices) {
    const s = settingsOf(d.instance);
    const boot = s ? vmcxGet(s, 'boot') : undefined;
    if (!boot) continue;
    for (const [k, v] of boot.children) if (/^device\d+$/.test(k) && typeof v.value === 'string') bootDevs.push(v.value);
  }
  if (bootDevs.length > 0) {
    model.unmapped.push({ key: 'boot.order', value: bootDevs.join(',') });
    const hdPos = bootDevs.indexOf('HardDrive');
    const firstBootable = model.disks.find((disk) => disk.bus === 'ide') ?? model.disks[0];
    if (hdPos >= 0 && firstBootable) firstBootable.bootOrder = 1;
  } else if (model.disks[0]) {
    model.disks[0].bootOrder = 1;
  }

  // Network adapters.
  for (const d of devices) {
    const synthetic = d.device === DEVICE.syntheticNic;
    const legacy = /emulated ethernet|legacy network/i.test(d.name);
    if (!synthetic && !legacy) continue;
    const s = settingsOf(d.instance);
    const model_: NicModel = synthetic ? 'hyperv' : 'unknown';
    const nic: VmModel['nics'][number] = {
      model: model_,
      sourceModel: synthetic ? 'Hyper-V synthetic network adapter' : 'Hyper-V legacy network adapter (DEC 21140)',
    };
    // A dynamic adapter that never ran holds 00-00-00-00-00-00: no MAC to carry.
    const mac = normalizeMac(str(s, 'MacAddress'));
    if (mac && mac !== '00:00:00:00:00:00') nic.mac = mac;
    if (bool(s, 'MacAddressIsStatic') === false) nic.sourceModel += ', dynamic MAC';
    const sw = str(s, 'SwitchName') || str(s, 'Connection/AltSwitchName');
    if (sw) nic.network = sw;
    model.nics.push(nic);
  }

  // Devices without a neutral field.
  for (const d of devices) {
    const s = settingsOf(d.instance);
    if (d.device === DEVICE.floppyController) {
      const vfd = str(s, 'controller0/drive0/pathname');
      if (vfd) model.unmapped.push({ key: 'floppy', value: vfd });
    } else if (d.device === DEVICE.serialController) {
      for (const port of ['port0', 'port1']) {
        const conn = str(s, `${port}/connection`);
        if (conn) model.unmapped.push({ key: `serial.${port}`, value: conn });
      }
    }
  }
  model.guest = {};

  // Checkpoints: an export keeps them as Snapshots/<GUID>.vmcx.
  if (exportRoot) {
    const snapDir = readdirSync(exportRoot).find((n) => n.toLowerCase() === 'snapshots');
    if (snapDir) {
      for (const f of readdirSync(join(exportRoot, snapDir)).filter((n) => /\.vmcx$/i.test(n))) {
        const snapPath = join(exportRoot, snapDir, f);
        try {
          const sc = readVmcxFile(snapPath);
          const snap: VmSnapshot = {
            id: (str(sc, 'properties/global_id') ?? f.replace(/\.vmcx$/i, '')).toLowerCase(),
            name: str(sc, 'properties/name') ?? f,
          };
          const parent = str(sc, 'properties/parent_id') ?? str(sc, 'settings/parent_snapshot_id');
          if (parent) snap.parent = parent.toLowerCase();
          model.snapshots.push(snap);
        } catch (err) {
          model.warnings.push(`checkpoint ${f} could not be read: ${(err as Error).message}`);
        }
      }
    }
  }
  return model;
}

export const hypervReader: VmReader = {
  platform: 'hyperv',
  detect(path, head) {
    if (isVmcx(head)) return 100;
    try {
      if (statSync(path).isDirectory()) {
        const vmDir = readdirSync(path).find((n) => n.toLowerCase() === 'virtual machines');
        if (vmDir && readdirSync(join(path, vmDir)).some((n) => /\.vmcx$/i.test(n))) return 90;
        if (readdirSync(path).some((n) => /\.vmcx$/i.test(n))) return 80;
      }
    } catch {
      return 0;
    }
    return 0;
  },
  read: (path, options) => readHyperv(path, options),
};
