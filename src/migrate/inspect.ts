/**
 * `inspect`: a source read into the neutral model, plus a look at each disk (format, sizes,
 * partition table) and a cross-check of the firmware the descriptor states against the boot disk.
 */
import { statSync } from 'node:fs';
import { ioError, VmferryError } from '../disk/errors.js';
import type { DiskReader } from '../disk/types.js';
import { openVmDisk } from '../package/member.js';
import type { ReadVmOptions } from '../vm/dialect.js';
import { bootDiskIndex } from '../vm/mapping.js';
import type { VmModel } from '../vm/model.js';
import { firmwareMismatch, type PartitionTable, readPartitionTable } from '../vm/partitions.js';
import { detectVmReader } from '../vm/registry.js';
import { allocatedBytes } from './hash.js';

export interface DiskLook {
  index: number;
  path: string;
  /** The format the disk plane opened it as. */
  format?: string;
  virtualSize?: number;
  /** Guest bytes stored as data through the whole chain. */
  allocatedBytes?: number;
  /** The images the disk is made of, top first (the backing chain). */
  chain?: string[];
  partitionTable?: PartitionTable;
  /** Why the disk could not be opened. */
  error?: string;
}

export interface Inspection {
  /** The dialect that read the source (vmware, ovf, virtualbox, hyperv, libvirt, disk). */
  reader: string;
  model: VmModel;
  disks: DiskLook[];
  /** Reader warnings plus the firmware cross-check. */
  warnings: string[];
}

export interface InspectOptions extends ReadVmOptions {
  /** Skip opening the disks (the model only). */
  modelOnly?: boolean;
}

/** Reads `source` with the reader that recognises it. */
export async function readVm(source: string, options: ReadVmOptions = {}): Promise<{ reader: string; model: VmModel }> {
  try {
    statSync(source);
  } catch (err) {
    throw ioError(err, source);
  }
  const reader = detectVmReader(source);
  const model = await reader.read(source, options);
  return { reader: reader.platform, model };
}

/** Opens one of the model's disks through the disk plane. */
export function openModelDisk(model: VmModel, index: number, options: ReadVmOptions = {}): Promise<DiskReader> {
  return openVmDisk(model.disks[index]!, { allowExternalFiles: options.allowExternalFiles });
}

export async function lookAtDisk(model: VmModel, index: number, options: ReadVmOptions = {}): Promise<DiskLook> {
  const disk = model.disks[index]!;
  const look: DiskLook = { index, path: disk.path };
  let reader: DiskReader | undefined;
  try {
    reader = await openModelDisk(model, index, options);
    look.format = reader.format;
    look.virtualSize = reader.virtualSize;
    look.chain = [];
    for (let r: DiskReader | undefined = reader; r; r = r.backing) look.chain.push(r.filename);
    look.allocatedBytes = await allocatedBytes(reader);
    look.partitionTable = await readPartitionTable(reader);
  } catch (err) {
    if (!(err instanceof VmferryError)) throw err;
    look.error = err.describe();
  } finally {
    await reader?.close();
  }
  return look;
}

/** The firmware cross-check: the descriptor's firmware against the boot disk's layout. */
export function firmwareWarnings(model: VmModel, disks: DiskLook[]): string[] {
  const boot = bootDiskIndex(model);
  const table = disks.find((d) => d.index === boot)?.partitionTable;
  const mismatch = table ? firmwareMismatch(model.firmware, table) : undefined;
  return mismatch ? [`disk${boot}: ${mismatch}`] : [];
}

export async function inspectVm(source: string, options: InspectOptions = {}): Promise<Inspection> {
  const { reader, model } = await readVm(source, options);
  const disks: DiskLook[] = [];
  if (!options.modelOnly) for (let i = 0; i < model.disks.length; i++) disks.push(await lookAtDisk(model, i, options));
  const warnings = [...model.warnings];
  for (const d of disks) {
    if (d.error) warnings.push(`disk${d.index}: cannot be opened: ${d.error}`);
    for (const w of d.partitionTable?.warnings ?? []) warnings.push(`disk${d.index}: ${w}`);
  }
  warnings.push(...firmwareWarnings(model, disks));
  return { reader, model, disks, warnings };
}
