import { FileSource, readExact } from '../../disk/source.js';
import { type CheckResult, DEFAULT_MAX_METADATA_MEMORY, type OpenOptions } from '../../disk/types.js';
import { BITMAP_BLOCK_SIZE, decodeBatEntry, HEADER_SECTION_SIZE, PAYLOAD, SB_PRESENT, ZERO_GUID } from './layout.js';
import { readStructure } from './structure.js';

const VALID_PAYLOAD_STATES: number[] = Object.values(PAYLOAD);
const PAGE_ENTRIES = 8192;

/**
 * Checks a VHDX image without changing it: header and region table copies (CRC-32C), BAT
 * entries (valid states, reserved bits, inside the file, not inside the header section or other
 * regions, no two blocks sharing bytes). Structural damage that prevents opening is thrown.
 */
export async function checkVhdx(path: string, options: OpenOptions = {}): Promise<CheckResult> {
  const file = FileSource.open(path);
  try {
    const s = await readStructure(file, options.maxMetadataMemory ?? DEFAULT_MAX_METADATA_MEMORY);
    const result: CheckResult = {
      format: 'vhdx',
      filename: path,
      checkErrors: 0,
      corruptions: 0,
      leaks: 0,
      messages: [],
    };
    const corrupt = (msg: string) => {
      result.corruptions++;
      result.messages.push(msg);
    };
    for (const n of s.notes) corrupt(n);
    if (s.header.logGuid !== ZERO_GUID) {
      result.messages.push(
        `the log is dirty (log GUID {${s.header.logGuid}}); ${s.logEntriesReplayed} log entries were replayed in memory, the file was not changed`,
      );
    }
    const g = s.geometry;
    const size = s.source.size;
    const ranges: { start: number; end: number; what: string }[] = [
      { start: 0, end: HEADER_SECTION_SIZE, what: 'the header section' },
      { start: s.bat.fileOffset, end: s.bat.fileOffset + s.bat.length, what: 'the BAT region' },
      { start: s.metadata.fileOffset, end: s.metadata.fileOffset + s.metadata.length, what: 'the metadata region' },
    ];
    if (s.header.logGuid !== ZERO_GUID || s.header.logLength > 0) {
      ranges.push({ start: s.header.logOffset, end: s.header.logOffset + s.header.logLength, what: 'the log' });
    }
    const structural = ranges.length;
    let allocated = 0;
    let fragmented = 0;
    let prevEnd = -1;
    for (let first = 0; first < g.batEntries; first += PAGE_ENTRIES) {
      const count = Math.min(PAGE_ENTRIES, g.batEntries - first);
      const page = await readExact(s.source, s.bat.fileOffset + first * 8, count * 8, 'BAT');
      for (let i = 0; i < count; i++) {
        const idx = first + i;
        const e = decodeBatEntry(page, i * 8);
        const isBitmap = (idx + 1) % (g.chunkRatio + 1) === 0;
        if (e.reservedBits !== 0) corrupt(`BAT entry ${idx} has reserved bits set (0x${e.reservedBits.toString(16)})`);
        let needed = 0;
        let what = '';
        if (isBitmap) {
          if (e.state === SB_PRESENT) {
            if (!g.hasParent) corrupt(`BAT entry ${idx}: a sector bitmap block is present in an image without a parent`);
            needed = BITMAP_BLOCK_SIZE;
            what = 'sector bitmap block';
          } else if (e.state !== 0) corrupt(`BAT entry ${idx} has the invalid sector bitmap state ${e.state}`);
        } else {
          const block = idx - Math.floor(idx / (g.chunkRatio + 1));
          if (block >= g.payloadBlocks) {
            if (e.state !== 0) corrupt(`BAT entry ${idx} lies past the last payload block but is not empty`);
            continue;
          }
          if (!VALID_PAYLOAD_STATES.includes(e.state)) corrupt(`BAT entry ${idx} has the invalid payload block state ${e.state}`);
          else if (e.state === PAYLOAD.FULLY_PRESENT || e.state === PAYLOAD.PARTIALLY_PRESENT) {
            if (e.state === PAYLOAD.PARTIALLY_PRESENT && !g.hasParent) {
              corrupt(`BAT entry ${idx} is partially present in an image without a parent`);
            }
            needed = Math.min(g.blockSize, g.virtualSize - block * g.blockSize);
            what = `payload block ${block}`;
            allocated++;
            if (prevEnd >= 0 && e.offset !== prevEnd) fragmented++;
            prevEnd = e.offset + g.blockSize;
          }
        }
        if (needed === 0) continue;
        if (e.offset < HEADER_SECTION_SIZE) {
          corrupt(`BAT entry ${idx}: ${what} offset ${e.offset} lies inside the header section`);
        } else if (e.offset + needed > size) {
          corrupt(
            `BAT entry ${idx}: ${what} at offset ${e.offset} lies beyond the end of the file (${size} bytes); the image is probably truncated`,
          );
        } else ranges.push({ start: e.offset, end: e.offset + needed, what: `${what} (BAT entry ${idx})` });
      }
    }
    // Overlaps: sort by start; each range against the furthest-reaching one before it.
    const sorted = ranges.map((r, i) => ({ ...r, structural: i < structural })).sort((a, b) => a.start - b.start);
    let reach: (typeof sorted)[number] | null = null;
    for (const r of sorted) {
      if (reach && r.start < reach.end && !(r.structural && reach.structural)) {
        corrupt(`${r.what} at offset ${r.start} overlaps ${reach.what}`);
      }
      if (!reach || r.end > reach.end) reach = r;
    }
    result.totalClusters = g.payloadBlocks;
    result.allocatedClusters = allocated;
    result.fragmentedClusters = fragmented;
    result.imageEndOffset = Math.max(...ranges.map((r) => r.end));
    return result;
  } finally {
    await file.close();
  }
}
