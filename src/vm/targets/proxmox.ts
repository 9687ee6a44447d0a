/**
 * Proxmox VE target: NAME.conf, the VM's settings in qemu-server syntax (the keys `qm create` takes
 * and /etc/pve/qemu-server/VMID.conf holds; disk lines use the `STORAGE:0,import-from=FILE` form
 * of PVE 7.2+), and NAME-import.sh, which creates the VM with `qm create`, imports each disk with
 * `qm importdisk` and attaches it with `qm set`. Usage on the PVE host:
 *   sh NAME-import.sh VMID [STORAGE] [BRIDGE]
 */
import { resolve } from 'node:path';
import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetDisk, TargetProfile, TargetWriter } from '../dialect.js';
import { type GuestHints, safeVmName, type VmModel } from '../model.js';
import { diskFor, disksInBootOrder, mib, shQuote, writeOutputs } from './files.js';

const SCSIHW: Record<string, string> = {
  'virtio-scsi': 'virtio-scsi-pci',
  lsilogic: 'lsi',
  lsisas1068: 'megasas',
  pvscsi: 'pvscsi',
};
const NICS: Record<string, string> = {
  virtio: 'virtio',
  e1000: 'e1000',
  e1000e: 'e1000e',
  vmxnet3: 'vmxnet3',
  rtl8139: 'rtl8139',
  pcnet: 'pcnet',
};
/** Slots per bus in qemu-server. */
const SLOTS: Record<string, number> = { ide: 4, sata: 6, scsi: 31, virtio: 16 };

export const proxmoxProfile: TargetProfile = {
  target: 'proxmox',
  firmware: ['bios', 'uefi'],
  diskBuses: ['virtio', 'scsi', 'sata', 'ide'],
  scsiModels: ['virtio-scsi', 'lsilogic', 'pvscsi'],
  nicModels: ['virtio', 'e1000', 'e1000e', 'rtl8139'],
  diskFormat: 'qcow2',
  diskOptions: {},
  diskExtension: 'qcow2',
};

/** qemu-server ostype from the guest hints. */
export function proxmoxOsType(guest: GuestHints): string {
  const d = `${guest.description ?? ''} ${guest.sourceId ?? ''}`.toLowerCase();
  if (guest.family === 'windows') {
    if (/2025|2022|windows ?11|win11/.test(d)) return 'win11';
    if (/2019|2016|windows ?10|win10/.test(d)) return 'win10';
    if (/2012|windows ?8|win8/.test(d)) return 'win8';
    if (/2008|windows ?7|win7/.test(d)) return 'win7';
    if (/vista/.test(d)) return 'wvista';
    if (/2003/.test(d)) return 'w2k3';
    if (/xp/.test(d)) return 'wxp';
    return 'win10';
  }
  if (guest.family === 'linux') return 'l26';
  if (/solaris/.test(d)) return 'solaris';
  return 'other';
}

export interface ProxmoxPlan {
  /** Ordered key/value settings of the VM (without disks). */
  settings: [string, string][];
  /** Disk slots: key (scsi0), the file to import, the options after the volume. */
  disks: { key: string; file: string; options: string }[];
  cdroms: { key: string }[];
}

export function proxmoxPlan(model: VmModel, disks: TargetDisk[], outDir: string): ProxmoxPlan {
  const name = safeVmName(model.name);
  const uefi = model.firmware === 'uefi';
  const settings: [string, string][] = [];
  const set = (k: string, v: string) => settings.push([k, v]);
  // One SCSI HBA type per VM in qemu-server.
  const scsiModels = new Set(model.controllers.filter((c) => c.bus === 'scsi').map((c) => c.model ?? 'virtio-scsi'));
  if (scsiModels.size > 1) {
    throw new UnsupportedFeatureError(
      `Proxmox VE has one SCSI controller type per VM; this VM has ${[...scsiModels].join(', ')}; map it first`,
      outDir,
    );
  }
  const scsiModel = [...scsiModels][0] ?? 'virtio-scsi';
  const scsihw = SCSIHW[scsiModel];
  if (!scsihw)
    throw new UnsupportedFeatureError(`SCSI controller model '${scsiModel}' has no Proxmox equivalent; map it first`, outDir);

  const used = new Map<string, Set<number>>();
  const slot = (bus: string): string => {
    const limit = SLOTS[bus];
    if (limit === undefined) throw new UnsupportedFeatureError(`Proxmox VE has no ${bus} disk bus; map it first`, outDir);
    const set = used.get(bus) ?? new Set<number>();
    used.set(bus, set);
    let n = 0;
    while (set.has(n)) n++;
    if (n >= limit) throw new UnsupportedFeatureError(`more than ${limit} ${bus} devices`, outDir);
    set.add(n);
    return `${bus}${n}`;
  };
  const diskSlots: ProxmoxPlan['disks'] = [];
  const boot: string[] = [];
  // Disks in boot order get the low slot numbers, so scsi0 is the boot disk.
  for (const { index, disk } of disksInBootOrder(model)) {
    const td = diskFor(disks, index, outDir);
    const key = slot(disk.bus);
    diskSlots.push({
      key,
      file: resolve(outDir, td.fileName),
      options: disk.bus === 'scsi' || disk.bus === 'virtio' ? 'discard=on' : '',
    });
    if (disk.bootOrder !== undefined) boot.push(key);
  }
  if (boot.length === 0 && diskSlots[0]) boot.push(diskSlots[0].key);
  const cdSlots = model.cdroms.map((c) => {
    if (c.bus === 'virtio' || c.bus === 'nvme')
      throw new UnsupportedFeatureError(`a CD-ROM cannot sit on ${c.bus} in Proxmox VE`, outDir);
    return { key: slot(c.bus) };
  });
  for (const c of cdSlots) boot.push(c.key);
  for (let i = 0; i < model.nics.length; i++) boot.push(`net${i}`);

  set('name', name);
  set('ostype', proxmoxOsType(model.guest));
  set('machine', uefi ? 'q35' : 'pc');
  if (uefi) set('bios', 'ovmf');
  const cores =
    model.coresPerSocket && model.coresPerSocket >= 1 && model.cpus % model.coresPerSocket === 0
      ? model.coresPerSocket
      : model.cpus;
  set('sockets', String(model.cpus / cores));
  set('cores', String(cores));
  set('memory', String(mib(model.memory)));
  set('scsihw', scsihw);
  set('boot', `order=${boot.join(';')}`);
  model.nics.forEach((n, i) => {
    const m = NICS[n.model];
    if (!m) throw new UnsupportedFeatureError(`nic ${i} model '${n.model}' has no Proxmox equivalent; map it first`, outDir);
    set(`net${i}`, `${m}${n.mac ? `=${n.mac.toUpperCase()}` : ''},bridge=BRIDGE`);
  });
  set('serial0', 'socket');
  if (model.uuid && /^[0-9a-f-]{36}$/i.test(model.uuid)) set('smbios1', `uuid=${model.uuid.toLowerCase()}`);
  set('agent', '0');
  return { settings, disks: diskSlots, cdroms: cdSlots };
}

export function proxmoxConf(model: VmModel, plan: ProxmoxPlan): string {
  const uefi = model.firmware === 'uefi';
  const lines = [
    `# ${safeVmName(model.name)}: Proxmox VE qemu-server settings written by vmferry (from ${model.sourcePlatform}).`,
    '# STORAGE and BRIDGE are placeholders; NAME-import.sh fills them in and imports the disks.',
  ];
  for (const [k, v] of plan.settings) lines.push(`${k}: ${v.replace('bridge=BRIDGE', 'bridge=vmbr0')}`);
  if (uefi) lines.push(`efidisk0: STORAGE:1,efitype=4m,pre-enrolled-keys=${model.secureBoot ? 1 : 0}`);
  for (const d of plan.disks) lines.push(`${d.key}: STORAGE:0,import-from=${d.file}${d.options ? `,${d.options}` : ''}`);
  for (const c of plan.cdroms) lines.push(`${c.key}: none,media=cdrom`);
  return `${lines.join('\n')}\n`;
}

export function proxmoxImportScript(model: VmModel, plan: ProxmoxPlan): string {
  const name = safeVmName(model.name);
  const uefi = model.firmware === 'uefi';
  // The boot order names disks that exist only once imported: it is set last.
  const bootOrder = plan.settings.find(([k]) => k === 'boot')?.[1];
  const createArgs = plan.settings
    .filter(([k]) => k !== 'boot')
    .map(([k, v]) => (v.includes('BRIDGE') ? `--${k} "${v.replace('BRIDGE', '$BRIDGE')}"` : `--${k} ${shQuote(v)}`));
  if (uefi) createArgs.push(`--efidisk0 "$STORAGE:1,efitype=4m,pre-enrolled-keys=${model.secureBoot ? 1 : 0}"`);
  for (const c of plan.cdroms) createArgs.push(`--${c.key} none,media=cdrom`);
  const lines = [
    '#!/bin/sh',
    `# ${name}: creates the VM on a Proxmox VE host and imports its disks (written by vmferry).`,
    '# Usage: sh NAME-import.sh VMID [STORAGE (default local-lvm)] [BRIDGE (default vmbr0)]',
    'set -eu',
    `VMID=\${1:?usage: $0 VMID [STORAGE] [BRIDGE]}`,
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a shell parameter expansion, not a template
    'STORAGE=${2:-local-lvm}',
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a shell parameter expansion, not a template
    'BRIDGE=${3:-vmbr0}',
    'HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)',
    'qm create "$VMID" \\',
    ...createArgs.map((a) => `  ${a} \\`),
    '  --description "migrated by vmferry"',
    '',
    '# Each disk is imported as an unused volume, then attached to its slot.',
    'attach() {',
    '  out=$(qm importdisk "$VMID" "$2" "$STORAGE") || exit 1',
    '  printf \'%s\\n\' "$out"',
    `  vol=$(printf '%s\\n' "$out" | sed -n "s/.*'\\(unused[0-9]*\\):\\(.*\\)'.*/\\2/p" | tail -n 1)`,
    '  if [ -z "$vol" ]; then echo "cannot find the imported volume of $2" >&2; exit 1; fi',
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a shell parameter expansion, not a template
    '  qm set "$VMID" --"$1" "$vol${3:+,$3}"',
    '}',
  ];
  for (const d of plan.disks) {
    const file = d.file.split('/').pop()!;
    lines.push(`attach ${d.key} "$HERE"/${shQuote(file)} ${shQuote(d.options)}`);
  }
  if (bootOrder) lines.push(`qm set "$VMID" --boot ${shQuote(bootOrder)}`);
  lines.push(`echo "VM $VMID (${name}) created; start it with: qm start $VMID"`, '');
  return lines.join('\n');
}

export const proxmoxTarget: TargetWriter = {
  profile: proxmoxProfile,
  write: async (model, disks, outDir) => {
    const name = safeVmName(model.name);
    const plan = proxmoxPlan(model, disks, outDir);
    return writeOutputs(outDir, [
      { name: `${name}.conf`, content: proxmoxConf(model, plan) },
      { name: `${name}-import.sh`, content: proxmoxImportScript(model, plan), executable: true },
    ]);
  },
};
