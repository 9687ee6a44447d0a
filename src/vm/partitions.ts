/**
 * A look at a disk's partition table through the disk plane (any format, any chain): MBR (with
 * extended/logical partitions and the protective MBR of GPT disks) and GPT (header and entry array
 * CRC32 checked, the backup header used when the primary is damaged). Used by `inspect` and
 * `migrate` to cross-check the firmware a descriptor states against what the disk boots with.
 */
import { crc32 } from 'node:zlib';
import type { DiskReader } from '../disk/types.js';
import type { Firmware } from './model.js';

export interface Partition {
  /** Partition number as Linux names it: 1..4 primary, 5.. logical (MBR); 1.. entry order (GPT). */
  number: number;
  /** Bytes. */
  start: number;
  size: number;
  /** MBR: the type byte in lower-case hex without 0x ('83', 'ef'); GPT: the type GUID, upper case. */
  type: string;
  /** A readable name for the type, when known. */
  typeName?: string;
  /** GPT partition name. */
  name?: string;
  /** GPT unique partition GUID. */
  uuid?: string;
  /** MBR active flag, or GPT attribute bit 2 (legacy BIOS bootable). */
  bootable?: boolean;
  /** An EFI system partition. */
  esp: boolean;
  /** A GPT BIOS boot partition (GRUB's core image on a GPT disk booted by BIOS). */
  biosBoot: boolean;
}

export type BootHint = 'uefi' | 'bios' | 'either' | 'unknown';

export interface PartitionTable {
  scheme: 'gpt' | 'mbr' | 'none';
  sectorSize: number;
  /** MBR disk signature ('0x0dd3fc10') or GPT disk GUID. */
  id?: string;
  /** GPT: first and last usable LBA. */
  firstLba?: number;
  lastLba?: number;
  /** The MBR has code in its boot area (the first 440 bytes are not all zero). */
  mbrBootCode: boolean;
  partitions: Partition[];
  /** What the layout suggests the disk boots with. */
  bootHint: BootHint;
  bootReason: string;
  /** Damage or oddities found (bad CRC, backup header used, hybrid MBR, entries past the end). */
  warnings: string[];
}

const ESP_GUID = 'C12A7328-F81F-11D2-BA4B-00A0C93EC93B';
const BIOS_BOOT_GUID = '21686148-6449-6E6F-744E-656564454649';

const GPT_TYPES: Record<string, string> = {
  [ESP_GUID]: 'EFI System',
  [BIOS_BOOT_GUID]: 'BIOS boot',
  '0FC63DAF-8483-4772-8E79-3D69D8477DE4': 'Linux filesystem',
  '4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709': 'Linux root (x86-64)',
  '44479540-F297-41B2-9AF7-D131D5F0458A': 'Linux root (x86)',
  'BC13C2FF-59E6-4262-A352-B275FD6F7172': 'Linux extended boot',
  '0657FD6D-A4AB-43C4-84E5-0933C84B4F4F': 'Linux swap',
  'E6D6D379-F507-44C2-A23C-238F2A3DF928': 'Linux LVM',
  'A19D880F-05FC-4D3B-A006-743F0F84911E': 'Linux RAID',
  '933AC7E1-2EB4-4F13-B844-0E14E2AEF915': 'Linux home',
  'EBD0A0A2-B9E5-4433-87C0-68B6B72699C7': 'Microsoft basic data',
  'E3C9E316-0B5C-4DB8-817D-F92DF00215AE': 'Microsoft reserved',
  'DE94BBA4-06D1-4D40-A16A-BFD50179D6AC': 'Windows recovery environment',
  '5808C8AA-7E8F-42E0-85D2-E1E90434CFB3': 'Windows LDM metadata',
  'AF9B60A0-1431-4F62-BC68-3311714A69AD': 'Windows LDM data',
  '516E7CB4-6ECF-11D6-8FF8-00022D09712B': 'FreeBSD data',
  '83BD6B9D-7F41-11DC-BE0B-001560B84F0F': 'FreeBSD boot',
  '48465300-0000-11AA-AA11-00306543ECAC': 'Apple HFS/HFS+',
};

const MBR_TYPES: Record<string, string> = {
  '01': 'FAT12',
  '04': 'FAT16 <32M',
  '05': 'Extended',
  '06': 'FAT16',
  '07': 'HPFS/NTFS/exFAT',
  '0b': 'W95 FAT32',
  '0c': 'W95 FAT32 (LBA)',
  '0e': 'W95 FAT16 (LBA)',
  '0f': 'W95 Extended (LBA)',
  '27': 'Hidden NTFS WinRE',
  '82': 'Linux swap',
  '83': 'Linux',
  '85': 'Linux extended',
  '8e': 'Linux LVM',
  a5: 'FreeBSD',
  ee: 'GPT (protective)',
  ef: 'EFI (FAT-12/16/32)',
  fd: 'Linux raid autodetect',
};

const EXTENDED = new Set(['05', '0f', '85']);
/** A partition table with more entries than this is refused as damage (GPT allows any; real ones hold 128). */
const MAX_GPT_ENTRIES = 16384;
const MAX_LOGICAL = 256;

function guid(buf: Buffer, off: number): string {
  const h = (start: number, end: number, reverse: boolean) => {
    const part = Buffer.from(buf.subarray(off + start, off + end));
    if (reverse) part.reverse();
    return part.toString('hex');
  };
  return `${h(0, 4, true)}-${h(4, 6, true)}-${h(6, 8, true)}-${h(8, 10, false)}-${h(10, 16, false)}`.toUpperCase();
}

async function readAt(reader: DiskReader, offset: number, length: number): Promise<Buffer | undefined> {
  if (offset < 0 || offset + length > reader.virtualSize) return undefined;
  return reader.read(offset, length);
}

interface GptHeader {
  currentLba: number;
  backupLba: number;
  firstLba: number;
  lastLba: number;
  diskGuid: string;
  entriesLba: number;
  entryCount: number;
  entrySize: number;
  entriesCrc: number;
}

/** Reads and checks one GPT header at `lba`; returns why not when it is absent or damaged. */
async function readGptHeader(reader: DiskReader, lba: number, sector: number): Promise<GptHeader | string> {
  const buf = await readAt(reader, lba * sector, sector);
  if (!buf) return 'lies past the end of the disk';
  if (buf.toString('latin1', 0, 8) !== 'EFI PART') return 'has no EFI PART signature';
  const headerSize = buf.readUInt32LE(12);
  if (headerSize < 92 || headerSize > sector) return `has a bad header size ${headerSize}`;
  const stored = buf.readUInt32LE(16);
  const copy = Buffer.from(buf.subarray(0, headerSize));
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== stored) return 'has a bad header CRC32';
  const num = (o: number) => Number(buf.readBigUInt64LE(o));
  const h: GptHeader = {
    currentLba: num(24),
    backupLba: num(32),
    firstLba: num(40),
    lastLba: num(48),
    diskGuid: guid(buf, 56),
    entriesLba: num(72),
    entryCount: buf.readUInt32LE(80),
    entrySize: buf.readUInt32LE(84),
    entriesCrc: buf.readUInt32LE(88),
  };
  const sectors = Math.floor(reader.virtualSize / sector);
  if (h.currentLba !== lba) return `says it is at LBA ${h.currentLba}`;
  if (h.entrySize < 128 || h.entrySize % 8 !== 0 || h.entrySize > 4096) return `has a bad entry size ${h.entrySize}`;
  if (h.entryCount > MAX_GPT_ENTRIES) return `has too many entries (${h.entryCount})`;
  if (h.firstLba > h.lastLba || h.lastLba >= sectors) return `has a usable range ${h.firstLba}..${h.lastLba} outside the disk`;
  const arrayBytes = h.entryCount * h.entrySize;
  if (h.entriesLba * sector + arrayBytes > reader.virtualSize) return 'has its entry array past the end of the disk';
  return h;
}

async function readGpt(reader: DiskReader, sector: number, warnings: string[]): Promise<PartitionTable | undefined> {
  const sectors = Math.floor(reader.virtualSize / sector);
  const primary = await readGptHeader(reader, 1, sector);
  let header: GptHeader | undefined;
  let entries: Buffer | undefined;
  const loadEntries = async (h: GptHeader) => {
    const buf = await readAt(reader, h.entriesLba * sector, h.entryCount * h.entrySize);
    return buf && crc32(buf) === h.entriesCrc ? buf : undefined;
  };
  if (typeof primary !== 'string') {
    entries = await loadEntries(primary);
    if (entries) header = primary;
    else warnings.push('the primary GPT partition entries have a bad CRC32');
  }
  if (!header) {
    // The backup header sits at the disk's last LBA (or where the primary says, when it is readable).
    const candidates = [typeof primary !== 'string' ? primary.backupLba : -1, sectors - 1].filter((x) => x > 1);
    for (const lba of [...new Set(candidates)]) {
      const backup = await readGptHeader(reader, lba, sector);
      if (typeof backup === 'string') continue;
      const e = await loadEntries(backup);
      if (!e) continue;
      header = backup;
      entries = e;
      if (typeof primary === 'string')
        warnings.push(`the primary GPT header ${primary}; the backup GPT header at LBA ${lba} was used`);
      else warnings.push(`the backup GPT at LBA ${lba} was used`);
      break;
    }
    if (!header) {
      if (typeof primary === 'string' && !/signature/.test(primary))
        warnings.push(`the GPT header ${primary} and no usable backup was found`);
      if (typeof primary !== 'string') warnings.push('no usable backup GPT was found either');
      return undefined;
    }
  } else if (typeof primary !== 'string') {
    const backup = await readGptHeader(reader, primary.backupLba, sector);
    if (typeof backup === 'string') warnings.push(`the backup GPT header at LBA ${primary.backupLba} ${backup}`);
  }
  const partitions: Partition[] = [];
  for (let i = 0; i < header.entryCount; i++) {
    const off = i * header.entrySize;
    const e = entries!.subarray(off, off + header.entrySize);
    if (e.subarray(0, 16).every((b) => b === 0)) continue;
    const type = guid(e, 0);
    const first = Number(e.readBigUInt64LE(32));
    const last = Number(e.readBigUInt64LE(40));
    const attributes = e.readBigUInt64LE(48);
    const name = e.toString('utf16le', 56, 128).replace(/\0[\s\S]*$/, '');
    if (last < first || first < header.firstLba || last > header.lastLba) {
      warnings.push(
        `GPT entry ${i + 1} spans LBA ${first}..${last}, outside the usable range ${header.firstLba}..${header.lastLba}`,
      );
    }
    const p: Partition = {
      number: i + 1,
      start: first * sector,
      size: Math.max(0, last - first + 1) * sector,
      type,
      uuid: guid(e, 16),
      esp: type === ESP_GUID,
      biosBoot: type === BIOS_BOOT_GUID,
    };
    if (GPT_TYPES[type]) p.typeName = GPT_TYPES[type];
    if (name) p.name = name;
    if ((attributes & 4n) !== 0n) p.bootable = true;
    partitions.push(p);
  }
  return {
    scheme: 'gpt',
    sectorSize: sector,
    id: header.diskGuid,
    firstLba: header.firstLba,
    lastLba: header.lastLba,
    mbrBootCode: false,
    partitions,
    bootHint: 'unknown',
    bootReason: '',
    warnings,
  };
}

interface MbrEntry {
  active: number;
  type: string;
  lba: number;
  sectors: number;
}

function mbrEntries(buf: Buffer): MbrEntry[] {
  const out: MbrEntry[] = [];
  for (let i = 0; i < 4; i++) {
    const o = 446 + i * 16;
    out.push({
      active: buf[o]!,
      type: buf[o + 4]!.toString(16).padStart(2, '0'),
      lba: buf.readUInt32LE(o + 8),
      sectors: buf.readUInt32LE(o + 12),
    });
  }
  return out;
}

function mbrPartition(number: number, e: MbrEntry, base: number, sector: number): Partition {
  const p: Partition = {
    number,
    start: (base + e.lba) * sector,
    size: e.sectors * sector,
    type: e.type,
    esp: e.type === 'ef',
    biosBoot: false,
  };
  if (MBR_TYPES[e.type]) p.typeName = MBR_TYPES[e.type];
  if (e.active === 0x80) p.bootable = true;
  return p;
}

/** Reads the partition table of `reader`'s guest-visible content. Never throws on a damaged table. */
export async function readPartitionTable(reader: DiskReader): Promise<PartitionTable> {
  const warnings: string[] = [];
  const none = (why: string): PartitionTable => ({
    scheme: 'none',
    sectorSize: 512,
    mbrBootCode: false,
    partitions: [],
    bootHint: 'unknown',
    bootReason: why,
    warnings,
  });
  const mbr = await readAt(reader, 0, 512);
  if (!mbr) return none('the disk is smaller than one sector');
  const signature = mbr.readUInt16LE(510) === 0xaa55;
  const bootCode = !mbr.subarray(0, 440).every((b) => b === 0);
  const entries = signature ? mbrEntries(mbr) : [];
  const protective = entries.some((e) => e.type === 'ee');

  // GPT: at LBA 1 with 512-byte sectors, or 4 KiB sectors (LBA 1 at byte 4096).
  for (const sector of [512, 4096]) {
    const gpt = await readGpt(reader, sector, warnings);
    if (gpt) {
      if (!protective) warnings.push('the disk has a GPT but no protective MBR entry (type ee)');
      else if (entries.some((e) => e.type !== 'ee' && e.type !== '00'))
        warnings.push('hybrid MBR: the MBR lists partitions besides the protective one');
      gpt.mbrBootCode = bootCode;
      return withBootHint(gpt);
    }
  }
  if (!signature) return none('no MBR signature (55aa) and no GPT: no partition table');
  if (protective) {
    warnings.push('a protective MBR (type ee) but no readable GPT');
    return none('a protective MBR without a readable GPT');
  }
  const partitions: Partition[] = [];
  let extended: MbrEntry | undefined;
  entries.forEach((e, i) => {
    if (e.type === '00' || e.sectors === 0) return;
    if (e.active !== 0 && e.active !== 0x80) warnings.push(`MBR entry ${i + 1} has a bad boot flag 0x${e.active.toString(16)}`);
    partitions.push(mbrPartition(i + 1, e, 0, 512));
    if (EXTENDED.has(e.type) && !extended) extended = e;
  });
  if (extended) {
    // Logical partitions: a chain of EBRs, each relative to the extended partition's start.
    let next = 0;
    const seen = new Set<number>();
    for (let n = 5; n < 5 + MAX_LOGICAL; n++) {
      const ebrLba = extended.lba + next;
      if (seen.has(ebrLba)) {
        warnings.push(`the extended partition's EBR chain loops at LBA ${ebrLba}`);
        break;
      }
      seen.add(ebrLba);
      const ebr = await readAt(reader, ebrLba * 512, 512);
      if (ebr?.readUInt16LE(510) !== 0xaa55) {
        warnings.push(`the EBR at LBA ${ebrLba} is unreadable or has no signature`);
        break;
      }
      const [logical, link] = mbrEntries(ebr);
      if (logical && logical.type !== '00' && logical.sectors > 0) partitions.push(mbrPartition(n, logical, ebrLba, 512));
      if (!link || link.type === '00' || link.sectors === 0) break;
      next = link.lba;
    }
  }
  for (const p of partitions) {
    if (p.start + p.size > reader.virtualSize) warnings.push(`partition ${p.number} ends past the end of the disk`);
  }
  return withBootHint({
    scheme: 'mbr',
    sectorSize: 512,
    id: `0x${mbr.readUInt32LE(440).toString(16).padStart(8, '0')}`,
    mbrBootCode: bootCode,
    partitions,
    bootHint: 'unknown',
    bootReason: '',
    warnings,
  });
}

function withBootHint(t: PartitionTable): PartitionTable {
  const esp = t.partitions.some((p) => p.esp);
  if (t.scheme === 'gpt') {
    const biosBoot = t.partitions.some((p) => p.biosBoot);
    if (esp && biosBoot) {
      t.bootHint = 'either';
      t.bootReason = 'GPT with an EFI system partition and a BIOS boot partition';
    } else if (esp) {
      t.bootHint = 'uefi';
      t.bootReason = 'GPT with an EFI system partition and no BIOS boot partition';
    } else if (biosBoot) {
      t.bootHint = 'bios';
      t.bootReason = 'GPT with a BIOS boot partition and no EFI system partition';
    } else {
      t.bootHint = 'unknown';
      t.bootReason = 'GPT without an EFI system partition or a BIOS boot partition (a data disk?)';
    }
  } else if (t.scheme === 'mbr') {
    const active = t.partitions.some((p) => p.bootable);
    if (active && esp) {
      t.bootHint = 'either';
      t.bootReason = 'MBR with an active partition and an EFI system partition';
    } else if (active) {
      t.bootHint = 'bios';
      t.bootReason = 'MBR with an active partition';
    } else if (esp) {
      t.bootHint = 'uefi';
      t.bootReason = 'MBR with an EFI system partition and no active partition';
    } else if (t.mbrBootCode && t.partitions.length > 0) {
      t.bootHint = 'bios';
      t.bootReason = 'MBR with boot code and no EFI system partition';
    } else {
      t.bootHint = 'unknown';
      t.bootReason = 'MBR without an active or EFI system partition';
    }
  }
  return t;
}

/**
 * The warning to give when the descriptor's firmware disagrees with what the boot disk's layout
 * suggests; undefined when they agree or the layout says nothing.
 */
export function firmwareMismatch(firmware: Firmware, table: PartitionTable): string | undefined {
  if (table.bootHint === 'unknown' || table.bootHint === 'either' || table.bootHint === firmware) return undefined;
  return `the descriptor says ${firmware.toUpperCase()} but the boot disk looks ${table.bootHint.toUpperCase()}-bootable (${table.bootReason}); the migrated VM may not boot`;
}
