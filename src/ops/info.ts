import { statSync } from 'node:fs';
import { type OpenImageOptions, openImage } from '../disk/registry.js';
import type { DiskReader, SnapshotInfo } from '../disk/types.js';

/** qemu-img info --output=json's fields, with the same names. */
export interface ImageInfo {
  'virtual-size': number;
  filename: string;
  format: string;
  'actual-size': number;
  'cluster-size'?: number;
  'dirty-flag'?: boolean;
  encrypted?: boolean;
  'backing-filename'?: string;
  'full-backing-filename'?: string;
  'backing-filename-format'?: string;
  snapshots?: {
    id: string;
    name: string;
    'vm-state-size': number;
    'date-sec': number;
    'date-nsec': number;
    'vm-clock-sec': number;
    'vm-clock-nsec': number;
    icount?: number;
  }[];
  'format-specific'?: { type: string; data: Record<string, unknown> };
  /** vmferry's addition: every file the image is made of. */
  files?: string[];
}

function allocatedBytes(path: string): number {
  try {
    return statSync(path).blocks * 512;
  } catch {
    return 0;
  }
}

function snapshotJson(s: SnapshotInfo) {
  return {
    id: s.id,
    name: s.name,
    'vm-state-size': s.vmStateSize,
    'date-sec': s.dateSec,
    'date-nsec': s.dateNsec,
    'vm-clock-sec': Math.floor(s.vmClockNsec / 1e9),
    'vm-clock-nsec': s.vmClockNsec % 1e9,
    ...(s.icount !== undefined ? { icount: s.icount } : {}),
  };
}

/** Describes an opened image the way qemu-img info does. */
export function describeImage(reader: DiskReader): ImageInfo {
  const d = reader.details;
  const files = [reader.filename, ...(d.extraFiles ?? [])];
  const info: ImageInfo = {
    'virtual-size': reader.virtualSize,
    filename: reader.filename,
    format: reader.format,
    'actual-size': files.reduce((sum, f) => sum + allocatedBytes(f), 0),
  };
  if (d.clusterSize !== undefined) info['cluster-size'] = d.clusterSize;
  if (d.encrypted) info.encrypted = true;
  if (d.backingFilename !== undefined) {
    info['backing-filename'] = d.backingFilename;
    if (d.fullBackingFilename !== undefined) info['full-backing-filename'] = d.fullBackingFilename;
    if (d.backingFormat !== undefined) info['backing-filename-format'] = d.backingFormat;
  }
  if (d.snapshots && d.snapshots.length > 0) info.snapshots = d.snapshots.map(snapshotJson);
  if (d.formatSpecific) info['format-specific'] = d.formatSpecific;
  if (d.dirtyFlag !== undefined) info['dirty-flag'] = d.dirtyFlag;
  if (files.length > 1) info.files = files;
  return info;
}

/** `info`: the image alone (its backing files are named, not opened, as qemu-img info does). */
export async function imageInfo(path: string, options: OpenImageOptions = {}): Promise<ImageInfo> {
  const reader = await openImage(path, { ...options, noBacking: true });
  try {
    return describeImage(reader);
  } finally {
    await reader.close();
  }
}

/** `info --backing-chain`: the image and every image below it, top first. */
export async function imageInfoChain(path: string, options: OpenImageOptions = {}): Promise<ImageInfo[]> {
  const reader = await openImage(path, options);
  try {
    const out: ImageInfo[] = [];
    for (let r: DiskReader | undefined = reader; r; r = r.backing) out.push(describeImage(r));
    return out;
  } finally {
    await reader.close();
  }
}
