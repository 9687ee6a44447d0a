import { flatExtents } from '../disk/chain.js';
import type { DiskReader, DiskWriter } from '../disk/types.js';
import { isZero } from '../disk/zero.js';

export interface CopyProgress {
  /** Guest bytes dealt with so far (zero ranges count as soon as they are recorded). */
  done: number;
  total: number;
}

export interface CopyOptions {
  /** Largest read, bytes; rounded to the writer's cluster size. */
  chunkSize?: number;
  onProgress?: (p: CopyProgress) => void;
  /** Copy only this layer's own allocation (the target has the same backing image). */
  topLayerOnly?: boolean;
}

export interface CopyStats {
  virtualSize: number;
  dataBytes: number;
  zeroBytes: number;
}

const DEFAULT_CHUNK = 4 * 1024 * 1024;

/**
 * Copies guest content from a reader to a writer: zero and unallocated ranges become zero()
 * calls, data ranges are read in cluster-aligned chunks and every all-zero cluster inside them
 * is recorded as zero, never written as data.
 */
export async function copyDisk(reader: DiskReader, writer: DiskWriter, options: CopyOptions = {}): Promise<CopyStats> {
  const unit = Math.max(512, writer.clusterSize);
  const chunk = Math.max(unit, Math.floor((options.chunkSize ?? DEFAULT_CHUNK) / unit) * unit);
  const total = reader.virtualSize;
  const stats: CopyStats = { virtualSize: total, dataBytes: 0, zeroBytes: 0 };
  let done = 0;
  const report = () => options.onProgress?.({ done, total });
  const buf = Buffer.allocUnsafe(chunk);

  const extents = options.topLayerOnly ? topLayer(reader) : flatExtents(reader);
  for await (const ext of extents) {
    const end = ext.offset + ext.length;
    if (ext.kind !== 'data') {
      if (!options.topLayerOnly || ext.kind === 'zero') await writer.zero(ext.offset, ext.length);
      stats.zeroBytes += ext.length;
      done += ext.length;
      report();
      continue;
    }
    let pos = ext.offset;
    while (pos < end) {
      // Align chunk ends to the writer's clusters so zero detection sees whole clusters.
      const alignedEnd = Math.min(end, (Math.floor(pos / unit) + Math.floor(chunk / unit)) * unit);
      const len = alignedEnd > pos ? alignedEnd - pos : Math.min(end - pos, unit - (pos % unit));
      const data = await reader.read(pos, len, buf.subarray(0, len));
      await writeNonZero(writer, pos, data, unit, stats);
      pos += len;
      done += len;
      report();
    }
  }
  return stats;
}

async function* topLayer(reader: DiskReader) {
  yield* reader.extents();
}

/** Writes the runs of non-zero clusters of `data` (which starts at guest offset `pos`). */
async function writeNonZero(writer: DiskWriter, pos: number, data: Buffer, unit: number, stats: CopyStats): Promise<void> {
  let runStart = -1;
  let zeroStart = -1;
  let i = 0;
  while (i < data.length) {
    // Cluster boundaries are in guest offsets, so the first piece may be short.
    const next = Math.min(data.length, (Math.floor((pos + i) / unit) + 1) * unit - pos);
    const zero = isZero(data, i, next);
    if (zero) {
      if (runStart >= 0) {
        await writer.write(pos + runStart, data.subarray(runStart, i));
        stats.dataBytes += i - runStart;
        runStart = -1;
      }
      if (zeroStart < 0) zeroStart = i;
    } else {
      if (zeroStart >= 0) {
        await writer.zero(pos + zeroStart, i - zeroStart);
        stats.zeroBytes += i - zeroStart;
        zeroStart = -1;
      }
      if (runStart < 0) runStart = i;
    }
    i = next;
  }
  if (runStart >= 0) {
    await writer.write(pos + runStart, data.subarray(runStart));
    stats.dataBytes += data.length - runStart;
  }
  if (zeroStart >= 0) {
    await writer.zero(pos + zeroStart, data.length - zeroStart);
    stats.zeroBytes += data.length - zeroStart;
  }
}
