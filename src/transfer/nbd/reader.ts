/**
 * An NBD export as a DiskReader: the guest bytes are the export's bytes (format 'raw'), the extent
 * map comes from the base:allocation meta context (hole+zero = unallocated, zero = zero, else data),
 * and a qemu:dirty-bitmap:NAME context, when asked for, yields the dirty ranges for warm sync.
 */
import { VmferryError } from '../../disk/errors.js';
import type { DiskReader, Extent, ExtentKind, FormatDetails } from '../../disk/types.js';
import { NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO, NbdConnection } from './client.js';
import { parseNbdUri } from './uri.js';

export const BASE_ALLOCATION = 'base:allocation';

export interface NbdOpenOptions {
  /** A qemu dirty bitmap to read through `dirtyExtents` (qemu:dirty-bitmap:NAME). */
  dirtyBitmap?: string;
  timeoutMs?: number;
  /** Reads kept in flight for one large read. */
  parallel?: number;
}

/** Largest block status request (the protocol's length is 32 bits). */
const STATUS_SPAN = 1024 * 1024 * 1024;

export class NbdDiskReader implements DiskReader {
  readonly format = 'raw';
  readonly details: FormatDetails;
  readonly virtualSize: number;
  private readonly parallel: number;

  private constructor(
    readonly filename: string,
    readonly connection: NbdConnection,
    readonly dirtyContext: string | undefined,
    parallel: number,
  ) {
    this.virtualSize = connection.size;
    this.parallel = parallel;
    this.details = {
      formatSpecific: {
        type: 'nbd',
        data: {
          'export-name': connection.address.exportName,
          'structured-replies': connection.structuredReplies,
          'meta-contexts': [...connection.contexts.keys()],
          tls: connection.tls,
          'min-block': connection.minBlock,
          'max-block': connection.maxBlock,
        },
      },
    };
  }

  static async open(uri: string, options: NbdOpenOptions = {}): Promise<NbdDiskReader> {
    const address = parseNbdUri(uri);
    const dirtyContext = options.dirtyBitmap ? `qemu:dirty-bitmap:${options.dirtyBitmap}` : undefined;
    const contexts = [BASE_ALLOCATION, ...(dirtyContext ? [dirtyContext] : [])];
    const conn = await NbdConnection.connect(uri, address, { metaContexts: contexts, timeoutMs: options.timeoutMs });
    if (dirtyContext && !conn.contexts.has(dirtyContext)) {
      await conn.close();
      throw new VmferryError(
        `the NBD export does not offer the dirty bitmap '${options.dirtyBitmap}' (export it with the bitmap)`,
        uri,
      );
    }
    return new NbdDiskReader(uri, conn, dirtyContext, options.parallel ?? 8);
  }

  /** Whether the server gave an allocation map (otherwise everything is data). */
  get hasAllocationMap(): boolean {
    return this.connection.contexts.has(BASE_ALLOCATION);
  }

  private async *status(
    context: string,
    from: number,
    to: number,
  ): AsyncGenerator<{ offset: number; length: number; flags: number }> {
    const id = this.connection.contexts.get(context)!;
    let pos = from;
    while (pos < to) {
      const span = Math.min(to - pos, STATUS_SPAN);
      const replies = await this.connection.blockStatus(pos, span);
      const list = replies.get(id);
      if (!list || list.length === 0)
        throw new VmferryError(`NBD block status at ${pos} answered nothing for ${context}`, this.filename);
      for (const d of list) {
        if (pos >= to) break;
        if (d.length === 0) throw new VmferryError(`NBD block status at ${pos} has an empty extent`, this.filename);
        const length = Math.min(d.length, to - pos);
        yield { offset: pos, length, flags: d.flags };
        pos += length;
      }
    }
  }

  async *extents(from = 0, to = this.virtualSize): AsyncGenerator<Extent> {
    const end = Math.min(to, this.virtualSize);
    const start = Math.max(0, from);
    if (start >= end) return;
    if (!this.hasAllocationMap) {
      yield { offset: start, length: end - start, kind: 'data' };
      return;
    }
    let cur: Extent | null = null;
    for await (const s of this.status(BASE_ALLOCATION, start, end)) {
      const kind: ExtentKind = s.flags & NBD_STATE_ZERO ? (s.flags & NBD_STATE_HOLE ? 'unallocated' : 'zero') : 'data';
      if (cur && cur.kind === kind && cur.offset + cur.length === s.offset) cur.length += s.length;
      else {
        if (cur) yield cur;
        cur = { offset: s.offset, length: s.length, kind };
      }
    }
    if (cur) yield cur;
  }

  /** Ranges the dirty bitmap marks, merged, ascending. */
  async *dirtyExtents(from = 0, to = this.virtualSize): AsyncGenerator<{ offset: number; length: number }> {
    if (!this.dirtyContext) throw new VmferryError('no dirty bitmap was negotiated', this.filename);
    let cur: { offset: number; length: number } | null = null;
    for await (const s of this.status(this.dirtyContext, Math.max(0, from), Math.min(to, this.virtualSize))) {
      if (!(s.flags & NBD_STATE_DIRTY)) continue;
      if (cur && cur.offset + cur.length === s.offset) cur.length += s.length;
      else {
        if (cur) yield cur;
        cur = { offset: s.offset, length: s.length };
      }
    }
    if (cur) yield cur;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new VmferryError(
        `read of ${length} bytes at ${offset} is outside the export size ${this.virtualSize}`,
        this.filename,
      );
    }
    const buf = into ?? Buffer.allocUnsafe(length);
    if (length === 0) return buf;
    const align = this.connection.minBlock;
    const lo = Math.floor(offset / align) * align;
    const hi = Math.min(this.virtualSize, Math.ceil((offset + length) / align) * align);
    const aligned = lo === offset && hi === offset + length;
    const target = aligned ? buf : Buffer.allocUnsafe(hi - lo);
    const step = Math.max(align, Math.floor(this.connection.maxBlock / align) * align);
    const pieces: number[] = [];
    for (let p = lo; p < hi; p += step) pieces.push(p);
    let next = 0;
    const worker = async () => {
      while (next < pieces.length) {
        const p = pieces[next++]!;
        const n = Math.min(step, hi - p);
        await this.connection.read(p, n, target.subarray(p - lo, p - lo + n));
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.parallel, pieces.length) }, worker));
    if (!aligned) target.copy(buf, 0, offset - lo, offset - lo + length);
    return buf;
  }

  async close(): Promise<void> {
    await this.connection.close();
  }
}
