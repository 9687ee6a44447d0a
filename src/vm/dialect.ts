/**
 * The contract between the VM plane's pieces: one reader per source dialect, one writer per
 * target, and the mapping between them (mapping.ts). `migrate` drives them.
 */
import type { TranslationNote, VmModel } from './model.js';

export interface ReadVmOptions {
  /** Let descriptors name disk files outside their folder. */
  allowExternalFiles?: boolean;
  /** For bare disk images: what the image cannot say. */
  firmware?: 'bios' | 'uefi';
  cpus?: number;
  memory?: number;
  name?: string;
}

/** Reads one platform's VM descriptor into the neutral model. */
export interface VmReader {
  /** vmware, ovf, virtualbox, hyperv, libvirt, disk */
  readonly platform: string;
  /** Confidence 0..100 that `path` (with its first bytes `head`) is this dialect. */
  detect(path: string, head: Buffer): number;
  read(path: string, options: ReadVmOptions): Promise<VmModel>;
}

/** A disk as the target will hold it, after conversion. */
export interface TargetDisk {
  /** Index in model.disks. */
  index: number;
  /** File name inside the output folder, e.g. NAME-disk0.qcow2. */
  fileName: string;
  format: string;
  /** Guest-visible size in bytes. */
  capacity: number;
  /** SHA-256 of the guest-visible content, once verified. */
  sha256?: string;
}

/** What one target supports; mapping.ts translates a model onto it. */
export interface TargetProfile {
  /** libvirt, qemu, proxmox, vmware, ova, virtualbox, hyperv, azure */
  readonly target: string;
  readonly firmware: readonly ('bios' | 'uefi')[];
  readonly diskBuses: readonly string[];
  readonly scsiModels: readonly string[];
  readonly nicModels: readonly string[];
  /** Disk format and create options the target wants (e.g. vmdk streamOptimized for OVA). */
  readonly diskFormat: string;
  readonly diskOptions: Record<string, string>;
  /** File extension of the converted disks. */
  readonly diskExtension: string;
}

/** Writes the target's own descriptor (and any helper scripts) into a folder. */
export interface TargetWriter {
  readonly profile: TargetProfile;
  /**
   * Writes the descriptor files for `model` (already mapped onto the profile) whose disks are
   * `disks` (already converted, inside `outDir`). Returns the files written, relative to outDir.
   * Must write atomically (temp name + rename), like every vmferry output.
   */
  write(model: VmModel, disks: TargetDisk[], outDir: string): Promise<string[]>;
}

/** The result of mapping a model onto a target profile. */
export interface MappedVm {
  model: VmModel;
  notes: TranslationNote[];
}
