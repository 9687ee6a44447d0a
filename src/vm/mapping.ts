/**
 * Device translation: maps a neutral model onto what one target platform supports. Every change
 * (firmware, bus, controller model, NIC model, memory rounding) and every device the target cannot
 * hold (floppy, serial, parallel, USB, sound, an ISO that is not carried) becomes a TranslationNote,
 * so the migrate report can list it: nothing disappears silently.
 */
import { UnsupportedFeatureError, UsageError } from '../disk/errors.js';
import type { MappedVm, TargetProfile } from './dialect.js';
import type { DiskBus, DiskController, Firmware, NicModel, ScsiModel, TranslationNote, VmModel } from './model.js';

export interface MappingOverrides {
  /** --disk-bus: every disk goes on this bus. */
  diskBus?: string;
  /** --nic-model: every NIC gets this model. */
  nicModel?: string;
  /** Force the firmware (e.g. accept a UEFI VM onto a BIOS-only target, knowing it will not boot as is). */
  firmware?: Firmware;
}

/** What a target supports and what it prefers when a source device must change. */
export interface TargetCapabilities {
  firmware: readonly Firmware[];
  diskBuses: readonly DiskBus[];
  scsiModels: readonly ScsiModel[];
  nicModels: readonly NicModel[];
  /** First supported entry wins when a source SCSI controller model must change. */
  scsiPreference: readonly ScsiModel[];
  /** First supported entry wins when a source NIC model must change. */
  nicPreference: readonly NicModel[];
  /** First supported entry wins when a source bus must change. */
  busPreference: readonly DiskBus[];
  /** KVM-family targets (virtio is native there). */
  kvm: boolean;
  /**
   * Models the target can emulate but that are never chosen automatically: another hypervisor's
   * paravirtual devices (QEMU's vmxnet3 or pvscsi emulation is not the supported path on KVM).
   * --nic-model can still ask for them.
   */
  avoid?: readonly string[];
}

const KVM: TargetCapabilities = {
  firmware: ['bios', 'uefi'],
  diskBuses: ['virtio', 'scsi', 'sata', 'ide'],
  scsiModels: ['virtio-scsi', 'lsilogic', 'lsisas1068'],
  nicModels: ['virtio', 'e1000', 'e1000e', 'rtl8139', 'vmxnet3'],
  scsiPreference: ['virtio-scsi', 'lsilogic'],
  nicPreference: ['virtio', 'e1000'],
  busPreference: ['scsi', 'sata', 'virtio', 'ide'],
  kvm: true,
  avoid: ['vmxnet3', 'vmxnet2', 'pvscsi', 'hyperv', 'hyperv-scsi'],
};

const VMWARE: TargetCapabilities = {
  firmware: ['bios', 'uefi'],
  diskBuses: ['scsi', 'sata', 'nvme', 'ide'],
  scsiModels: ['lsilogic', 'lsisas1068', 'buslogic', 'pvscsi'],
  nicModels: ['e1000', 'e1000e', 'vmxnet3'],
  scsiPreference: ['lsilogic', 'pvscsi', 'lsisas1068'],
  nicPreference: ['vmxnet3', 'e1000e', 'e1000'],
  busPreference: ['scsi', 'sata', 'ide'],
  kvm: false,
};

/** Built-in knowledge per target, used where a writer's profile leaves a list empty. */
const HYPERV: TargetCapabilities = {
  firmware: ['bios', 'uefi'],
  diskBuses: ['ide', 'scsi'],
  scsiModels: ['hyperv-scsi'],
  nicModels: ['hyperv'],
  scsiPreference: ['hyperv-scsi'],
  nicPreference: ['hyperv'],
  busPreference: ['scsi', 'ide'],
  kvm: false,
};

export const TARGET_CAPABILITIES: Record<string, TargetCapabilities> = {
  libvirt: KVM,
  qemu: KVM,
  proxmox: KVM,
  vmware: VMWARE,
  ova: VMWARE,
  virtualbox: {
    firmware: ['bios', 'uefi'],
    diskBuses: ['sata', 'scsi', 'ide', 'nvme', 'virtio'],
    scsiModels: ['lsilogic', 'lsisas1068', 'buslogic', 'virtio-scsi'],
    nicModels: ['e1000', 'pcnet', 'virtio'],
    scsiPreference: ['lsilogic', 'lsisas1068'],
    nicPreference: ['e1000', 'virtio'],
    busPreference: ['sata', 'scsi', 'ide'],
    kvm: false,
  },
  hyperv: HYPERV,
  // Azure runs Hyper-V: the same devices.
  azure: HYPERV,
};

const GENERIC: TargetCapabilities = KVM;

/** The target's capabilities: its profile's lists where set, the built-in table for the rest. */
export function capabilitiesOf(profile: TargetProfile): TargetCapabilities {
  const base = TARGET_CAPABILITIES[profile.target] ?? GENERIC;
  const pick = <T>(fromProfile: readonly string[], fallback: readonly T[]): readonly T[] =>
    fromProfile.length > 0 ? (fromProfile as unknown as readonly T[]) : fallback;
  return {
    ...base,
    firmware: pick(profile.firmware, base.firmware),
    diskBuses: pick(profile.diskBuses, base.diskBuses),
    scsiModels: pick(profile.scsiModels, base.scsiModels),
    nicModels: pick(profile.nicModels, base.nicModels),
  };
}

const BUSES: readonly DiskBus[] = ['ide', 'sata', 'scsi', 'nvme', 'virtio'];
const NIC_MODELS: readonly NicModel[] = ['e1000', 'e1000e', 'vmxnet3', 'vmxnet2', 'pcnet', 'rtl8139', 'virtio', 'hyperv'];

/** Devices found among the source's unmapped settings that no target here can carry. */
const DROPPABLE: { kind: string; pattern: RegExp }[] = [
  { kind: 'floppy drive', pattern: /^(floppy\d*|fdc\d*|fd\d+)\b|\bfloppy\b/i },
  { kind: 'serial port', pattern: /^(serial\d*|com\d+)\b|\bserial ?port\b|\buart\b/i },
  { kind: 'parallel port', pattern: /^(parallel\d*|lpt\d+)\b|\bparallel ?port\b/i },
  { kind: 'USB controller', pattern: /^(usb[\w-]*|ehci\d*|xhci\d*)\b|\busb\b/i },
  { kind: 'sound card', pattern: /^(sound\d*|audio\d*|hdaudio\d*|sb16)\b|\bsound ?card\b|\baudio ?adapter\b/i },
];

const FALSY = /^(false|no|0|off|disabled|"false")$/i;

/** The device instance a setting belongs to: 'floppy0' for 'floppy0.present', the key itself otherwise. */
function deviceInstance(key: string): string {
  return key.split(/[.:/[]/)[0]!.toLowerCase();
}

/**
 * Finds devices among `model.unmapped`: every setting group (floppy0.*, sound.*, usb.*, ...) whose
 * `.present` (when it has one) is not false. Returns one entry per device instance.
 */
export function droppedDevices(model: VmModel): { kind: string; instance: string; settings: string[] }[] {
  const found = new Map<string, { kind: string; instance: string; settings: string[]; absent: boolean }>();
  for (const { key, value } of model.unmapped) {
    const text = `${key} ${value}`;
    // A value names a device only under a key that describes hardware (an OVF Item, a device list).
    const valueCounts = /item|device|resource|hardware|controller/i.test(key);
    const byKey = DROPPABLE.find((d) => d.pattern.test(key));
    const hit = byKey ?? (valueCounts ? DROPPABLE.find((d) => d.pattern.test(value)) : undefined);
    if (!hit) continue;
    const instance = byKey ? deviceInstance(key) : `${key}=${value}`;
    let entry = found.get(instance);
    if (!entry) {
      entry = { kind: hit.kind, instance, settings: [], absent: false };
      found.set(instance, entry);
    }
    entry.settings.push(text.trim());
    if (/\.present$/i.test(key) && FALSY.test(value.trim())) entry.absent = true;
  }
  return [...found.values()].filter((e) => !e.absent).map(({ absent: _a, ...rest }) => rest);
}

function describeController(model: VmModel, id: string | undefined, bus: DiskBus): string {
  const c = id ? model.controllers.find((x) => x.id === id) : undefined;
  return c?.model ? `${bus} (${c.model})` : bus;
}

/** Maps `source` onto `profile`; the source model is not modified. */
export function mapModel(source: VmModel, profile: TargetProfile, overrides: MappingOverrides = {}): MappedVm {
  const caps = capabilitiesOf(profile);
  const model: VmModel = structuredClone(source);
  const notes: TranslationNote[] = [];
  const note = (from: string, to: string, why: string) => notes.push({ from, to, why });
  const windows = model.guest.family === 'windows';

  // --- overrides are checked first: a bad value is the user's error, before any work
  if (overrides.diskBus !== undefined) {
    if (!BUSES.includes(overrides.diskBus as DiskBus)) {
      throw new UsageError(`--disk-bus must be one of ${BUSES.join(', ')}, not '${overrides.diskBus}'`);
    }
    if (!caps.diskBuses.includes(overrides.diskBus as DiskBus)) {
      throw new UsageError(
        `--disk-bus ${overrides.diskBus} is not supported by target ${profile.target} (it supports ${caps.diskBuses.join(', ')})`,
      );
    }
  }
  if (overrides.nicModel !== undefined) {
    if (!NIC_MODELS.includes(overrides.nicModel as NicModel)) {
      throw new UsageError(`--nic-model must be one of ${NIC_MODELS.join(', ')}, not '${overrides.nicModel}'`);
    }
    if (!caps.nicModels.includes(overrides.nicModel as NicModel)) {
      throw new UsageError(
        `--nic-model ${overrides.nicModel} is not supported by target ${profile.target} (it supports ${caps.nicModels.join(', ')})`,
      );
    }
  }

  // --- firmware
  if (model.generation === 2 && model.firmware !== 'uefi') {
    note('firmware bios', 'uefi', 'a Hyper-V Generation 2 VM always boots with UEFI');
    model.firmware = 'uefi';
  }
  if (overrides.firmware && overrides.firmware !== model.firmware) {
    note(`firmware ${model.firmware}`, overrides.firmware, 'forced by the user; the guest may not boot without repair');
    model.firmware = overrides.firmware;
  }
  if (!caps.firmware.includes(model.firmware)) {
    throw new UnsupportedFeatureError(
      `the VM boots with ${model.firmware.toUpperCase()} but target ${profile.target} supports only ${caps.firmware.join(', ')}; the guest would not boot`,
      source.sourceFile,
    );
  }
  if (model.secureBoot && model.firmware !== 'uefi') {
    note('secure boot', 'dropped', 'secure boot needs UEFI firmware');
    model.secureBoot = false;
  }

  // --- Hyper-V and Azure: the generation follows the firmware, and decides the buses
  const hyperv = profile.target === 'hyperv' || profile.target === 'azure';
  let allowedBuses: readonly DiskBus[] = caps.diskBuses;
  if (hyperv) {
    const generation = model.firmware === 'uefi' ? 2 : 1;
    if (model.generation !== generation) {
      note(
        model.generation ? `Hyper-V Generation ${model.generation}` : `firmware ${model.firmware}`,
        `Generation ${generation}`,
        generation === 2 ? 'UEFI firmware needs a Generation 2 VM (SCSI disks only)' : 'BIOS firmware needs a Generation 1 VM',
      );
    }
    model.generation = generation;
    if (generation === 2) allowedBuses = allowedBuses.filter((b) => b !== 'ide');
  }

  // --- disks and CD-ROMs: choose each one's bus and controller model
  const keepable = (m: string) => !(caps.avoid ?? []).includes(m);
  const scsiModelFor = (sourceModel: ScsiModel | undefined): ScsiModel => {
    if (sourceModel && caps.scsiModels.includes(sourceModel) && keepable(sourceModel)) return sourceModel;
    return caps.scsiPreference.find((m) => caps.scsiModels.includes(m)) ?? caps.scsiModels[0] ?? 'unknown';
  };
  const busFor = (bus: DiskBus, isBootDisk: boolean): DiskBus => {
    if (overrides.diskBus) return overrides.diskBus as DiskBus;
    if (hyperv && model.generation === 1) {
      // Generation 1 boots only from IDE; data disks go on SCSI.
      return isBootDisk ? 'ide' : allowedBuses.includes(bus) ? bus : 'scsi';
    }
    if (allowedBuses.includes(bus)) return bus;
    return caps.busPreference.find((b) => allowedBuses.includes(b)) ?? allowedBuses[0] ?? bus;
  };

  type Slot = { kind: 'disk' | 'cdrom'; index: number; bus: DiskBus; scsiModel?: ScsiModel; sourceController?: string };
  const slots: Slot[] = [];
  const bootIndex = bootDiskIndex(model);
  model.disks.forEach((disk, index) => {
    const srcCtl = disk.controller ? model.controllers.find((c) => c.id === disk.controller) : undefined;
    const from = `disk${index} on ${describeController(model, disk.controller, disk.bus)}`;
    const bus = busFor(disk.bus, index === bootIndex);
    const scsiModel = bus === 'scsi' ? scsiModelFor(disk.bus === 'scsi' ? srcCtl?.model : undefined) : undefined;
    const to = scsiModel ? `scsi (${scsiModel})` : bus;
    if (bus !== disk.bus || (scsiModel && scsiModel !== srcCtl?.model)) {
      note(from, to, diskWhy(disk.bus, srcCtl?.model, bus, scsiModel, overrides.diskBus !== undefined, profile.target, windows));
    }
    slots.push({ kind: 'disk', index, bus, scsiModel, sourceController: disk.controller });
  });
  model.cdroms.forEach((cd, index) => {
    const srcCtl = cd.controller ? model.controllers.find((c) => c.id === cd.controller) : undefined;
    // CD-ROMs never go on virtio-blk or NVMe: those cannot hold removable media.
    let bus: DiskBus = cd.bus;
    const cdBuses: DiskBus[] = allowedBuses.filter((b) => b !== 'virtio' && b !== 'nvme');
    if (hyperv && model.generation === 1) bus = 'ide';
    else if (!cdBuses.includes(bus)) bus = (['sata', 'ide', 'scsi'] as DiskBus[]).find((b) => cdBuses.includes(b)) ?? bus;
    const scsiModel = bus === 'scsi' ? scsiModelFor(cd.bus === 'scsi' ? srcCtl?.model : undefined) : undefined;
    if (bus !== cd.bus) {
      note(
        `cdrom${index} on ${describeController(model, cd.controller, cd.bus)}`,
        bus,
        `target ${profile.target} has no ${cd.bus} CD-ROM`,
      );
    }
    if (cd.path) {
      note(`cdrom${index} ISO ${cd.path}`, 'empty drive', 'ISO images are not copied by migrate; insert it again on the target');
      cd.path = undefined;
    }
    slots.push({ kind: 'cdrom', index, bus, scsiModel, sourceController: cd.controller });
  });

  // --- controllers: keep a source controller when its devices stay on it unchanged; otherwise build
  // new ones, reusing a freed source id (scsi0 pvscsi -> scsi0 virtio-scsi) so names stay familiar.
  const sourceCtl = (slot: Slot) =>
    slot.sourceController ? model.controllers.find((c) => c.id === slot.sourceController) : undefined;
  const keeps = (slot: Slot, c: DiskController | undefined): boolean =>
    c !== undefined && c.bus === slot.bus && (slot.bus !== 'scsi' || c.model === slot.scsiModel);
  const keptIds = new Set(slots.filter((s) => keeps(s, sourceCtl(s))).map((s) => s.sourceController!));
  const controllers: DiskController[] = [];
  const used = new Map<string, Set<number>>();
  const capacity = (bus: DiskBus) => unitLimit(bus) - (bus === 'scsi' ? 1 : 0);
  const takeUnit = (ctl: string, bus: DiskBus, wanted: number | undefined): number => {
    const set = used.get(ctl) ?? new Set<number>();
    used.set(ctl, set);
    const reserved = bus === 'scsi' ? 7 : -1;
    if (wanted !== undefined && !set.has(wanted) && wanted !== reserved && wanted >= 0 && wanted < unitLimit(bus)) {
      set.add(wanted);
      return wanted;
    }
    let u = 0;
    while (set.has(u) || u === reserved) u++;
    set.add(u);
    return u;
  };
  const controllerFor = (slot: Slot): string | undefined => {
    if (slot.bus === 'virtio') return undefined;
    const src = sourceCtl(slot);
    if (src && keeps(slot, src)) {
      if (!controllers.some((c) => c.id === src.id)) controllers.push({ ...src });
      return src.id;
    }
    const existing = controllers.find(
      (c) => !keptIds.has(c.id) && c.bus === slot.bus && (slot.bus !== 'scsi' || c.model === slot.scsiModel),
    );
    if (existing && (used.get(existing.id)?.size ?? 0) < capacity(slot.bus)) return existing.id;
    const free = (id: string) => !controllers.some((c) => c.id === id) && !keptIds.has(id);
    let id = src && free(src.id) && src.bus === slot.bus ? src.id : undefined;
    for (let n = 0; id === undefined; n++) if (free(`${slot.bus}${n}`)) id = `${slot.bus}${n}`;
    const ctl: DiskController = { id, bus: slot.bus };
    if (slot.bus === 'scsi') ctl.model = slot.scsiModel;
    controllers.push(ctl);
    return ctl.id;
  };
  for (const slot of slots) {
    const dev = slot.kind === 'disk' ? model.disks[slot.index]! : model.cdroms[slot.index]!;
    const ctl = controllerFor(slot);
    dev.bus = slot.bus;
    dev.controller = ctl;
    dev.unit = ctl === undefined ? undefined : takeUnit(ctl, slot.bus, dev.unit);
  }
  const describe = (c: DiskController) => (c.model ? `${c.bus}, ${c.model}` : c.bus);
  for (const c of model.controllers) {
    const now = controllers.find((k) => k.id === c.id);
    if (now && now.bus === c.bus && now.model === c.model) continue;
    const used = slots.some((s) => s.sourceController === c.id);
    note(
      `controller ${c.id} (${describe(c)})`,
      now ? `${now.id} (${describe(now)})` : 'dropped',
      now
        ? 'replaced: the target has no such controller'
        : used
          ? 'its devices moved to another controller'
          : 'no device uses it',
    );
  }
  model.controllers = controllers;

  // --- NICs
  model.nics.forEach((nic, index) => {
    const from = `nic${index} ${nic.sourceModel && nic.sourceModel !== nic.model ? `${nic.model} (${nic.sourceModel})` : nic.model}`;
    let to: NicModel;
    let why: string;
    if (overrides.nicModel) {
      to = overrides.nicModel as NicModel;
      why = 'chosen with --nic-model';
    } else if (caps.nicModels.includes(nic.model) && keepable(nic.model)) {
      return;
    } else {
      to = caps.nicPreference.find((m) => caps.nicModels.includes(m)) ?? caps.nicModels[0] ?? 'e1000';
      why = caps.nicModels.includes(nic.model)
        ? `${nic.model} is another hypervisor's paravirtual adapter; ${profile.target} uses its own`
        : `target ${profile.target} has no ${nic.model} adapter`;
      if (to === 'virtio' && windows) why += '; a Windows guest needs the virtio-win network driver';
      if (to === 'vmxnet3' && windows) why += '; a Windows guest needs VMware Tools for vmxnet3';
    }
    if (to !== nic.model) note(from, to, why);
    nic.model = to;
  });

  // --- memory and CPU topology the target can express
  if (hyperv && model.memory % (2 * 1024 * 1024) !== 0) {
    const rounded = Math.ceil(model.memory / (2 * 1024 * 1024)) * 2 * 1024 * 1024;
    note(`memory ${model.memory} bytes`, `${rounded} bytes`, 'Hyper-V memory is set in multiples of 2 MiB');
    model.memory = rounded;
  }
  if (model.coresPerSocket !== undefined && (model.coresPerSocket < 1 || model.cpus % model.coresPerSocket !== 0)) {
    note(
      `${model.cpus} CPUs with ${model.coresPerSocket} cores per socket`,
      `${model.cpus} sockets of 1 core`,
      'cores per socket must divide the CPU count',
    );
    model.coresPerSocket = 1;
  }

  // --- devices no target here carries
  for (const d of droppedDevices(model)) {
    note(
      `${d.kind} ${d.instance}`,
      'dropped',
      `vmferry does not carry a ${d.kind} to ${profile.target} (source settings: ${d.settings.join('; ')})`,
    );
  }
  // Snapshots: the current state is migrated, not the tree.
  if (model.snapshots.length > 0) {
    note(
      `${model.snapshots.length} snapshot${model.snapshots.length === 1 ? '' : 's'}`,
      'flattened',
      'the disks are migrated as the current state; the snapshot tree is not carried',
    );
  }
  return { model, notes };
}

function unitLimit(bus: DiskBus): number {
  switch (bus) {
    case 'ide':
      return 2;
    case 'sata':
      return 30;
    case 'scsi':
      return 16;
    case 'nvme':
      return 15;
    default:
      return 1 << 20;
  }
}

/** The disk the VM boots from: lowest bootOrder, else the first disk. */
export function bootDiskIndex(model: VmModel): number {
  let best = model.disks.length > 0 ? 0 : -1;
  model.disks.forEach((d, i) => {
    const b = model.disks[best]?.bootOrder;
    if (d.bootOrder !== undefined && (b === undefined || d.bootOrder < b)) best = i;
  });
  return best;
}

function diskWhy(
  fromBus: DiskBus,
  fromModel: ScsiModel | undefined,
  toBus: DiskBus,
  toModel: ScsiModel | undefined,
  override: boolean,
  target: string,
  windows: boolean,
): string {
  let why: string;
  if (override) why = 'chosen with --disk-bus';
  else if (fromBus !== toBus) why = `target ${target} has no ${fromBus} bus here`;
  else if (fromModel === 'pvscsi' || fromModel === 'hyperv-scsi') {
    why = `${fromModel} is another hypervisor's paravirtual controller; ${target} uses ${toModel}`;
  } else why = `target ${target} has no ${fromModel ?? 'such'} SCSI controller`;
  if (windows && (toBus === 'virtio' || toModel === 'virtio-scsi')) {
    why += '; a Windows guest needs the virtio-win storage driver installed before it can boot from it';
  }
  if (windows && toModel === 'pvscsi') why += '; a Windows guest needs VMware Tools for pvscsi';
  return why;
}
