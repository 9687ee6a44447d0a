import { closeSync, openSync, readSync, statSync } from 'node:fs';
import { UsageError } from '../disk/errors.js';
import type { TargetWriter, VmReader } from './dialect.js';
import { diskReader } from './readers/disk.js';
import { hypervReader } from './readers/hyperv.js';
import { libvirtReader } from './readers/libvirt.js';
import { ovfReader } from './readers/ovf.js';
import { vboxReader } from './readers/vbox.js';
import { vmxReader } from './readers/vmx.js';
import { azureTarget } from './targets/azure.js';
import { hypervTarget } from './targets/hyperv.js';
import { libvirtTarget } from './targets/libvirt.js';
import { ovaTarget } from './targets/ova.js';
import { proxmoxTarget } from './targets/proxmox.js';
import { qemuTarget } from './targets/qemu.js';
import { virtualboxTarget } from './targets/virtualbox.js';
import { vmwareTarget } from './targets/vmware.js';

/** Every source dialect; the disk reader (a bare image) comes last as the fallback. */
export const vmReaders: VmReader[] = [vmxReader, ovfReader, vboxReader, hypervReader, libvirtReader, diskReader];

export const targetWriters: TargetWriter[] = [
  libvirtTarget,
  qemuTarget,
  proxmoxTarget,
  vmwareTarget,
  ovaTarget,
  virtualboxTarget,
  hypervTarget,
  azureTarget,
];

export function targetWriter(name: string): TargetWriter {
  const t = targetWriters.find((w) => w.profile.target === name);
  if (!t) throw new UsageError(`Unknown target '${name}' (known: ${targetWriters.map((w) => w.profile.target).join(', ')})`);
  return t;
}

/** The reader that recognises `path` best, by content (and name where the content is ambiguous). */
export function detectVmReader(path: string): VmReader {
  let head = Buffer.alloc(0);
  if (statSync(path).isFile()) {
    const fd = openSync(path, 'r');
    try {
      head = Buffer.alloc(64 * 1024);
      head = head.subarray(0, readSync(fd, head, 0, head.length, 0));
    } finally {
      closeSync(fd);
    }
  }
  const scored = vmReaders.map((r) => ({ r, score: r.detect(path, head) })).sort((a, b) => b.score - a.score);
  return scored[0]!.score > 0 ? scored[0]!.r : diskReader;
}
