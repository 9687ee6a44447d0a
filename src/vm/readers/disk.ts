/**
 * A bare disk image as a VM: one disk, everything else from options (firmware, CPUs, memory,
 * name) or defaults. When the firmware is not given it is read from the partition table: a GPT
 * with an EFI system partition (and no BIOS boot partition) or an MBR with an ESP (type 0xEF)
 * means UEFI; anything else BIOS. The guess is listed in the warnings.
 */
import { statSync } from 'node:fs';
import { basename, resolve } from 'node:path';
import '../../formats/index.js';
import { CorruptImageError, ioError, UsageError } from '../../disk/errors.js';
import { openImage } from '../../disk/registry.js';
import type { DiskReader } from '../../disk/types.js';
import type { ReadVmOptions, VmReader } from '../dialect.js';
import { emptyModel, type Firmware, MiB, safeVmName, type VmModel } from '../model.js';

const ESP_GUID = 'c12a7328-f81f-11d2-ba4b-00a0c93ec93b';
const BIOS_BOOT_GUID = '21686148-6449-6e6f-744e-656564454649';

function guidAt(buf: Buffer, off: number): string {
  const h = (a: number, b: number) => buf.subarray(off + a, off + b);
  const le = (b: Buffer) => Buffer.from(b).reverse().toString('hex');
  return `${le(h(0, 4))}-${le(h(4, 6))}-${le(h(6, 8))}-${h(8, 10).toString('hex')}-${h(10, 16).toString('hex')}`;
}

/** What the partition table says about the firmware, or undefined when it says nothing. */
export async function firmwareFromPartitions(reader: DiskReader): Promise<{ firmware: Firmware; why: string } | undefined> {
  if (reader.virtualSize < 2 * 512) return undefined;
  const head = await reader.read(0, Math.min(reader.virtualSize, 34 * 512));
  if (head.readUInt16LE(510) !== 0xaa55) return undefined;
  const mbrTypes = [0, 1, 2, 3].map((i) => head[446 + i * 16 + 4]!);
  if (mbrTypes.includes(0xee) && head.subarray(512, 520).toString('latin1') === 'EFI PART') {
    const entriesLba = Number(head.readBigUInt64LE(512 + 72));
    const count = Math.min(head.readUInt32LE(512 + 80), 1024);
    const size = head.readUInt32LE(512 + 84);
    if (size < 128 || size > 4096 || entriesLba < 2) return { firmware: 'uefi', why: 'GPT partition table (entries unreadable)' };
    const tableBytes = count * size;
    if (entriesLba * 512 + tableBytes > reader.virtualSize)
      return { firmware: 'uefi', why: 'GPT partition table (entries beyond the end)' };
    const table = await reader.read(entriesLba * 512, tableBytes);
    let esp = false;
    let biosBoot = false;
    for (let i = 0; i < count; i++) {
      const type = guidAt(table, i * size);
      if (type === ESP_GUID) esp = true;
      if (type === BIOS_BOOT_GUID) biosBoot = true;
    }
    if (esp && !biosBoot) return { firmware: 'uefi', why: 'GPT with an EFI system partition' };
    if (biosBoot) return { firmware: 'bios', why: 'GPT with a BIOS boot partition' };
    return { firmware: 'uefi', why: 'GPT partition table without a BIOS boot partition' };
  }
  if (mbrTypes.includes(0xef)) return { firmware: 'uefi', why: 'MBR with an EFI system partition (type 0xef)' };
  if (mbrTypes.some((t) => t !== 0)) return { firmware: 'bios', why: 'MBR partition table' };
  return undefined;
}

export async function readBareDisk(path: string, options: ReadVmOptions = {}): Promise<VmModel> {
  try {
    if (!statSync(path).isFile()) throw new CorruptImageError('is not a disk image file', path);
  } catch (err) {
    throw ioError(err, path);
  }
  if (options.cpus !== undefined && (!Number.isInteger(options.cpus) || options.cpus < 1 || options.cpus > 4096)) {
    throw new UsageError(`CPU count must be a whole number from 1 to 4096, not ${options.cpus}`);
  }
  if (options.memory !== undefined && (!Number.isFinite(options.memory) || options.memory < MiB)) {
    throw new UsageError(`memory must be at least 1 MiB, not ${options.memory} bytes`);
  }
  const reader = await openImage(path, { allowExternalFiles: options.allowExternalFiles });
  try {
    const stem = basename(path).replace(/\.(qcow2|qcow|img|raw|vmdk|vhdx?|vdi|avhdx?|bin)$/i, '');
    const model = emptyModel(options.name ?? safeVmName(stem), 'disk');
    model.sourceFile = resolve(path);
    if (options.cpus !== undefined) model.cpus = options.cpus;
    if (options.memory !== undefined) model.memory = options.memory;
    if (options.firmware) {
      model.firmware = options.firmware;
    } else {
      const guess = await firmwareFromPartitions(reader);
      model.firmware = guess?.firmware ?? 'bios';
      model.warnings.push(
        guess
          ? `firmware ${model.firmware} inferred from the disk (${guess.why}); set it explicitly if wrong`
          : 'firmware not known (no partition table found); assuming BIOS',
      );
    }
    if (options.cpus === undefined) model.warnings.push('CPU count not known from a bare disk; using 1');
    if (options.memory === undefined) model.warnings.push('memory size not known from a bare disk; using 1024 MiB');
    model.controllers.push({ id: 'sata0', bus: 'sata' });
    model.disks.push({
      path: resolve(path),
      format: reader.format,
      capacity: reader.virtualSize,
      // SATA: every guest OS has an AHCI driver; --disk-bus virtio is faster where the guest has virtio.
      bus: 'sata',
      controller: 'sata0',
      unit: 0,
      bootOrder: 1,
      notes: ['bare disk image: put on SATA, the bus every guest has a driver for'],
    });
    return model;
  } finally {
    await reader.close();
  }
}

export const diskReader: VmReader = {
  platform: 'disk',
  detect(path, head) {
    try {
      if (!statSync(path).isFile()) return 0;
    } catch {
      return 0;
    }
    // Text descriptors belong to other readers; any binary file may be an image.
    const s = head.subarray(0, 512).toString('latin1');
    if (/^\s*(<\?xml|<[A-Za-z]|#|\.encoding|config\.version|displayName)/.test(s)) return 0;
    return 1;
  },
  read: (path, options) => readBareDisk(path, options),
};
