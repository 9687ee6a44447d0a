/** Reads every VMDK flavour: descriptor + extents, sparse, flat, stream-optimized, COWD, seSparse, chains. */
// extentMagic lives in layout.ts so that probing needs no reader; re-exported for old importers.
export { extentMagic } from './layout.js';

import { CorruptImageError, UnsupportedFeatureError, UsageError, VmferryError } from '../../disk/errors.js';
import { MappedDiskReader, type Segment } from '../../disk/mapped.js';
import { resolveReference } from '../../disk/refs.js';
import { type ByteSource, FileSource, readExact } from '../../disk/source.js';
import {
  DEFAULT_MAX_METADATA_MEMORY,
  type DiskReader,
  type FormatDetails,
  type OpenOptions,
  type PackedUnit,
} from '../../disk/types.js';
import { FilePool, LazyFile, MetaCache, SparseExtent } from './extent.js';
import {
  checkSeSparseVolatile,
  type Descriptor,
  decodeCowdHeader,
  decodeMarker,
  decodeSeSparseHeader,
  decodeSparseHeader,
  type ExtentMagic,
  extentMagic,
  looksLikeDescriptor,
  MARKER_EOS,
  MARKER_FOOTER,
  MAX_DESCRIPTOR_BYTES,
  NO_PARENT_CID,
  parseDescriptor,
  SECTOR,
  type SparseHeader,
  validateSparseHeader,
} from './layout.js';

interface ReaderExtent {
  start: number;
  length: number;
  kind: 'flat' | 'zero' | 'sparse';
  source?: ByteSource;
  fileOffset?: number;
  sparse?: SparseExtent;
  /** For info: qemu's extent record. */
  info: Record<string, unknown>;
}

/** Reads a KDMV header; with GD_AT_END the footer's copy (at end - 1536) wins. */
export async function readSparseHeader(src: ByteSource): Promise<{ header: SparseHeader; gdSector: number; footer: boolean }> {
  const header = decodeSparseHeader(await readExact(src, 0, SECTOR, 'sparse header'), src.name);
  validateSparseHeader(header, src.size, src.name);
  if (header.gdOffset >= 0) return { header, gdSector: header.gdOffset, footer: false };
  if (src.size < 4 * SECTOR) throw new CorruptImageError('stream-optimized image is too short to hold a footer', src.name);
  const tail = await readExact(src, src.size - 3 * SECTOR, 3 * SECTOR, 'footer');
  const fm = decodeMarker(tail.subarray(0, SECTOR), src.name);
  const eos = decodeMarker(tail.subarray(2 * SECTOR), src.name);
  if (fm.size !== 0 || fm.type !== MARKER_FOOTER || eos.value !== 0 || eos.size !== 0 || eos.type !== MARKER_EOS) {
    throw new CorruptImageError(
      'the header says the grain directory is at the end, but no footer and end-of-stream marker are there',
      src.name,
    );
  }
  const footer = decodeSparseHeader(tail.subarray(SECTOR, 2 * SECTOR), src.name);
  validateSparseHeader(footer, src.size, src.name);
  if (footer.gdOffset < 0) throw new CorruptImageError('the footer gives no grain directory offset', src.name);
  return { header: footer, gdSector: footer.gdOffset, footer: true };
}

async function readDescriptorText(src: ByteSource, offset: number, length: number): Promise<string> {
  const n = Math.min(length, MAX_DESCRIPTOR_BYTES, Math.max(0, src.size - offset));
  return (await readExact(src, offset, n, 'descriptor')).toString('latin1');
}

export class VmdkReader extends MappedDiskReader {
  readonly format = 'vmdk';
  readonly virtualSize: number;
  override readonly backing?: DiskReader;
  private readonly starts: number[];

  private constructor(
    readonly filename: string,
    readonly details: FormatDetails,
    private readonly extentList: ReaderExtent[],
    private readonly sources: ByteSource[],
    readonly descriptor: Descriptor,
    backing?: DiskReader,
  ) {
    super();
    const last = extentList[extentList.length - 1];
    this.virtualSize = last ? last.start + last.length : 0;
    this.starts = extentList.map((e) => e.start);
    this.backing = backing;
  }

  get cid(): number {
    return this.descriptor.cid;
  }

  /** The sparse extents with where they start in the guest (for check). */
  sparseExtents(): { start: number; sparse: SparseExtent }[] {
    return this.extentList.filter((e) => e.sparse).map((e) => ({ start: e.start, sparse: e.sparse! }));
  }

  static async open(path: string, options: OpenOptions): Promise<VmdkReader> {
    const sources: ByteSource[] = [];
    const closeAll = async () => {
      for (const s of sources) await s.close().catch(() => undefined);
    };
    try {
      return await VmdkReader.openInner(path, options, sources);
    } catch (err) {
      await closeAll();
      if (err instanceof VmferryError) throw err;
      throw new CorruptImageError(`cannot be read as VMDK: ${(err as Error).message}`, path);
    }
  }

  private static async openInner(path: string, options: OpenOptions, sources: ByteSource[]): Promise<VmdkReader> {
    const cache = new MetaCache(options.maxMetadataMemory ?? DEFAULT_MAX_METADATA_MEMORY);
    const pool = new FilePool();
    const main = FileSource.open(path);
    sources.push(main);
    if (main.size < 4) throw new CorruptImageError('file is too small to be a VMDK image', path);
    const head = await main.read(0, Math.min(main.size, SECTOR));
    const magic = extentMagic(head);
    let descriptor: Descriptor;
    let extents: ReaderExtent[] = [];
    let createType: string;
    if (magic === 'kdmv') {
      const { header, gdSector } = await readSparseHeader(main);
      let text = '';
      if (header.descriptorOffset > 0 && header.descriptorSize > 0) {
        text = await readDescriptorText(main, header.descriptorOffset * SECTOR, header.descriptorSize * SECTOR);
      }
      if (header.capacity === 0 && text) {
        // A descriptor file wrapped in a sparse header (no data of its own).
        descriptor = parseDescriptor(text, path);
        createType = descriptor.createType;
        extents = await VmdkReader.openExtents(path, descriptor, options, sources, cache, pool);
      } else {
        descriptor = text.replace(/\0/g, '').trim() ? parseDescriptor(text, path) : defaultDescriptor();
        const length = header.capacity * SECTOR;
        const sparse = SparseExtent.kdmv(main, header, gdSector, length, cache);
        createType = sparse.compressed ? 'streamOptimized' : descriptor.createType || 'monolithicSparse';
        extents.push({
          start: 0,
          length,
          kind: 'sparse',
          sparse,
          info: extentInfo(path, '', length, sparse),
        });
      }
    } else if (magic === 'cowd' || magic === 'sesparse') {
      const sparse = await openSparseFile(main, magic, undefined, cache);
      descriptor = defaultDescriptor();
      createType = magic === 'cowd' ? 'vmfsSparse' : 'seSparse';
      extents.push({
        start: 0,
        length: sparse.length,
        kind: 'sparse',
        sparse,
        info: extentInfo(path, '', sparse.length, sparse),
      });
    } else {
      if (main.size > MAX_DESCRIPTOR_BYTES || !looksLikeDescriptor(head)) {
        throw new CorruptImageError('is not a VMDK image (no sparse magic and no descriptor)', path);
      }
      descriptor = parseDescriptor(await readDescriptorText(main, 0, main.size), path);
      createType = descriptor.createType;
      if (!createType) throw new CorruptImageError('descriptor has no createType', path);
      extents = await VmdkReader.openExtents(path, descriptor, options, sources, cache, pool);
    }

    // The parent (snapshot chains).
    let backing: DiskReader | undefined;
    const details: FormatDetails = {};
    const hint = options.backingFile ?? descriptor.parentFileNameHint;
    if (hint) {
      details.backingFilename = hint;
      details.backingFormat = options.backingFormat ?? 'vmdk';
    }
    if (hint && !options.noBacking) {
      const resolved = resolveReference(path, hint, 'parent', options);
      details.fullBackingFilename = resolved;
      if (!options.openChild)
        throw new UsageError('cannot open a parent image without the format registry (use openImage)', path);
      backing = await options.openChild(resolved, options.backingFormat ?? 'vmdk', {
        ...options,
        backingFile: undefined,
        backingFormat: undefined,
      });
      if (options.backingFile === undefined && !options.ignoreParentId) {
        const parentCid = backing instanceof VmdkReader ? backing.cid : undefined;
        if (parentCid === undefined || parentCid !== descriptor.parentCid) {
          await backing.close().catch(() => undefined);
          const hex = (n: number | undefined) => (n === undefined ? 'none' : (n >>> 0).toString(16).padStart(8, '0'));
          throw new CorruptImageError(
            `parentCID ${hex(descriptor.parentCid)} does not match the CID ${hex(parentCid)} of its parent '${resolved}': the parent changed after this snapshot was taken (open with ignoreParentId to read it anyway)`,
            path,
          );
        }
      }
    }

    const sparseSizes = new Set(extents.filter((e) => e.sparse).map((e) => e.sparse!.clusterSize));
    if (sparseSizes.size === 1) details.clusterSize = [...sparseSizes][0];
    details.formatSpecific = {
      type: 'vmdk',
      data: {
        cid: descriptor.cid,
        'parent-cid': descriptor.parentCid,
        'create-type': createType,
        extents: extents.map((e) => e.info),
      },
    };
    const extra = [...new Set(sources.slice(1).map((s) => s.name))];
    if (extra.length) details.extraFiles = extra;
    return new VmdkReader(path, details, extents, sources, descriptor, backing);
  }

  private static async openExtents(
    path: string,
    d: Descriptor,
    options: OpenOptions,
    sources: ByteSource[],
    cache: MetaCache,
    pool: FilePool,
  ): Promise<ReaderExtent[]> {
    if (d.extents.length === 0) throw new CorruptImageError('descriptor lists no extents', path);
    const out: ReaderExtent[] = [];
    let start = 0;
    for (const e of d.extents) {
      const length = e.sectors * SECTOR;
      if (e.type === 'ZERO' || e.access === 'NOACCESS') {
        out.push({ start, length, kind: 'zero', info: { 'virtual-size': length, filename: e.file ?? '', format: e.type } });
        start += length;
        continue;
      }
      if (e.type === 'VMFSRDM' || e.type === 'VMFSRAW') {
        throw new UnsupportedFeatureError(`${e.type} extents (raw device mappings) are not supported`, path);
      }
      const resolved = resolveReference(path, e.file!, 'extent', options);
      const file = new LazyFile(resolved, pool);
      sources.push(file);
      const shown = e.file!;
      if (e.type === 'FLAT' || e.type === 'VMFS') {
        const fileOffset = e.offset * SECTOR;
        if (fileOffset + length > file.size) {
          throw new CorruptImageError(
            `flat extent '${e.file}' is ${file.size} bytes, shorter than the ${fileOffset + length} the descriptor needs`,
            path,
          );
        }
        out.push({
          start,
          length,
          kind: 'flat',
          source: file,
          fileOffset,
          info: { 'virtual-size': length, filename: shown, format: e.type },
        });
      } else {
        const magic = extentMagic(await file.read(0, Math.min(file.size, SECTOR)));
        const wanted = e.type === 'SESPARSE' ? ['sesparse'] : ['kdmv', 'cowd'];
        if (!wanted.includes(magic)) {
          throw new CorruptImageError(`${e.type} extent '${e.file}' does not hold a sparse extent header`, path);
        }
        const sparse = await openSparseFile(file, magic, length, cache);
        out.push({ start, length, kind: 'sparse', sparse, info: { ...extentInfo(shown, e.type, length, sparse) } });
      }
      start += length;
    }
    return out;
  }

  /** Compressed grains come back undecoded: the copy pipeline inflates them on its worker threads. */
  async readPacked(offset: number, length: number, into: Buffer, memory?: (bytes: number) => Buffer): Promise<PackedUnit[]> {
    this.checkRange(offset, length);
    const units: PackedUnit[] = [];
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const e = this.extentList[this.extentIndex(pos)]!;
      const rel = pos - e.start;
      // Runs of stream-optimized grains in one read; anything else one segment at a time.
      const run = e.sparse
        ? await e.sparse.packGrains(rel, Math.min(length - done, e.length - rel), memory)
        : { length: 0, units: [] };
      if (run.length > 0) {
        for (const { rel: r, ...u } of run.units) units.push({ ...u, offset: e.start + r });
        done += run.length;
        continue;
      }
      const n = Math.min(length - done, (await this.segment(pos, length - done)).length);
      await this.fill(pos, n, into.subarray(done, done + n), units);
      done += n;
    }
    return units;
  }

  private extentIndex(offset: number): number {
    let lo = 0;
    let hi = this.starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.starts[mid]! <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  protected async segment(offset: number, maxLength: number): Promise<Segment> {
    const e = this.extentList[this.extentIndex(offset)]!;
    const rel = offset - e.start;
    const max = Math.min(maxLength, e.length - rel);
    switch (e.kind) {
      case 'zero':
        return { kind: 'zero', length: max };
      case 'flat':
        return { kind: 'data', length: max, source: e.source!, position: e.fileOffset! + rel };
      case 'sparse':
        return e.sparse!.lookup(rel, max);
    }
  }

  protected async closeSources(): Promise<void> {
    for (const s of this.sources) await s.close();
  }
}

function defaultDescriptor(): Descriptor {
  return { version: 1, cid: 0, parentCid: NO_PARENT_CID, createType: '', extents: [], ddb: {} };
}

function extentInfo(filename: string, format: string, length: number, sparse: SparseExtent): Record<string, unknown> {
  return {
    ...(sparse.compressed ? { compressed: true } : {}),
    'virtual-size': length,
    filename,
    'cluster-size': sparse.clusterSize,
    format,
  };
}

/** Opens a sparse extent file by its magic; `length` is what the descriptor gives (else the header's). */
async function openSparseFile(
  src: ByteSource,
  magic: ExtentMagic,
  length: number | undefined,
  cache: MetaCache,
): Promise<SparseExtent> {
  const tooBig = (capacity: number) => {
    if (length !== undefined && length > capacity) {
      throw new CorruptImageError(
        `the descriptor gives this extent ${length} bytes but its header holds only ${capacity}`,
        src.name,
      );
    }
  };
  if (magic === 'kdmv') {
    const { header, gdSector } = await readSparseHeader(src);
    tooBig(header.capacity * SECTOR);
    return SparseExtent.kdmv(src, header, gdSector, length ?? header.capacity * SECTOR, cache);
  }
  if (magic === 'cowd') {
    const h = decodeCowdHeader(await readExact(src, 0, SECTOR, 'COWD header'), src.size, src.name);
    tooBig(h.numSectors * SECTOR);
    return SparseExtent.cowd(src, h, length ?? h.numSectors * SECTOR, cache);
  }
  const h = decodeSeSparseHeader(await readExact(src, 0, SECTOR, 'seSparse header'), src.size, src.name);
  checkSeSparseVolatile(await readExact(src, h.volatileHeaderOffset * SECTOR, SECTOR, 'seSparse volatile header'), src.name);
  tooBig(h.capacity * SECTOR);
  return SparseExtent.sesparse(src, h, length ?? h.capacity * SECTOR, cache);
}
