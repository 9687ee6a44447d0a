import { basename, resolve } from 'node:path';
import { CorruptImageError, MissingFileError, UnsafeReferenceError } from '../../disk/errors.js';
import { MappedDiskReader, type Segment } from '../../disk/mapped.js';
import { resolveReference } from '../../disk/refs.js';
import { FileSource, readExact } from '../../disk/source.js';
import {
  DEFAULT_MAX_METADATA_MEMORY,
  type DiskReader,
  type FormatDetails,
  MAX_CHAIN_DEPTH,
  type OpenOptions,
} from '../../disk/types.js';
import {
  type BatEntry,
  BITMAP_BLOCK_SIZE,
  bitmapIndex,
  decodeBatEntry,
  HEADER_SECTION_SIZE,
  PAYLOAD,
  parseGuidText,
  payloadIndex,
  SB_PRESENT,
  ZERO_GUID,
} from './layout.js';
import { readStructure, type VhdxStructure } from './structure.js';

/** BAT entries per cached page (64 KiB of table). */
const PAGE_ENTRIES = 8192;

/** The parent an image asks for, as its locator stores it. */
export interface ParentReference {
  /** What details.backingFilename shows: relative_path, else absolute_win32_path, else volume_path. */
  display: string;
  relativePath?: string;
  absoluteWin32Path?: string;
  volumePath?: string;
  linkage: string | null;
  linkage2: string | null;
}

export function parentReference(s: VhdxStructure): ParentReference | null {
  const loc = s.parentLocator;
  if (!loc) return null;
  const relativePath = loc.entries.get('relative_path');
  const absoluteWin32Path = loc.entries.get('absolute_win32_path');
  const volumePath = loc.entries.get('volume_path');
  const display = relativePath ?? absoluteWin32Path ?? volumePath;
  if (!display) throw new CorruptImageError('parent locator names no parent path', s.source.name);
  const link = (k: string) => {
    const v = loc.entries.get(k);
    if (v === undefined) return null;
    const g = parseGuidText(v);
    if (!g) throw new CorruptImageError(`parent locator ${k} '${v}' is not a GUID`, s.source.name);
    return g;
  };
  return {
    display,
    relativePath,
    absoluteWin32Path,
    volumePath,
    linkage: link('parent_linkage'),
    linkage2: link('parent_linkage2'),
  };
}

/** Reads fixed, dynamic and differencing VHDX; a dirty log is replayed in memory. */
export class VhdxReader extends MappedDiskReader {
  readonly format = 'vhdx';
  readonly virtualSize: number;
  readonly details: FormatDetails;
  override readonly backing?: DiskReader;
  readonly dataWriteGuid: string;

  private readonly pages = new Map<number, Buffer>();
  private readonly bitmaps = new Map<number, Buffer>();
  private readonly maxPages: number;
  private readonly maxBitmaps: number;

  private constructor(
    readonly filename: string,
    readonly structure: VhdxStructure,
    backing: DiskReader | undefined,
    details: FormatDetails,
    budget: number,
  ) {
    super();
    this.virtualSize = structure.geometry.virtualSize;
    this.backing = backing;
    this.details = details;
    this.dataWriteGuid = structure.header.dataWriteGuid;
    this.maxPages = Math.max(2, Math.floor(budget / 2 / (PAGE_ENTRIES * 8)));
    this.maxBitmaps = Math.max(2, Math.floor(budget / 2 / BITMAP_BLOCK_SIZE));
  }

  static async open(path: string, options: OpenOptions = {}): Promise<VhdxReader> {
    const file = FileSource.open(path);
    let backing: DiskReader | undefined;
    try {
      const budget = options.maxMetadataMemory ?? DEFAULT_MAX_METADATA_MEMORY;
      const s = await readStructure(file, budget);
      const details: FormatDetails = { clusterSize: s.params.blockSize };
      if (s.header.logGuid !== ZERO_GUID) details.dirtyFlag = true;
      const parent = parentReference(s);
      if (parent) {
        details.backingFilename = parent.display;
        details.backingFormat = 'vhdx';
        if (!options.noBacking) {
          const parentPath = findParent(path, parent, options);
          details.fullBackingFilename = parentPath;
          backing = await openParent(parentPath, options);
          checkLinkage(path, parentPath, parent, backing);
        }
      }
      return new VhdxReader(path, s, backing, details, budget);
    } catch (err) {
      await backing?.close().catch(() => {});
      await file.close();
      throw err;
    }
  }

  /** The BAT entry at `index`, read through a bounded page cache. */
  async batEntry(index: number): Promise<BatEntry> {
    const page = await this.batPage(Math.floor(index / PAGE_ENTRIES));
    return decodeBatEntry(page, (index % PAGE_ENTRIES) * 8);
  }

  private async batPage(n: number): Promise<Buffer> {
    const hit = this.pages.get(n);
    if (hit) {
      this.pages.delete(n);
      this.pages.set(n, hit);
      return hit;
    }
    const s = this.structure;
    const first = n * PAGE_ENTRIES;
    const count = Math.min(PAGE_ENTRIES, s.geometry.batEntries - first);
    const buf = await readExact(s.source, s.bat.fileOffset + first * 8, count * 8, 'BAT');
    if (this.pages.size >= this.maxPages) this.pages.delete(this.pages.keys().next().value!);
    this.pages.set(n, buf);
    return buf;
  }

  private async bitmap(chunk: number): Promise<Buffer> {
    const hit = this.bitmaps.get(chunk);
    if (hit) {
      this.bitmaps.delete(chunk);
      this.bitmaps.set(chunk, hit);
      return hit;
    }
    const s = this.structure;
    const idx = bitmapIndex(s.geometry, chunk);
    const e = await this.batEntry(idx);
    if (e.state !== SB_PRESENT) {
      throw new CorruptImageError(
        `chunk ${chunk} has partially present blocks but its sector bitmap (BAT entry ${idx}) is not present`,
        this.filename,
      );
    }
    this.checkPlacement(idx, e, BITMAP_BLOCK_SIZE, 'sector bitmap block');
    const buf = await s.source.read(e.offset, BITMAP_BLOCK_SIZE);
    if (this.bitmaps.size >= this.maxBitmaps) this.bitmaps.delete(this.bitmaps.keys().next().value!);
    this.bitmaps.set(chunk, buf);
    return buf;
  }

  private checkPlacement(index: number, e: BatEntry, needed: number, what: string): void {
    const size = this.structure.source.size;
    if (e.offset < HEADER_SECTION_SIZE) {
      throw new CorruptImageError(`BAT entry ${index}: ${what} offset ${e.offset} lies inside the header section`, this.filename);
    }
    if (e.offset + needed > size) {
      throw new CorruptImageError(
        `BAT entry ${index}: ${what} at offset ${e.offset} (${needed} bytes) lies beyond the end of the file (${size} bytes); the image is truncated or corrupt`,
        this.filename,
      );
    }
  }

  protected async segment(offset: number, maxLength: number): Promise<Segment> {
    const g = this.structure.geometry;
    const bs = g.blockSize;
    const block = Math.floor(offset / bs);
    const blockStart = block * bs;
    const inBlock = offset - blockStart;
    const blockBytes = Math.min(bs, this.virtualSize - blockStart);
    const avail = Math.min(maxLength, blockBytes - inBlock);
    const index = payloadIndex(g, block);
    const e = await this.batEntry(index);
    switch (e.state) {
      case PAYLOAD.FULLY_PRESENT: {
        this.checkPlacement(index, e, blockBytes, 'payload block');
        // Coalesce following blocks stored right after this one.
        let length = avail;
        let next = block + 1;
        let expected = e.offset + bs;
        while (length < maxLength && next < g.payloadBlocks) {
          const ni = payloadIndex(g, next);
          if (!this.pages.has(Math.floor(ni / PAGE_ENTRIES))) break;
          const ne = await this.batEntry(ni);
          if (ne.state !== PAYLOAD.FULLY_PRESENT || ne.offset !== expected) break;
          const nb = Math.min(bs, this.virtualSize - next * bs);
          this.checkPlacement(ni, ne, nb, 'payload block');
          length += Math.min(nb, maxLength - length);
          next++;
          expected += bs;
        }
        return { kind: 'data', length, source: this.structure.source, position: e.offset + inBlock };
      }
      case PAYLOAD.PARTIALLY_PRESENT:
        return this.partialSegment(index, e, block, inBlock, avail, blockBytes);
      case PAYLOAD.NOT_PRESENT:
        return { kind: 'unallocated', length: await this.runOfState(block, avail, maxLength, e.state) };
      case PAYLOAD.ZERO:
      case PAYLOAD.UNDEFINED:
      case PAYLOAD.UNMAPPED:
        return { kind: 'zero', length: await this.runOfState(block, avail, maxLength, e.state) };
      default:
        throw new CorruptImageError(`BAT entry ${index} has the invalid payload block state ${e.state}`, this.filename);
    }
  }

  /** Extends a stretch of unstored blocks over following blocks of the same kind (cached pages only). */
  private async runOfState(block: number, first: number, maxLength: number, state: number): Promise<number> {
    const g = this.structure.geometry;
    const kindOf = (s: number) =>
      s === PAYLOAD.NOT_PRESENT ? 0 : s === PAYLOAD.ZERO || s === PAYLOAD.UNDEFINED || s === PAYLOAD.UNMAPPED ? 1 : 2;
    const want = kindOf(state);
    let length = first;
    let next = block + 1;
    while (length < maxLength && next < g.payloadBlocks) {
      const ni = payloadIndex(g, next);
      const page = await this.batPage(Math.floor(ni / PAGE_ENTRIES));
      const ne = decodeBatEntry(page, (ni % PAGE_ENTRIES) * 8);
      if (kindOf(ne.state) !== want) break;
      length += Math.min(g.blockSize, this.virtualSize - next * g.blockSize, maxLength - length);
      next++;
    }
    return length;
  }

  private async partialSegment(
    index: number,
    e: BatEntry,
    block: number,
    inBlock: number,
    avail: number,
    blockBytes: number,
  ): Promise<Segment> {
    const g = this.structure.geometry;
    if (!g.hasParent) {
      throw new CorruptImageError(`BAT entry ${index} is partially present in an image without a parent`, this.filename);
    }
    this.checkPlacement(index, e, blockBytes, 'payload block');
    const bitmap = await this.bitmap(Math.floor(block / g.chunkRatio));
    const sectorSize = g.logicalSectorSize;
    const firstSector = (block % g.chunkRatio) * g.sectorsPerBlock + Math.floor(inBlock / sectorSize);
    const lastSector = (block % g.chunkRatio) * g.sectorsPerBlock + Math.ceil((inBlock + avail) / sectorSize);
    const bit = (n: number) => (bitmap[n >>> 3]! >>> (n & 7)) & 1;
    const want = bit(firstSector);
    let n = firstSector + 1;
    while (n < lastSector) {
      if ((n & 7) === 0 && n + 8 <= lastSector) {
        const byte = bitmap[n >>> 3]!;
        if (byte === (want ? 0xff : 0)) {
          n += 8;
          continue;
        }
      }
      if (bit(n) !== want) break;
      n++;
    }
    const runEnd = Math.min(inBlock + avail, (n - (block % g.chunkRatio) * g.sectorsPerBlock) * sectorSize);
    const length = runEnd - inBlock;
    if (want) return { kind: 'data', length, source: this.structure.source, position: e.offset + inBlock };
    return { kind: 'unallocated', length };
  }

  protected async closeSources(): Promise<void> {
    await this.structure.source.close();
  }
}

/**
 * Where the parent is: the relative_path through resolveReference; failing that, the base name
 * of the other locator paths inside the image's own folder. One MissingFileError when none is.
 */
function findParent(imagePath: string, parent: ParentReference, options: OpenOptions): string {
  if (options.backingFile) return resolveReference(imagePath, options.backingFile, 'parent', options);
  const looked: string[] = [];
  const tryRef = (ref: string): string | null => {
    try {
      return resolveReference(imagePath, ref, 'parent', options);
    } catch (err) {
      if (err instanceof MissingFileError) {
        looked.push(resolve(imagePath, '..', ref));
        return null;
      }
      throw err;
    }
  };
  if (parent.relativePath) {
    const found = tryRef(parent.relativePath.replace(/\\/g, '/'));
    if (found) return found;
  }
  for (const p of [parent.absoluteWin32Path, parent.volumePath]) {
    if (!p) continue;
    const name = basename(p.replace(/\\/g, '/'));
    if (!name || name === '.' || name === '..') continue;
    const found = tryRef(name);
    if (found) return found;
  }
  const asked = [parent.relativePath, parent.absoluteWin32Path].filter((x) => x !== undefined).join("' / '");
  throw new MissingFileError(
    `parent image '${asked}' not found (looked for ${[...new Set(looked)].join(', ') || 'nothing usable'})`,
    imagePath,
  );
}

async function openParent(parentPath: string, options: OpenOptions): Promise<DiskReader> {
  const { openChild, ...rest } = options;
  if (openChild) return openChild(parentPath, 'vhdx', { ...rest, backingFile: undefined });
  const depth = (options.depth ?? 0) + 1;
  if (depth > MAX_CHAIN_DEPTH) {
    throw new UnsafeReferenceError(`parent chain is deeper than ${MAX_CHAIN_DEPTH} images (a loop?)`, parentPath);
  }
  return VhdxReader.open(parentPath, { ...rest, backingFile: undefined, depth });
}

function checkLinkage(imagePath: string, parentPath: string, parent: ParentReference, backing: DiskReader): void {
  if (!(backing instanceof VhdxReader)) {
    throw new CorruptImageError(`parent ${parentPath} is a ${backing.format} image, not VHDX`, imagePath);
  }
  if (!parent.linkage) return;
  const got = backing.dataWriteGuid;
  if (got === parent.linkage || (parent.linkage2 && parent.linkage2 !== ZERO_GUID && got === parent.linkage2)) return;
  throw new CorruptImageError(
    `parent ${parentPath} has data-write GUID {${got}} but this image was made from a parent with {${parent.linkage}} (parent_linkage); the parent changed or is the wrong file`,
    imagePath,
  );
}
