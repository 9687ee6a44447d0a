import type { CheckResult, OpenOptions } from '../../disk/types.js';
import { BLOCK_FREE, BLOCK_ZERO, VDI_TYPE_FIXED } from './layout.js';
import { VdiReader } from './reader.js';

/**
 * Block map consistency, as qemu-img check does it for vdi: every index below the allocated
 * count and inside the file, no index used twice, the allocated count right.
 */
export async function checkVdi(path: string, options: OpenOptions): Promise<CheckResult> {
  const reader = await VdiReader.open(path, { ...options, noBacking: true });
  const result: CheckResult = { format: 'vdi', filename: path, checkErrors: 0, corruptions: 0, leaks: 0, messages: [] };
  try {
    const h = reader.header;
    const size = reader.source.size;
    const corrupt = (msg: string) => {
      result.corruptions++;
      result.messages.push(`ERROR: ${msg}`);
    };
    // One bit per valid index (indices at or above the allocated count are reported, not marked).
    const owner = new Map<number, number>();
    const seen = new Uint8Array(Math.ceil(Math.min(h.blocks, h.blocksAllocated) / 8));
    let inUse = 0;
    let fragmented = 0;
    let previous = -2;
    await reader.map.forEach((block, index) => {
      if (index === BLOCK_FREE || index === BLOCK_ZERO) return;
      if (index >= h.blocks || index >= h.blocksAllocated) {
        corrupt(`block index ${index} (block ${block}) too large, is ${index}, should be < ${h.blocksAllocated}`);
        return;
      }
      const end = reader.blockPosition(index) + Math.min(h.blockSize, h.diskSize - block * h.blockSize);
      if (end > size && h.imageType !== VDI_TYPE_FIXED) {
        corrupt(`block ${block} (index ${index}) lies beyond the end of the file (${size} bytes)`);
      } else if (end > size) {
        corrupt(`static image is truncated: block ${block} lies beyond the end of the file (${size} bytes)`);
      }
      if (seen[index >> 3]! & (1 << (index & 7))) {
        corrupt(`block index ${index} used by block ${block} is also used by block ${owner.get(index) ?? '?'}`);
        return;
      }
      seen[index >> 3] = seen[index >> 3]! | (1 << (index & 7));
      if (owner.size < 1024) owner.set(index, block);
      if (index !== previous + 1 && previous >= 0) fragmented++;
      previous = index;
      inUse++;
    });
    if (inUse !== h.blocksAllocated) {
      corrupt(`allocated blocks mismatch, is ${inUse}, should be ${h.blocksAllocated}`);
    }
    result.totalClusters = h.blocks;
    result.allocatedClusters = inUse;
    result.fragmentedClusters = fragmented;
    result.imageEndOffset = size;
    return result;
  } finally {
    await reader.close();
  }
}
