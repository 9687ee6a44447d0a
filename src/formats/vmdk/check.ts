/** `check` for VMDK: grain directories and tables against each other and the file, overlaps. */
import { CorruptImageError } from '../../disk/errors.js';
import { readExact } from '../../disk/source.js';
import type { CheckResult, OpenOptions } from '../../disk/types.js';
import type { SparseExtent } from './extent.js';
import { FLAG_RGD, SECTOR } from './layout.js';
import { readSparseHeader, VmdkReader } from './reader.js';

/** Largest sector bitmap check builds (covers a 256 GiB extent file); beyond it, grain-granular. */
const MAX_BITMAP_BYTES = 64 * 1024 * 1024;

/** Marks file ranges as used and reports ranges used twice. */
class UsageMap {
  private readonly bits: Uint8Array;
  private readonly unit: number;
  constructor(fileSize: number) {
    let unit = SECTOR;
    while (Math.ceil(fileSize / unit / 8) > MAX_BITMAP_BYTES) unit *= 2;
    this.unit = unit;
    this.bits = new Uint8Array(Math.ceil(fileSize / unit / 8) + 1);
  }
  /** True when [pos, pos + length) overlaps something marked before. */
  mark(pos: number, length: number): boolean {
    const first = Math.floor(pos / this.unit);
    const last = Math.floor((pos + length - 1) / this.unit);
    let clash = false;
    for (let u = first; u <= last; u++) {
      const byte = u >>> 3;
      if (byte >= this.bits.length) break;
      const bit = 1 << (u & 7);
      if (this.bits[byte]! & bit) clash = true;
      this.bits[byte]! |= bit;
    }
    return clash;
  }
}

export async function checkVmdk(path: string, options: OpenOptions): Promise<CheckResult> {
  const reader = await VmdkReader.open(path, { ...options, noBacking: true });
  const result: CheckResult = {
    format: 'vmdk',
    filename: path,
    checkErrors: 0,
    corruptions: 0,
    leaks: 0,
    totalClusters: 0,
    allocatedClusters: 0,
    compressedClusters: 0,
    messages: [],
  };
  const corrupt = (msg: string) => {
    result.corruptions++;
    if (result.messages.length < 1000) result.messages.push(`ERROR: ${msg}`);
  };
  try {
    for (const { start, sparse } of reader.sparseExtents()) {
      await checkExtent(sparse, start, result, corrupt);
    }
    if (reader.sparseExtents().length === 1) result.imageEndOffset = reader.sparseExtents()[0]!.sparse.source.size;
  } catch (err) {
    if (!(err instanceof CorruptImageError)) throw err;
    corrupt(err.message);
  } finally {
    await reader.close();
  }
  return result;
}

async function checkExtent(
  e: SparseExtent,
  guestStart: number,
  result: CheckResult,
  corrupt: (msg: string) => void,
): Promise<void> {
  const src = e.source;
  const name = src.name;
  const used = new UsageMap(src.size);
  const gtBytes = e.gtEntries * e.entrySize;
  result.totalClusters! += Math.ceil(e.length / e.grainBytes);
  used.mark(0, SECTOR);
  used.mark(e.gdOffset, e.gdEntries * e.entrySize);
  const tables = new Map<number, number>();
  // Compressed grains: the marker gives the stored length.
  const checkCompressed = async (pos: number, guest: number) => {
    if (pos + 12 > src.size) {
      corrupt(`${name}: compressed grain for guest offset ${guest} at file offset ${pos} lies beyond the end of the file`);
      return;
    }
    const length = e.hasMarkers ? 12 + (await src.read(pos, 12)).readUInt32LE(8) : SECTOR;
    if (pos + length > src.size) {
      corrupt(`${name}: compressed grain for guest offset ${guest} at file offset ${pos} runs past the end of the file`);
    } else if (used.mark(pos, length)) {
      corrupt(`${name}: compressed grain for guest offset ${guest} at file offset ${pos} overlaps another grain or metadata`);
    }
  };
  await e.walk(
    (gtIndex, offset) => {
      tables.set(gtIndex, offset);
      if (offset + gtBytes > src.size) {
        corrupt(`${name}: grain table ${gtIndex} at offset ${offset} lies beyond the end of the file (${src.size} bytes)`);
      } else if (used.mark(offset, gtBytes)) {
        corrupt(`${name}: grain table ${gtIndex} at offset ${offset} overlaps other metadata or data`);
      }
    },
    async (gtIndex, j, kind, pos) => {
      const guest = guestStart + (gtIndex * e.gtEntries + j) * e.grainBytes;
      result.allocatedClusters!++;
      if (kind === 'compressed') {
        result.compressedClusters!++;
        await checkCompressed(pos, guest);
        return;
      }
      if (pos + e.grainBytes > src.size && guest + e.grainBytes <= guestStart + e.length) {
        corrupt(`${name}: grain for guest offset ${guest} at file offset ${pos} lies beyond the end of the file`);
      } else if (used.mark(pos, e.grainBytes)) {
        corrupt(`${name}: grain for guest offset ${guest} at file offset ${pos} overlaps another grain or metadata`);
      }
    },
  );
  // The redundant grain directory must describe the same tables.
  if (e.dialect === 'kdmv') {
    const { header } = await readSparseHeader(src);
    if ((header.flags & FLAG_RGD) !== 0 && header.rgdOffset > 0 && !e.compressed) {
      const rgd = await readExact(src, header.rgdOffset * SECTOR, e.gdEntries * 4, 'redundant grain directory');
      for (let i = 0; i < e.gdEntries; i++) {
        const r = rgd.readUInt32LE(i * 4) * SECTOR;
        const p = tables.get(i) ?? 0;
        if ((r === 0) !== (p === 0)) {
          corrupt(`${name}: grain directory and redundant grain directory disagree about grain table ${i}`);
        } else if (r !== 0 && r + gtBytes <= src.size && p + gtBytes <= src.size) {
          const [a, b] = [await e.readTable(p), await e.readTable(r)];
          if (!a.equals(b)) corrupt(`${name}: grain table ${i} differs from its redundant copy`);
        }
      }
    }
  }
}
