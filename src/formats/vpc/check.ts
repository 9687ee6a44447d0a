import { VmferryError } from '../../disk/errors.js';
import type { CheckResult, OpenOptions } from '../../disk/types.js';
import { BAT_UNUSED, bitmapSize, DISK_FIXED, decodeFooter, FOOTER_SIZE, isFooterCookie, SECTOR } from './layout.js';
import { VpcReader } from './reader.js';

/**
 * Consistency of a VHD: the footer copies, and every BAT entry (inside the file, clear of the
 * metadata, no two blocks overlapping). qemu-img has no check for vpc; the fields follow its
 * qcow2 output.
 */
export async function checkVpc(path: string, options: OpenOptions): Promise<CheckResult> {
  const reader = await VpcReader.open(path, { ...options, noBacking: true });
  const result: CheckResult = { format: 'vpc', filename: path, checkErrors: 0, corruptions: 0, leaks: 0, messages: [] };
  try {
    const size = reader.source.size;
    result.imageEndOffset = size;
    const corrupt = (msg: string) => {
      result.corruptions++;
      result.messages.push(`ERROR ${msg}`);
    };
    if (reader.diskType === DISK_FIXED) {
      result.totalClusters = Math.ceil(reader.virtualSize / 4096);
      result.allocatedClusters = result.totalClusters;
      if (reader.footerPlace.length !== FOOTER_SIZE) result.messages.push('Warning: 511-byte footer (an old writer)');
      return result;
    }
    // A dynamic disk keeps a second footer at the end of the file.
    if (reader.footerPlace.offset === 0) {
      const tail = await reader.source.read(size - FOOTER_SIZE, FOOTER_SIZE);
      if (!isFooterCookie(tail)) corrupt('the footer at the end of the file is missing');
      else {
        try {
          decodeFooter(tail, path);
        } catch (err) {
          if (!(err instanceof VmferryError)) throw err;
          corrupt(`the footer at the end of the file is damaged: ${err.message}`);
        }
      }
    } else {
      corrupt('the footer copy at the start of the file is missing or damaged (the one at the end was used)');
    }
    const header = reader.header!;
    const bat = reader.bat!;
    const blockBytes = bitmapSize(header.blockSize) + header.blockSize;
    const metaEnd = header.tableOffset + Math.ceil((header.maxTableEntries * 4) / SECTOR) * SECTOR;
    const usedBlocks = Math.ceil(reader.virtualSize / header.blockSize);
    result.totalClusters = usedBlocks;
    const starts: number[] = [];
    let allocated = 0;
    let fragmented = 0;
    let previous = -1;
    await bat.forEach((index, entry) => {
      if (entry === BAT_UNUSED) return;
      allocated++;
      const start = entry * SECTOR;
      const end = start + blockBytes;
      if (index >= usedBlocks) corrupt(`BAT entry ${index} is allocated beyond the virtual size`);
      if (end > size) {
        corrupt(`block ${index} at offset ${start} extends beyond the end of the file (${size} bytes)`);
        return;
      }
      if (start < metaEnd && end > FOOTER_SIZE) {
        corrupt(`block ${index} at offset ${start} overlaps the VHD header or block allocation table`);
        return;
      }
      if (previous >= 0 && start !== previous + blockBytes) fragmented++;
      previous = start;
      starts.push(start);
    });
    starts.sort((a, b) => a - b);
    for (let i = 1; i < starts.length; i++) {
      if (starts[i]! < starts[i - 1]! + blockBytes) {
        corrupt(`blocks at offsets ${starts[i - 1]} and ${starts[i]} overlap`);
      }
    }
    result.allocatedClusters = allocated;
    result.fragmentedClusters = fragmented;
    return result;
  } finally {
    await reader.close();
  }
}
