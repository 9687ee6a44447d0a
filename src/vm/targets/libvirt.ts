/**
 * libvirt target: NAME.xml, a KVM domain valid under virt-xml-validate. UEFI VMs get q35 with an
 * OVMF pflash loader and an NVRAM template (Debian's OVMF paths), BIOS VMs pc-i440fx (or q35 when
 * no IDE device needs the PIIX controller). A pty serial console lets `virsh console` watch boots.
 */
import { join, resolve } from 'node:path';
import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetDisk, TargetProfile, TargetWriter } from '../dialect.js';
import { type DiskBus, type DiskController, safeVmName, type VmModel } from '../model.js';
import { xmlEscape } from '../readers/xml.js';
import { diskFor, writeOutputs } from './files.js';

export const OVMF = {
  code: '/usr/share/OVMF/OVMF_CODE_4M.fd',
  vars: '/usr/share/OVMF/OVMF_VARS_4M.fd',
  codeSecure: '/usr/share/OVMF/OVMF_CODE_4M.secboot.fd',
  varsSecure: '/usr/share/OVMF/OVMF_VARS_4M.ms.fd',
};

/** Neutral SCSI models -> libvirt controller models, and the QEMU device each becomes. */
export const KVM_SCSI: Record<string, { libvirt: string; qemu: string }> = {
  'virtio-scsi': { libvirt: 'virtio-scsi', qemu: 'virtio-scsi-pci' },
  lsilogic: { libvirt: 'lsilogic', qemu: 'lsi53c895a' },
  lsisas1068: { libvirt: 'lsisas1068', qemu: 'mptsas1068' },
};

/** Neutral NIC models -> libvirt model type and QEMU device. */
export const KVM_NIC: Record<string, { libvirt: string; qemu: string }> = {
  virtio: { libvirt: 'virtio', qemu: 'virtio-net-pci' },
  e1000: { libvirt: 'e1000', qemu: 'e1000' },
  e1000e: { libvirt: 'e1000e', qemu: 'e1000e' },
  rtl8139: { libvirt: 'rtl8139', qemu: 'rtl8139' },
};

export const kvmProfile = (target: string): TargetProfile => ({
  target,
  firmware: ['bios', 'uefi'],
  diskBuses: ['virtio', 'scsi', 'sata', 'ide'],
  scsiModels: Object.keys(KVM_SCSI),
  nicModels: Object.keys(KVM_NIC),
  diskFormat: 'qcow2',
  diskOptions: {},
  diskExtension: 'qcow2',
});

/** Controller index per bus: 'scsi1' -> 1; ids of other shapes take the next free index. */
export function controllerIndexes(model: VmModel): Map<string, { bus: DiskBus; index: number; model?: string }> {
  const out = new Map<string, { bus: DiskBus; index: number; model?: string }>();
  const used = new Map<DiskBus, Set<number>>();
  const take = (c: DiskController, wanted?: number) => {
    const set = used.get(c.bus) ?? new Set<number>();
    used.set(c.bus, set);
    let i = wanted ?? 0;
    if (wanted === undefined || set.has(wanted)) {
      i = 0;
      while (set.has(i)) i++;
    }
    set.add(i);
    out.set(c.id, { bus: c.bus, index: i, model: c.model });
  };
  const rest: DiskController[] = [];
  for (const c of model.controllers) {
    const m = new RegExp(`^${c.bus}(\\d+)$`).exec(c.id);
    if (m) take(c, Number(m[1]));
    else rest.push(c);
  }
  for (const c of rest) take(c);
  return out;
}

function devName(prefix: string, n: number): string {
  let s = '';
  let k = n + 1;
  while (k > 0) {
    const r = (k - 1) % 26;
    s = String.fromCharCode(97 + r) + s;
    k = Math.floor((k - 1) / 26);
  }
  return prefix + s;
}

/** Whether the VM needs the i440fx machine (its PIIX IDE controller). */
export function needsPiix(model: VmModel): boolean {
  return model.disks.some((d) => d.bus === 'ide') || model.cdroms.some((c) => c.bus === 'ide');
}

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

export function libvirtXml(model: VmModel, disks: TargetDisk[], outDir: string): string {
  const name = safeVmName(model.name);
  const piix = needsPiix(model);
  const uefi = model.firmware === 'uefi';
  const secure = uefi && model.secureBoot === true && !piix;
  const ctls = controllerIndexes(model);
  const lines: string[] = [];
  const push = (s: string) => lines.push(s);
  push(`<domain type='kvm'>`);
  push(`  <name>${xmlEscape(name)}</name>`);
  if (model.uuid && UUID_RE.test(model.uuid)) push(`  <uuid>${model.uuid.toLowerCase()}</uuid>`);
  const desc = [`Migrated by vmferry from ${model.sourcePlatform}${model.sourceFile ? ` (${model.sourceFile})` : ''}.`];
  model.nics.forEach((n, i) => {
    if (n.network) desc.push(`nic${i} was on network '${n.network}'.`);
  });
  push(`  <description>${xmlEscape(desc.join(' '))}</description>`);
  const kib = Math.ceil(model.memory / 1024);
  push(`  <memory unit='KiB'>${kib}</memory>`);
  push(`  <currentMemory unit='KiB'>${kib}</currentMemory>`);
  push(`  <vcpu placement='static'>${model.cpus}</vcpu>`);
  push(`  <os>`);
  push(`    <type arch='x86_64' machine='${piix ? 'pc' : 'q35'}'>hvm</type>`);
  if (uefi) {
    push(
      `    <loader readonly='yes' secure='${secure ? 'yes' : 'no'}' type='pflash'>${secure ? OVMF.codeSecure : OVMF.code}</loader>`,
    );
    push(
      `    <nvram template='${secure ? OVMF.varsSecure : OVMF.vars}'>/var/lib/libvirt/qemu/nvram/${xmlEscape(name)}_VARS.fd</nvram>`,
    );
  }
  push(`  </os>`);
  push(`  <features>`);
  push(`    <acpi/>`);
  push(`    <apic/>`);
  if (model.guest.family === 'windows') {
    push(`    <hyperv mode='custom'>`);
    push(`      <relaxed state='on'/>`);
    push(`      <vapic state='on'/>`);
    push(`      <spinlocks state='on' retries='8191'/>`);
    push(`    </hyperv>`);
  }
  if (secure) push(`    <smm state='on'/>`);
  push(`  </features>`);
  const cores =
    model.coresPerSocket && model.coresPerSocket >= 1 && model.cpus % model.coresPerSocket === 0 ? model.coresPerSocket : 1;
  push(`  <cpu mode='host-model' check='partial'>`);
  push(`    <topology sockets='${model.cpus / cores}' dies='1' cores='${cores}' threads='1'/>`);
  push(`  </cpu>`);
  push(`  <clock offset='${model.guest.family === 'windows' ? 'localtime' : 'utc'}'/>`);
  push(`  <on_poweroff>destroy</on_poweroff>`);
  push(`  <on_reboot>restart</on_reboot>`);
  push(`  <on_crash>destroy</on_crash>`);
  push(`  <devices>`);
  push(`    <emulator>/usr/bin/qemu-system-x86_64</emulator>`);

  const letters = new Map<string, number>();
  const nextDev = (bus: DiskBus): string => {
    const prefix = bus === 'virtio' ? 'vd' : bus === 'ide' ? 'hd' : 'sd';
    const n = letters.get(prefix) ?? 0;
    letters.set(prefix, n + 1);
    return devName(prefix, n);
  };
  const address = (controller: string | undefined, bus: DiskBus, unit: number | undefined): string => {
    if (bus === 'virtio') return '';
    const c = controller ? ctls.get(controller) : undefined;
    if (!c)
      throw new UnsupportedFeatureError(
        `a ${bus} device names controller '${controller}', which the model does not define`,
        outDir,
      );
    if (bus === 'ide') {
      return `      <address type='drive' controller='${c.index >> 1}' bus='${c.index & 1}' target='0' unit='${unit ?? 0}'/>`;
    }
    return `      <address type='drive' controller='${c.index}' bus='0' target='0' unit='${unit ?? 0}'/>`;
  };
  model.disks.forEach((d, i) => {
    if (d.bus === 'nvme')
      throw new UnsupportedFeatureError(`disk ${i} is on NVMe, which this libvirt target does not write; map it first`, outDir);
    const td = diskFor(disks, i, outDir);
    push(`    <disk type='file' device='disk'>`);
    push(`      <driver name='qemu' type='${xmlEscape(td.format)}'/>`);
    push(`      <source file='${xmlEscape(join(resolve(outDir), td.fileName))}'/>`);
    push(`      <target dev='${nextDev(d.bus)}' bus='${d.bus}'/>`);
    if (d.bootOrder !== undefined) push(`      <boot order='${Math.max(1, Math.round(d.bootOrder))}'/>`);
    const a = address(d.controller, d.bus, d.unit);
    if (a) push(a);
    push(`    </disk>`);
  });
  model.cdroms.forEach((c, i) => {
    if (c.bus === 'virtio' || c.bus === 'nvme') throw new UnsupportedFeatureError(`cdrom ${i} cannot sit on ${c.bus}`, outDir);
    push(`    <disk type='file' device='cdrom'>`);
    push(`      <driver name='qemu' type='raw'/>`);
    if (c.path) push(`      <source file='${xmlEscape(c.path)}'/>`);
    push(`      <target dev='${nextDev(c.bus)}' bus='${c.bus}'/>`);
    push(`      <readonly/>`);
    push(address(c.controller, c.bus, c.unit));
    push(`    </disk>`);
  });
  for (const c of ctls.values()) {
    if (c.bus === 'scsi') {
      const m = KVM_SCSI[c.model ?? 'virtio-scsi'];
      if (!m)
        throw new UnsupportedFeatureError(
          `SCSI controller model '${c.model}' is not supported by libvirt/QEMU here; map it first`,
          outDir,
        );
      push(`    <controller type='scsi' index='${c.index}' model='${m.libvirt}'/>`);
    } else if (c.bus === 'sata') {
      push(`    <controller type='sata' index='${c.index}'/>`);
    } else if (c.bus === 'ide' && (c.index & 1) === 0) {
      push(`    <controller type='ide' index='${c.index >> 1}'/>`);
    }
  }
  model.nics.forEach((n, i) => {
    const m = KVM_NIC[n.model];
    if (!m)
      throw new UnsupportedFeatureError(`nic ${i} model '${n.model}' is not supported by libvirt here; map it first`, outDir);
    push(`    <interface type='network'>`);
    if (n.mac) push(`      <mac address='${n.mac}'/>`);
    push(`      <source network='default'/>`);
    push(`      <model type='${m.libvirt}'/>`);
    push(`    </interface>`);
  });
  push(`    <serial type='pty'>`);
  push(`      <target port='0'/>`);
  push(`    </serial>`);
  push(`    <console type='pty'>`);
  push(`      <target type='serial' port='0'/>`);
  push(`    </console>`);
  push(`    <input type='tablet' bus='usb'/>`);
  push(`    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>`);
  push(`    <video>`);
  push(`      <model type='vga'/>`);
  push(`    </video>`);
  push(`  </devices>`);
  push(`</domain>`);
  return `${lines.filter((l) => l !== '').join('\n')}\n`;
}

export const libvirtTarget: TargetWriter = {
  profile: kvmProfile('libvirt'),
  write: async (model, disks, outDir) => {
    const name = safeVmName(model.name);
    return writeOutputs(outDir, [{ name: `${name}.xml`, content: libvirtXml(model, disks, outDir) }]);
  },
};
