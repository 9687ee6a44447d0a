/** Output size estimates as `qemu-img measure -O qcow2` computes them. */
import { flatExtents } from '../../disk/chain.js';
import type { CreateOptions, DiskReader, MeasureResult } from '../../disk/types.js';
import { parseCreateOptions } from './writer.js';

const roundUp = (n: number, m: number) => Math.ceil(n / m) * m;

/** Refcount blocks and table clusters needed to count `clusters` clusters and themselves. */
export function refcountMetadataSize(clusters: number, clusterSize: number, refcountOrder: number): number {
  const blocksPerTableCluster = clusterSize / 8;
  const refcountsPerBlock = (clusterSize * 8) / 2 ** refcountOrder;
  let table = 0;
  let blocks = 0;
  let n = 0;
  let last: number;
  do {
    last = n;
    blocks = Math.ceil((clusters + table + blocks) / refcountsPerBlock);
    table = Math.ceil(blocks / blocksPerTableCluster);
    n = clusters + blocks + table;
  } while (n !== last);
  return (blocks + table) * clusterSize;
}

/** Size of a fully allocated image: header, L2 and L1 tables, refcounts and all data clusters. */
export function fullyAllocatedSize(totalSize: number, clusterSize: number, refcountOrder: number, extL2: boolean): number {
  const aligned = roundUp(totalSize, clusterSize);
  const l2e = extL2 ? 16 : 8;
  let meta = clusterSize; // header
  const nl2e = roundUp(aligned / clusterSize, clusterSize / l2e);
  meta += nl2e * l2e;
  const nl1e = roundUp((nl2e * l2e) / clusterSize, clusterSize / 8);
  meta += nl1e * 8;
  meta += refcountMetadataSize((meta + aligned) / clusterSize, clusterSize, refcountOrder);
  return meta + aligned;
}

export async function measureQcow2(
  source: DiskReader | undefined,
  virtualSize: number,
  options: CreateOptions,
): Promise<MeasureResult> {
  // qemu-img measure answers even for sizes create would refuse (L1 above 32 MiB).
  const layout = parseCreateOptions(virtualSize, options, true);
  const cs = layout.clusterSize;
  const size = roundUp(source ? source.virtualSize : virtualSize, cs);
  let required = size;
  if (source) {
    // Clusters that hold data anywhere in the source's chain; zero and unallocated ranges are free.
    required = 0;
    let skipUntil = 0;
    for await (const e of flatExtents(source)) {
      if (e.kind !== 'data') continue;
      const end = e.offset + e.length;
      if (end <= skipUntil) continue;
      const start = Math.max(e.offset, skipUntil);
      skipUntil = roundUp(end, cs);
      required += skipUntil - Math.floor(start / cs) * cs;
    }
  }
  const full = fullyAllocatedSize(size, cs, layout.refcountOrder, layout.extL2);
  const result: MeasureResult = { required: full - size + required, fullyAllocated: full };
  // qemu shows the bitmaps line when source and target both support persistent bitmaps.
  if (source?.format === 'qcow2' && layout.version === 3) result.bitmaps = 0;
  return result;
}
