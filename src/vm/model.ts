/**
 * The neutral VM model: every platform's descriptor is read into this, mapped onto what the target
 * supports, and written out in the target's own dialect. Keep it platform-neutral: a field belongs
 * here only when at least two platforms can express it.
 */

export type Firmware = 'bios' | 'uefi';

export type DiskBus = 'ide' | 'sata' | 'scsi' | 'nvme' | 'virtio';

/** SCSI controller models as the platforms name them, normalised. */
export type ScsiModel = 'lsilogic' | 'lsisas1068' | 'buslogic' | 'pvscsi' | 'virtio-scsi' | 'hyperv-scsi' | 'unknown';

export type NicModel = 'e1000' | 'e1000e' | 'vmxnet3' | 'vmxnet2' | 'pcnet' | 'rtl8139' | 'virtio' | 'hyperv' | 'unknown';

export interface DiskController {
  /** Stable id within the VM, e.g. 'scsi0', 'sata0', 'ide1'. */
  id: string;
  bus: DiskBus;
  /** For SCSI: which controller model. */
  model?: ScsiModel;
}

export interface VmDisk {
  /** Absolute path of the disk image the VM uses (top of its chain). */
  path: string;
  /** Image format as vmferry names it (raw, qcow2, vmdk, vpc, vhdx, vdi), when known. */
  format?: string;
  /** Guest-visible size in bytes, when the descriptor or the image says. */
  capacity?: number;
  bus: DiskBus;
  /** Controller id (DiskController.id) the disk hangs on. */
  controller?: string;
  /** Unit/slot on the controller. */
  unit?: number;
  /** Position in the boot order, lowest first, when the descriptor says. */
  bootOrder?: number;
  /** Read-only/independent flags as the source stated them, for the report. */
  notes?: string[];
  /**
   * Set when the image's bytes are not a plain file of their own: a member of an OVA (read in
   * place) or a gzip-compressed OVF file. `path` then names no real file (for an OVA member it is
   * `ARCHIVE/MEMBER`); open such a disk with openVmDisk (src/package/member.ts).
   */
  stored?: StoredImage;
}

/** Where a disk image's bytes lie inside another file (see VmDisk.stored). */
export interface StoredImage {
  /** The file holding the bytes: the OVA archive, or the compressed file itself. */
  file: string;
  /** The member's name inside the archive, when `file` is an archive. */
  member?: string;
  /** Where the stored bytes start in `file`, and how many there are. */
  offset: number;
  size: number;
  /** The stored bytes are gzip-compressed (OVF References compression="gzip"). */
  compression?: 'gzip';
}

export interface VmCdrom {
  bus: DiskBus;
  controller?: string;
  unit?: number;
  /** ISO image, when one is inserted. */
  path?: string;
}

export interface VmNic {
  model: NicModel;
  /** Lower-case colon form, e.g. 52:54:00:12:34:56. */
  mac?: string;
  /** The network or switch name on the source platform. */
  network?: string;
  /** The source's own name for the model (e.g. 'vmxnet3', '82540EM'), for the report. */
  sourceModel?: string;
}

export interface GuestHints {
  /** The source platform's OS id (guestOS in VMX, OSType in VirtualBox, ...). */
  sourceId?: string;
  family?: 'linux' | 'windows' | 'bsd' | 'other';
  /** A readable description, e.g. 'Windows Server 2016 (64-bit)'. */
  description?: string;
  is64bit?: boolean;
}

export interface VmSnapshot {
  id: string;
  name: string;
  description?: string;
  /** Parent snapshot id; undefined for a root. */
  parent?: string;
  createdAt?: string;
  /** The snapshot the VM currently runs from. */
  current?: boolean;
}

export interface VmModel {
  name: string;
  /** The source platform the model was read from (vmware, ovf, virtualbox, hyperv, libvirt, disk). */
  sourcePlatform: string;
  /** The descriptor file the model came from. */
  sourceFile?: string;
  uuid?: string;
  firmware: Firmware;
  secureBoot?: boolean;
  /** Hyper-V generation, when the source is Hyper-V. */
  generation?: 1 | 2;
  cpus: number;
  coresPerSocket?: number;
  /** Bytes. */
  memory: number;
  controllers: DiskController[];
  disks: VmDisk[];
  cdroms: VmCdrom[];
  nics: VmNic[];
  guest: GuestHints;
  snapshots: VmSnapshot[];
  /** Source settings that no neutral field holds, kept for the report (never silently dropped). */
  unmapped: { key: string; value: string }[];
  /** Problems met while reading (e.g. a disk file missing). */
  warnings: string[];
}

/** What a target writer produced and what it had to change. */
export interface TranslationNote {
  /** What the source had, e.g. 'scsi0 (pvscsi)'. */
  from: string;
  /** What the target got, e.g. 'virtio-scsi', or 'dropped'. */
  to: string;
  why: string;
}

export const MiB = 1024 * 1024;

/** A fresh model with defaults, for readers to fill. */
export function emptyModel(name: string, sourcePlatform: string): VmModel {
  return {
    name,
    sourcePlatform,
    firmware: 'bios',
    cpus: 1,
    memory: 1024 * MiB,
    controllers: [],
    disks: [],
    cdroms: [],
    nics: [],
    guest: {},
    snapshots: [],
    unmapped: [],
    warnings: [],
  };
}

/** Names safe to use as file names on every platform (NAME.vmx, NAME-disk0.qcow2). */
export function safeVmName(name: string): string {
  const cleaned = name.replace(/[^A-Za-z0-9._-]+/g, '-').replace(/^[-.]+|[-.]+$/g, '');
  return cleaned.slice(0, 64) || 'vm';
}
