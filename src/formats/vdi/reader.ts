import { readdirSync } from 'node:fs';
import { basename, dirname } from 'node:path';
import { CorruptImageError, MissingFileError, UnsupportedFeatureError, VmferryError } from '../../disk/errors.js';
import { MappedDiskReader, type Segment } from '../../disk/mapped.js';
import { resolveReference } from '../../disk/refs.js';
import { FileSource, readExact } from '../../disk/source.js';
import { DEFAULT_MAX_METADATA_MEMORY, type DiskReader, type FormatDetails, type OpenOptions } from '../../disk/types.js';
import { PagedTable } from '../vpc/table.js';
import {
  BLOCK_FREE,
  BLOCK_ZERO,
  decodeHeader,
  formatUuid,
  HEADER_AREA,
  isNullUuid,
  VDI_TYPE_DIFF,
  VDI_TYPE_NAMES,
  VDI_TYPE_UNDO,
  type VdiHeader,
} from './layout.js';

/** How many .vdi files of the folder are looked at when searching a parent by UUID. */
const MAX_PARENT_CANDIDATES = 1000;

export async function readVdiHeader(source: FileSource): Promise<VdiHeader> {
  if (source.size < HEADER_AREA) {
    throw new CorruptImageError(`file of ${source.size} bytes is too small to be a VDI image`, source.name);
  }
  return decodeHeader(await readExact(source, 0, HEADER_AREA, 'VDI header'), source.size, source.name);
}

/** Finds the parent of a differencing VDI: the .vdi in the same folder whose creation UUID is the link UUID. */
export async function findParentByUuid(path: string, linkage: Buffer, options: OpenOptions): Promise<string> {
  const folder = dirname(path);
  const self = basename(path);
  let names: string[];
  try {
    names = readdirSync(folder).filter((n) => n.toLowerCase().endsWith('.vdi') && n !== self);
  } catch (err) {
    throw new MissingFileError(`cannot list the folder to find the parent: ${(err as Error).message}`, path);
  }
  for (const name of names.sort().slice(0, MAX_PARENT_CANDIDATES)) {
    let resolved: string;
    try {
      resolved = resolveReference(path, name, 'parent', options);
    } catch {
      continue; // a symbolic link out of the folder, a FIFO: not a candidate
    }
    let src: FileSource | undefined;
    try {
      src = FileSource.open(resolved);
      const h = await readVdiHeader(src);
      if (h.uuidCreate.equals(linkage)) return resolved;
    } catch (err) {
      if (!(err instanceof VmferryError)) throw err;
    } finally {
      await src?.close();
    }
  }
  throw new MissingFileError(
    `parent VDI with UUID ${formatUuid(linkage)} not found among the .vdi files of its folder; name it with -B`,
    path,
  );
}

export class VdiReader extends MappedDiskReader {
  readonly format = 'vdi';
  readonly details: FormatDetails;
  override readonly backing?: DiskReader;
  readonly virtualSize: number;
  private readonly stride: number;

  private constructor(
    readonly filename: string,
    readonly source: FileSource,
    readonly header: VdiHeader,
    readonly map: PagedTable,
    details: FormatDetails,
    backing: DiskReader | undefined,
  ) {
    super();
    this.virtualSize = header.diskSize;
    this.details = details;
    this.backing = backing;
    this.stride = header.blockSize + header.blockExtra;
  }

  static async open(path: string, options: OpenOptions = {}): Promise<VdiReader> {
    const source = FileSource.open(path);
    let backing: DiskReader | undefined;
    try {
      const h = await readVdiHeader(source);
      if (h.imageType === VDI_TYPE_UNDO) {
        throw new UnsupportedFeatureError('VDI undo images are not supported', path);
      }
      const budget = options.maxMetadataMemory ?? DEFAULT_MAX_METADATA_MEMORY;
      const map = new PagedTable(source, h.offBlocks, h.blocks, true, 'VDI block map', budget);
      const details: FormatDetails = {
        clusterSize: h.blockSize,
        formatSpecific: {
          type: 'vdi',
          data: {
            'image-type': VDI_TYPE_NAMES[h.imageType],
            uuid: formatUuid(h.uuidCreate),
            'modification-uuid': formatUuid(h.uuidModify),
            ...(isNullUuid(h.uuidLinkage) ? {} : { 'parent-uuid': formatUuid(h.uuidLinkage) }),
            'blocks-allocated': h.blocksAllocated,
          },
        },
      };
      if (h.imageType === VDI_TYPE_DIFF && !options.noBacking) {
        const parentPath = options.backingFile ?? (await findParentByUuid(path, h.uuidLinkage, options));
        details.backingFilename = options.backingFile ?? basename(parentPath);
        details.fullBackingFilename = parentPath;
        details.backingFormat = 'vdi';
        const childOptions: OpenOptions = {
          allowExternalFiles: options.allowExternalFiles,
          maxMetadataMemory: options.maxMetadataMemory,
          ignoreParentId: options.ignoreParentId,
          depth: (options.depth ?? 0) + 1,
        };
        backing = options.openChild
          ? await options.openChild(parentPath, options.backingFormat ?? 'vdi', childOptions)
          : await VdiReader.open(parentPath, childOptions);
        if (backing instanceof VdiReader && !options.ignoreParentId && !backing.header.uuidCreate.equals(h.uuidLinkage)) {
          throw new CorruptImageError(
            `parent '${parentPath}' has UUID ${formatUuid(backing.header.uuidCreate)}, but this differencing image expects ${formatUuid(h.uuidLinkage)}`,
            path,
          );
        }
      }
      return new VdiReader(path, source, h, map, details, backing);
    } catch (err) {
      await backing?.close();
      await source.close();
      throw err;
    }
  }

  /** Byte offset of a block's data in the file. */
  blockPosition(index: number): number {
    return this.header.offData + index * this.stride + this.header.blockExtra;
  }

  protected async segment(offset: number, maxLength: number): Promise<Segment> {
    const bs = this.header.blockSize;
    const block = Math.floor(offset / bs);
    const inBlock = offset - block * bs;
    const blocksWanted = Math.ceil((offset + maxLength) / bs) - block;
    const { first, entries } = await this.map.page(block);
    const entry = entries[block - first]!;
    if (entry === BLOCK_FREE || entry === BLOCK_ZERO) {
      let run = 1;
      while (run < blocksWanted && entries[block - first + run] === entry) run++;
      const length = Math.min(maxLength, run * bs - inBlock);
      return entry === BLOCK_FREE ? { kind: 'unallocated', length } : { kind: 'zero', length };
    }
    // Physically consecutive blocks (a static image, a sequential write) are read as one stretch.
    let run = 1;
    if (this.header.blockExtra === 0) {
      while (run < blocksWanted && entries[block - first + run] === entry + run) run++;
    }
    const position = this.blockPosition(entry) + inBlock;
    const length = Math.min(maxLength, run * bs - inBlock);
    if (position + length > this.source.size) {
      throw new CorruptImageError(
        `VDI block ${block} (index ${entry}) lies beyond the end of the file (${this.source.size} bytes)`,
        this.filename,
      );
    }
    return { kind: 'data', length, source: this.source, position };
  }

  protected async closeSources(): Promise<void> {
    await this.source.close();
  }
}
