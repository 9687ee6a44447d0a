import { flatExtents } from '../../disk/chain.js';
import type { CreateOptions, DiskReader, MeasureResult } from '../../disk/types.js';
import { SECTOR, SPLIT_BYTES } from './layout.js';
import { GRAIN_SECTORS, parseCreateOptions, sparseLayout } from './writer.js';

/** Bytes a conversion to vmdk needs, from the source's allocation at grain granularity. */
export async function measureVmdk(source: DiskReader, virtualSize: number, options: CreateOptions): Promise<MeasureResult> {
  const s = parseCreateOptions(options);
  const size = Math.ceil(virtualSize / SECTOR) * SECTOR;
  const grainBytes = GRAIN_SECTORS * SECTOR;
  const totalGrains = Math.ceil(size / grainBytes);
  if (s.subformat === 'monolithicFlat' || s.subformat === 'twoGbMaxExtentFlat') {
    return { required: size, fullyAllocated: size };
  }
  let grains = 0;
  let last = -1;
  for await (const e of flatExtents(source, 0, Math.min(size, source.virtualSize))) {
    if (e.kind !== 'data') continue;
    const g0 = Math.max(Math.floor(e.offset / grainBytes), last + 1);
    const g1 = Math.floor((e.offset + e.length - 1) / grainBytes);
    if (g1 >= g0) grains += g1 - g0 + 1;
    last = Math.max(last, g1);
  }
  if (s.subformat === 'streamOptimized') {
    // Worst case: every grain incompressible (marker + deflate's stored-block overhead).
    const perGrain = grainBytes + 2 * SECTOR;
    const meta = (n: number) =>
      grainBytes + Math.ceil(n / 512) * 2560 + Math.ceil(size / grainBytes / 512 / 128) * SECTOR + 4 * SECTOR;
    return { required: meta(grains) + grains * perGrain, fullyAllocated: meta(totalGrains) + totalGrains * perGrain };
  }
  const extentSize = s.subformat === 'twoGbMaxExtentSparse' ? SPLIT_BYTES : size;
  let overhead = 0;
  for (let pos = 0; pos < size; pos += extentSize) {
    overhead += sparseLayout(Math.ceil(Math.min(extentSize, size - pos) / SECTOR)).grainOffset * SECTOR;
  }
  return { required: overhead + grains * grainBytes, fullyAllocated: overhead + totalGrains * grainBytes };
}
