import { basename } from 'node:path';
import { CorruptImageError, MissingFileError, UnsafeReferenceError, VmferryError } from '../../disk/errors.js';
import { MappedDiskReader, type Segment } from '../../disk/mapped.js';
import { nativeHelper } from '../../disk/native.js';
import { resolveReference } from '../../disk/refs.js';
import { FileSource, readExact } from '../../disk/source.js';
import { DEFAULT_MAX_METADATA_MEMORY, type DiskReader, type FormatDetails, type OpenOptions } from '../../disk/types.js';
import {
  BAT_UNUSED,
  bitmapSize,
  DISK_DIFFERENCING,
  DISK_FIXED,
  DISK_TYPE_NAMES,
  DYN_HEADER_SIZE,
  type DynHeader,
  decodeDynHeader,
  decodeFooter,
  decodeLocatorPath,
  FOOTER_SIZE,
  footerVirtualSize,
  formatUuid,
  isFooterCookie,
  SECTOR,
  type VhdFooter,
} from './layout.js';
import { PagedTable } from './table.js';

/** Where the footer was found and how long it is (old writers left a 511-byte footer). */
export interface FooterPlace {
  footer: VhdFooter;
  /** 0 for the copy at the start of a dynamic disk, else the offset of the trailing footer. */
  offset: number;
  length: number;
}

/** Finds and verifies the footer: the copy at offset 0 for dynamic disks, the end of the file otherwise. */
export async function locateFooter(source: FileSource): Promise<FooterPlace> {
  const file = source.name;
  if (source.size < FOOTER_SIZE - 1) {
    throw new CorruptImageError(`file of ${source.size} bytes is too small to be a VHD`, file);
  }
  let firstError: VmferryError | undefined;
  if (source.size >= FOOTER_SIZE) {
    const head = await readExact(source, 0, FOOTER_SIZE, 'VHD footer copy');
    if (isFooterCookie(head)) {
      try {
        const footer = decodeFooter(head, file);
        if (footer.diskType !== DISK_FIXED) return { footer, offset: 0, length: FOOTER_SIZE };
      } catch (err) {
        if (!(err instanceof VmferryError)) throw err;
        firstError = err;
      }
    }
  }
  for (const length of [FOOTER_SIZE, FOOTER_SIZE - 1]) {
    if (source.size < length) continue;
    const tail = await readExact(source, source.size - length, length, 'VHD footer');
    if (!isFooterCookie(tail)) continue;
    const padded = length === FOOTER_SIZE ? tail : Buffer.concat([tail, Buffer.alloc(1)]);
    try {
      return { footer: decodeFooter(padded, file), offset: source.size - length, length };
    } catch (err) {
      if (!(err instanceof VmferryError)) throw err;
      firstError ??= err;
    }
  }
  throw firstError ?? new CorruptImageError("no VHD footer ('conectix') at the start or the end of the file", file);
}

export interface ParentChoice {
  /** The reference as stored (or as the user gave it). */
  stored: string;
  /** Which locator it came from: W2ru, W2ku, MacX, Wi2r, Wi2k, parent-name or user. */
  locator: string;
  resolved: string;
}

const LOCATOR_ORDER = ['W2ru', 'W2ku', 'MacX', 'Wi2r', 'Wi2k'];
const MAX_LOCATOR_BYTES = 64 * 1024;

/** Resolves a differencing disk's parent through its locators, inside the image's folder. */
export async function chooseParent(
  path: string,
  source: FileSource,
  header: DynHeader,
  options: OpenOptions,
): Promise<ParentChoice> {
  if (options.backingFile) return { stored: options.backingFile, locator: 'user', resolved: options.backingFile };
  const candidates: { locator: string; ref: string }[] = [];
  const sorted = [...header.locators].sort(
    (a, b) => rank(LOCATOR_ORDER.indexOf(a.platformCode)) - rank(LOCATOR_ORDER.indexOf(b.platformCode)),
  );
  for (const loc of sorted) {
    if (!LOCATOR_ORDER.includes(loc.platformCode) || loc.dataLength === 0) continue;
    if (loc.dataLength > MAX_LOCATOR_BYTES) {
      throw new CorruptImageError(`VHD parent locator ${loc.platformCode} claims ${loc.dataLength} bytes`, path);
    }
    const data = await readExact(source, loc.dataOffset, loc.dataLength, `VHD parent locator ${loc.platformCode}`);
    const ref = decodeLocatorPath(loc.platformCode, data);
    if (ref) candidates.push({ locator: loc.platformCode, ref });
  }
  if (header.parentName) candidates.push({ locator: 'parent-name', ref: header.parentName });
  if (candidates.length === 0) {
    throw new CorruptImageError('differencing VHD names no parent (no parent locator, no parent name)', path);
  }
  let unsafe: UnsafeReferenceError | undefined;
  const tried: string[] = [];
  for (const { locator, ref } of candidates) {
    const windowsAbsolute = /^[a-zA-Z]:[\\/]/.test(ref) || ref.startsWith('\\\\');
    const attempts = [locator === 'MacX' ? ref : ref.replace(/\\/g, '/')];
    // An absolute Windows path cannot be followed here; its file name may be tried in the folder.
    if (windowsAbsolute) attempts.push(basename(ref.replace(/\\/g, '/')));
    for (const attempt of attempts) {
      tried.push(attempt);
      try {
        return { stored: ref, locator, resolved: resolveReference(path, attempt, 'parent', options) };
      } catch (err) {
        if (err instanceof UnsafeReferenceError) unsafe ??= err;
        else if (!(err instanceof MissingFileError)) throw err;
      }
    }
  }
  if (unsafe) throw unsafe;
  throw new MissingFileError(`parent of the differencing VHD not found (tried ${tried.join(', ')})`, path);
}

function rank(i: number): number {
  return i < 0 ? 99 : i;
}

export class VpcReader extends MappedDiskReader {
  readonly format = 'vpc';
  readonly details: FormatDetails;
  override readonly backing?: DiskReader;
  readonly diskType: number;
  readonly blockSize: number;
  private readonly bitmapBytes: number;
  private readonly bitmaps = new Map<number, Buffer>();
  private readonly maxBitmaps: number;

  private constructor(
    readonly filename: string,
    readonly source: FileSource,
    readonly footer: VhdFooter,
    readonly footerPlace: FooterPlace,
    readonly virtualSize: number,
    readonly header: DynHeader | undefined,
    readonly bat: PagedTable | undefined,
    details: FormatDetails,
    backing: DiskReader | undefined,
    budget: number,
  ) {
    super();
    this.diskType = footer.diskType;
    this.details = details;
    this.backing = backing;
    this.blockSize = header?.blockSize ?? 0;
    this.bitmapBytes = header ? bitmapSize(header.blockSize) : 0;
    this.maxBitmaps = Math.max(16, Math.floor(budget / 4 / Math.max(1, this.bitmapBytes)));
  }

  static async open(path: string, options: OpenOptions = {}): Promise<VpcReader> {
    const source = FileSource.open(path);
    try {
      return await VpcReader.openSource(path, source, options);
    } catch (err) {
      await source.close();
      throw err;
    }
  }

  private static async openSource(path: string, source: FileSource, options: OpenOptions): Promise<VpcReader> {
    const place = await locateFooter(source);
    const footer = place.footer;
    const { size: virtualSize, rule } = footerVirtualSize(footer);
    const budget = options.maxMetadataMemory ?? DEFAULT_MAX_METADATA_MEMORY;
    const specific: Record<string, unknown> = {
      'disk-type': DISK_TYPE_NAMES[footer.diskType],
      'creator-app': footer.creatorApp.replace(/\0/g, '\\0'),
      'size-rule': rule,
      'unique-id': formatUuid(footer.uniqueId),
    };
    const details: FormatDetails = { formatSpecific: { type: 'vpc', data: specific } };

    if (footer.diskType === DISK_FIXED) {
      if (virtualSize > place.offset) {
        throw new CorruptImageError(
          `fixed VHD claims ${virtualSize} bytes but holds only ${place.offset} bytes of data before its footer`,
          path,
        );
      }
      return new VpcReader(path, source, footer, place, virtualSize, undefined, undefined, details, undefined, budget);
    }

    if (footer.dataOffset === null || footer.dataOffset + DYN_HEADER_SIZE > source.size) {
      throw new CorruptImageError(`VHD dynamic header offset ${footer.dataOffset ?? 'none'} lies outside the file`, path);
    }
    const header = decodeDynHeader(await readExact(source, footer.dataOffset, DYN_HEADER_SIZE, 'VHD dynamic header'), path);
    const batBytes = header.maxTableEntries * 4;
    if (header.tableOffset + batBytes > source.size) {
      throw new CorruptImageError(
        `VHD block allocation table (${header.maxTableEntries} entries at ${header.tableOffset}) lies beyond the end of the file (${source.size} bytes)`,
        path,
      );
    }
    if (header.maxTableEntries * header.blockSize < virtualSize) {
      throw new CorruptImageError(
        `VHD block allocation table has ${header.maxTableEntries} entries of ${header.blockSize} bytes, too few for the virtual size ${virtualSize}`,
        path,
      );
    }
    const bat = new PagedTable(source, header.tableOffset, header.maxTableEntries, false, 'VHD block allocation table', budget);
    details.clusterSize = header.blockSize;

    let backing: DiskReader | undefined;
    if (footer.diskType === DISK_DIFFERENCING && !options.noBacking) {
      const choice = await chooseParent(path, source, header, options);
      specific['parent-locator'] = choice.locator;
      specific['parent-unique-id'] = formatUuid(header.parentUniqueId);
      details.backingFilename = choice.stored;
      details.fullBackingFilename = choice.resolved;
      details.backingFormat = 'vpc';
      const childOptions: OpenOptions = {
        allowExternalFiles: options.allowExternalFiles,
        maxMetadataMemory: options.maxMetadataMemory,
        ignoreParentId: options.ignoreParentId,
        depth: (options.depth ?? 0) + 1,
      };
      backing = options.openChild
        ? await options.openChild(choice.resolved, options.backingFormat ?? 'vpc', childOptions)
        : await VpcReader.open(choice.resolved, childOptions);
      try {
        if (backing instanceof VpcReader && !options.ignoreParentId && !backing.footer.uniqueId.equals(header.parentUniqueId)) {
          throw new CorruptImageError(
            `parent '${choice.stored}' has unique id ${formatUuid(backing.footer.uniqueId)}, but this differencing disk expects ${formatUuid(header.parentUniqueId)}`,
            path,
          );
        }
      } catch (err) {
        await backing.close();
        throw err;
      }
    } else if (footer.diskType === DISK_DIFFERENCING) {
      specific['parent-unique-id'] = formatUuid(header.parentUniqueId);
      if (header.parentName) details.backingFilename = header.parentName;
    }
    return new VpcReader(path, source, footer, place, virtualSize, header, bat, details, backing, budget);
  }

  protected async segment(offset: number, maxLength: number): Promise<Segment> {
    if (!this.bat) return this.fixedSegment(offset, maxLength);
    const bs = this.blockSize;
    const block = Math.floor(offset / bs);
    const inBlock = offset - block * bs;
    const entry = await this.bat.get(block);
    if (entry === BAT_UNUSED) {
      const blocksWanted = Math.ceil((offset + maxLength) / bs) - block;
      const run = await this.bat.runOf(block, BAT_UNUSED, blocksWanted);
      return { kind: 'unallocated', length: Math.min(maxLength, run * bs - inBlock) };
    }
    const blockStart = entry * SECTOR;
    const dataStart = blockStart + this.bitmapBytes;
    const needed = Math.min(bs, this.virtualSize - block * bs);
    if (dataStart + needed > this.source.size) {
      throw new CorruptImageError(
        `VHD block ${block} at offset ${blockStart} lies beyond the end of the file (${this.source.size} bytes)`,
        this.filename,
      );
    }
    const inThisBlock = Math.min(maxLength, bs - inBlock);
    if (this.diskType !== DISK_DIFFERENCING) {
      // As qemu and Hyper-V do for dynamic disks: an allocated block is read whole.
      return { kind: 'data', length: inThisBlock, source: this.source, position: dataStart + inBlock };
    }
    const bitmap = await this.bitmap(block, blockStart);
    const first = Math.floor(inBlock / SECTOR);
    const bit = (s: number) => (bitmap[s >> 3]! >> (7 - (s & 7))) & 1;
    const state = bit(first);
    const lastSector = Math.ceil((inBlock + inThisBlock) / SECTOR);
    let s = first + 1;
    while (s < lastSector && bit(s) === state) s++;
    const length = Math.min(inThisBlock, s * SECTOR - inBlock);
    return state ? { kind: 'data', length, source: this.source, position: dataStart + inBlock } : { kind: 'unallocated', length };
  }

  /** A fixed disk is raw data: holes in a sparse file (SEEK_HOLE) are reported as zeros. */
  private fixedSegment(offset: number, maxLength: number): Segment {
    const data: Segment = { kind: 'data', length: maxLength, source: this.source, position: offset };
    const native = nativeHelper();
    const st = this.source.stats;
    if (!native || !st.isFile() || st.blocks * 512 >= st.size) return data;
    const end = offset + maxLength;
    const next = native.seek(this.source.fd, offset, 0);
    if (next < 0 || next >= end) return { kind: 'zero', length: maxLength };
    if (next > offset) return { kind: 'zero', length: next - offset };
    const hole = native.seek(this.source.fd, offset, 1);
    return { ...data, length: hole < 0 || hole > end ? maxLength : Math.max(1, hole - offset) };
  }

  private async bitmap(block: number, blockStart: number): Promise<Buffer> {
    let bm = this.bitmaps.get(block);
    if (bm) return bm;
    bm = await readExact(this.source, blockStart, this.bitmapBytes, `VHD sector bitmap of block ${block}`);
    if (this.bitmaps.size >= this.maxBitmaps) {
      const oldest = this.bitmaps.keys().next().value;
      if (oldest !== undefined) this.bitmaps.delete(oldest);
    }
    this.bitmaps.set(block, bm);
    return bm;
  }

  protected async closeSources(): Promise<void> {
    await this.source.close();
  }
}
