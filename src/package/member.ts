/**
 * Opening a VM's disk wherever its bytes are: a plain image file (the disk plane's openImage), or
 * stored inside another file (an OVA member, a gzip-compressed OVF file).
 *
 * In place: a sparse VMDK member (streamOptimized, as every OVA writer makes them, or
 * monolithicSparse) is read straight out of the archive. The archive is opened read-only, the
 * member is a SliceSource window [offset, offset + size) over it, and the VMDK sparse-extent code
 * (header, footer, grain directory, compressed grains) runs on that window: nothing is copied.
 * Extracted: a gzip-compressed member or file, or a member in another format (qcow2, VHD, raw)
 * whose driver only opens paths, is copied (gunzipped) into a private temp folder and opened
 * there; the folder is removed when the reader closes.
 */
import '../formats/index.js';
import { createReadStream, createWriteStream, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pipeline } from 'node:stream/promises';
import { createGunzip } from 'node:zlib';
import { CorruptImageError, ioError, UnsupportedFeatureError, VmferryError } from '../disk/errors.js';
import { MappedDiskReader, type Segment } from '../disk/mapped.js';
import { openImage } from '../disk/registry.js';
import { type ByteSource, FileSource, SliceSource } from '../disk/source.js';
import { DEFAULT_MAX_METADATA_MEMORY, type DiskReader, type FormatDetails, type OpenOptions } from '../disk/types.js';
import { MetaCache, SparseExtent } from '../formats/vmdk/extent.js';
import { MAX_DESCRIPTOR_BYTES, parseDescriptor, SECTOR } from '../formats/vmdk/layout.js';
import { extentMagic, readSparseHeader } from '../formats/vmdk/reader.js';
import type { StoredImage, VmDisk } from '../vm/model.js';

/** A display name for stored bytes: `archive/member`, or the file. */
export function storedName(stored: StoredImage): string {
  return stored.member ? `${stored.file}/${stored.member}` : stored.file;
}

/** A sparse VMDK read in place from a window of a larger file. */
class InPlaceVmdkReader extends MappedDiskReader {
  readonly format = 'vmdk';
  constructor(
    readonly filename: string,
    readonly virtualSize: number,
    readonly details: FormatDetails,
    private readonly sparse: SparseExtent,
    private readonly file: ByteSource,
  ) {
    super();
  }
  protected segment(offset: number, maxLength: number): Promise<Segment> {
    return this.sparse.lookup(offset, maxLength);
  }
  protected async closeSources(): Promise<void> {
    await this.file.close();
  }
}

async function openInPlaceVmdk(window: SliceSource, file: ByteSource, options: OpenOptions): Promise<DiskReader> {
  const { header, gdSector } = await readSparseHeader(window);
  if (header.descriptorOffset > 0 && header.descriptorSize > 0) {
    const at = header.descriptorOffset * SECTOR;
    const n = Math.min(header.descriptorSize * SECTOR, MAX_DESCRIPTOR_BYTES, Math.max(0, window.size - at));
    const text = (await window.read(at, n)).toString('latin1');
    if (text.replace(/\0/g, '').trim()) {
      const d = parseDescriptor(text, window.name);
      if (d.parentFileNameHint) {
        throw new UnsupportedFeatureError(
          `is a snapshot delta of '${d.parentFileNameHint}'; a packaged disk must be self-contained`,
          window.name,
        );
      }
    }
  }
  if (header.capacity === 0) throw new CorruptImageError('sparse VMDK member has no capacity', window.name);
  const length = header.capacity * SECTOR;
  const sparse = SparseExtent.kdmv(
    window,
    header,
    gdSector,
    length,
    new MetaCache(options.maxMetadataMemory ?? DEFAULT_MAX_METADATA_MEMORY),
  );
  const details: FormatDetails = {
    clusterSize: sparse.clusterSize,
    formatSpecific: {
      type: 'vmdk',
      data: { 'create-type': sparse.compressed ? 'streamOptimized' : 'monolithicSparse', 'in-place': true },
    },
  };
  return new InPlaceVmdkReader(window.name, length, details, sparse, file);
}

/** A reader over an extracted copy; closing it removes the copy. */
class ExtractedReader implements DiskReader {
  constructor(
    private readonly inner: DiskReader,
    private readonly folder: string,
    readonly filename: string,
  ) {}
  get format() {
    return this.inner.format;
  }
  get virtualSize() {
    return this.inner.virtualSize;
  }
  get backing() {
    return this.inner.backing;
  }
  get details() {
    return this.inner.details;
  }
  extents(from?: number, to?: number) {
    return this.inner.extents(from, to);
  }
  read(offset: number, length: number, into?: Buffer) {
    return this.inner.read(offset, length, into);
  }
  async close(): Promise<void> {
    try {
      await this.inner.close();
    } finally {
      rmSync(this.folder, { recursive: true, force: true });
    }
  }
}

/** Copies (and gunzips) the stored bytes to a private temp folder; returns the copy's path. */
export async function extractStored(stored: StoredImage): Promise<{ folder: string; path: string }> {
  const folder = mkdtempSync(join(tmpdir(), 'vmferry-member-'));
  const base =
    (stored.member ?? stored.file)
      .split(/[\\/]/)
      .pop()!
      .replace(/[^A-Za-z0-9._-]+/g, '_') || 'disk';
  const path = join(folder, base.replace(/\.gz$/i, '').replace(/^\.+/, '_') || 'disk');
  try {
    if (stored.size === 0) throw new CorruptImageError('is empty', storedName(stored));
    const input = createReadStream(stored.file, { start: stored.offset, end: stored.offset + stored.size - 1 });
    const output = createWriteStream(path, { flags: 'wx' });
    try {
      if (stored.compression === 'gzip') await pipeline(input, createGunzip(), output);
      else await pipeline(input, output);
    } catch (err) {
      if (err instanceof VmferryError) throw err;
      const code = (err as NodeJS.ErrnoException).code ?? '';
      if (code.startsWith('Z_') || /incorrect header|unexpected end|invalid/i.test((err as Error).message)) {
        throw new CorruptImageError(`gzip-compressed data is damaged: ${(err as Error).message}`, storedName(stored));
      }
      throw ioError(err, storedName(stored));
    }
    return { folder, path };
  } catch (err) {
    rmSync(folder, { recursive: true, force: true });
    throw err;
  }
}

/**
 * Opens stored image bytes: in place for a sparse VMDK in an uncompressed window, else from a
 * temporary extracted copy.
 */
export async function openStoredImage(stored: StoredImage, options: OpenOptions & { format?: string } = {}): Promise<DiskReader> {
  const name = storedName(stored);
  if (!stored.compression) {
    const file = FileSource.open(stored.file);
    try {
      if (stored.offset < 0 || stored.offset + stored.size > file.size) {
        throw new CorruptImageError(`lies outside its file (${file.size} bytes)`, name);
      }
      const window = new SliceSource(file, stored.offset, stored.size, name);
      const head = await window.read(0, Math.min(SECTOR, window.size));
      if (extentMagic(head) === 'kdmv' && (!options.format || options.format === 'vmdk')) {
        return await openInPlaceVmdk(window, file, options);
      }
    } catch (err) {
      await file.close();
      throw err;
    }
    await file.close();
  }
  const { folder, path } = await extractStored(stored);
  try {
    const { format, ...rest } = options;
    const inner = await openImage(path, { ...rest, format, allowExternalFiles: false });
    return new ExtractedReader(inner, folder, name);
  } catch (err) {
    rmSync(folder, { recursive: true, force: true });
    if (err instanceof VmferryError && err.file === path) {
      // Name the member, not the private temp copy.
      const Kind = err.constructor as new (m: string, f?: string) => VmferryError;
      throw new Kind(err.message, name);
    }
    throw err;
  }
}

/** Opens a VM's disk wherever its bytes are (see VmDisk.stored). */
export function openVmDisk(disk: VmDisk, options: OpenOptions = {}): Promise<DiskReader> {
  if (disk.stored) return openStoredImage(disk.stored, { ...options, format: disk.format });
  return openImage(disk.path, { ...options, format: disk.format });
}
