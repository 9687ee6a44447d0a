import { flatExtents } from '../disk/chain.js';
import type { DiskReader, DiskWriter, Extent } from '../disk/types.js';
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
  /**
   * The target's backing image (convert -B): clusters equal to it are left unallocated, and
   * zeros over its data are written as explicit zeros.
   */
  baseline?: DiskReader;
  /** Walk only the source's own layer (its backing is the baseline): unallocated stays unallocated. */
  topLayerOnly?: boolean;
}

export interface CopyStats {
  virtualSize: number;
  dataBytes: number;
  zeroBytes: number;
}

const DEFAULT_CHUNK = 4 * 1024 * 1024;

type UnitKind = 'data' | 'zero' | 'same';

/**
 * Copies guest content from a reader to a writer: zero ranges become zero() calls, data ranges
 * are read in cluster-aligned chunks and every all-zero cluster inside them is recorded as zero,
 * never written as data.
 */
export async function copyDisk(reader: DiskReader, writer: DiskWriter, options: CopyOptions = {}): Promise<CopyStats> {
  const unit = Math.max(512, writer.clusterSize);
  const chunk = Math.max(unit, Math.floor((options.chunkSize ?? DEFAULT_CHUNK) / unit) * unit);
  const total = reader.virtualSize;
  const stats: CopyStats = { virtualSize: total, dataBytes: 0, zeroBytes: 0 };
  const baseline = options.baseline;
  let done = 0;
  const report = () => options.onProgress?.({ done, total });
  const buf = Buffer.allocUnsafe(chunk);
  const baseBuf = baseline ? Buffer.allocUnsafe(chunk) : null;

  const extents: AsyncIterable<Extent> = options.topLayerOnly ? reader.extents() : flatExtents(reader);
  for await (const ext of extents) {
    const end = ext.offset + ext.length;
    if (ext.kind === 'unallocated') {
      // Only reached with topLayerOnly: the target's backing supplies these bytes.
      done += ext.length;
      report();
      continue;
    }
    if (ext.kind === 'zero') {
      if (baseline) await zeroOverBaseline(baseline, writer, ext.offset, end);
      else await writer.zero(ext.offset, ext.length);
      stats.zeroBytes += ext.length;
      done += ext.length;
      report();
      continue;
    }
    let pos = ext.offset;
    while (pos < end) {
      // Chunk ends fall on the writer's cluster boundaries so zero detection sees whole clusters.
      const alignedEnd = Math.min(end, (Math.floor(pos / unit) + Math.floor(chunk / unit)) * unit);
      const len = alignedEnd > pos ? alignedEnd - pos : Math.min(end - pos, unit - (pos % unit));
      const data = await reader.read(pos, len, buf.subarray(0, len));
      const base = baseline && baseBuf ? await readBaseline(baseline, pos, len, baseBuf) : null;
      await writeUnits(writer, pos, data, base, unit, stats);
      pos += len;
      done += len;
      report();
    }
  }
  return stats;
}

/** The baseline's bytes at [pos, pos + len), zeros past its end. */
async function readBaseline(baseline: DiskReader, pos: number, len: number, buf: Buffer): Promise<Buffer> {
  const out = buf.subarray(0, len);
  const inside = Math.max(0, Math.min(len, baseline.virtualSize - pos));
  if (inside > 0) await baseline.read(pos, inside, out.subarray(0, inside));
  out.fill(0, inside);
  return out;
}

/** A zero range over a backing image: explicit zeros only where the backing has data. */
async function zeroOverBaseline(baseline: DiskReader, writer: DiskWriter, from: number, to: number): Promise<void> {
  const limit = Math.min(to, baseline.virtualSize);
  if (limit <= from) return;
  for await (const be of flatExtents(baseline, from, limit)) {
    if (be.kind === 'data') await writer.zero(be.offset, be.length);
  }
}

/** Splits `data` (at guest offset `pos`) into runs of data / zero / same-as-baseline clusters. */
async function writeUnits(
  writer: DiskWriter,
  pos: number,
  data: Buffer,
  base: Buffer | null,
  unit: number,
  stats: CopyStats,
): Promise<void> {
  let runKind: UnitKind | null = null;
  let runStart = 0;
  const flush = async (until: number) => {
    if (runKind === 'data') {
      await writer.write(pos + runStart, data.subarray(runStart, until));
      stats.dataBytes += until - runStart;
    } else if (runKind === 'zero') {
      await writer.zero(pos + runStart, until - runStart);
      stats.zeroBytes += until - runStart;
    }
  };
  let i = 0;
  while (i < data.length) {
    // Cluster boundaries are guest offsets, so the first piece may be short.
    const next = Math.min(data.length, (Math.floor((pos + i) / unit) + 1) * unit - pos);
    let kind: UnitKind;
    if (base && data.compare(base, i, next, i, next) === 0) kind = 'same';
    else if (isZero(data, i, next)) kind = 'zero';
    else kind = 'data';
    if (kind !== runKind) {
      await flush(i);
      runKind = kind;
      runStart = i;
    }
    i = next;
  }
  await flush(data.length);
}
