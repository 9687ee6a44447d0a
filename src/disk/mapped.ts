import { VmferryError } from './errors.js';
import type { ByteSource } from './source.js';
import type { DiskReader, Extent, ExtentKind, FormatDetails, PackedUnit } from './types.js';

/** What a format's lookup gives for a compressed unit it can hand over undecoded (readPacked). */
export type PackedSource = Omit<PackedUnit, 'offset' | 'length' | 'skip'>;

/** What one stretch of guest bytes is, as a format's lookup describes it. */
export type Segment =
  /** Stored as-is at `position` of `source`. */
  | { kind: 'data'; length: number; source: ByteSource; position: number }
  /**
   * Stored encoded (compressed grain, cluster); `load` yields the decoded unit, of which
   * [skip, skip + length) is wanted; `pack`, where given, its stored bytes undecoded.
   */
  | { kind: 'encoded'; length: number; skip: number; load: () => Promise<Buffer>; pack?: () => Promise<PackedSource> }
  | { kind: 'zero'; length: number }
  | { kind: 'unallocated'; length: number };

/**
 * A reader built from one lookup: `segment(offset, max)` says what the guest bytes at `offset`
 * are, for as long a stretch as the format can tell cheaply (a missing table should answer for
 * all the guest range it covers, so walking a sparse petabyte stays cheap).
 */
export abstract class MappedDiskReader implements DiskReader {
  abstract readonly format: string;
  abstract readonly filename: string;
  abstract readonly virtualSize: number;
  abstract readonly details: FormatDetails;
  readonly backing?: DiskReader;

  /** At least 1 and at most `maxLength` bytes starting at `offset` (inside the virtual size). */
  protected abstract segment(offset: number, maxLength: number): Promise<Segment>;

  /** Files to close with the reader. */
  protected abstract closeSources(): Promise<void>;

  async *extents(from = 0, to = this.virtualSize): AsyncGenerator<Extent> {
    const end = Math.min(to, this.virtualSize);
    let pos = Math.max(0, from);
    let cur: Extent | null = null;
    while (pos < end) {
      const seg = await this.segment(pos, end - pos);
      const length = this.checkedLength(seg, pos, end - pos);
      const kind: ExtentKind = seg.kind === 'encoded' ? 'data' : seg.kind;
      if (cur && cur.kind === kind) cur.length += length;
      else {
        if (cur) yield cur;
        cur = { offset: pos, length, kind };
      }
      pos += length;
    }
    if (cur) yield cur;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const buf = into ?? Buffer.allocUnsafe(length);
    await this.fill(offset, length, buf);
    return buf;
  }

  /**
   * Guest bytes [offset, offset + length) into `into`. With `packed`, encoded segments that can
   * hand over their stored bytes are not decoded: their units are appended there instead (the
   * copy pipeline decodes them on its workers) and their ranges of `into` are left as they are.
   */
  protected async fill(offset: number, length: number, into: Buffer, packed?: PackedUnit[]): Promise<void> {
    this.checkRange(offset, length);
    let done = 0;
    while (done < length) {
      const pos = offset + done;
      const seg = await this.segment(pos, length - done);
      const n = this.checkedLength(seg, pos, length - done);
      const out = into.subarray(done, done + n);
      switch (seg.kind) {
        case 'data':
          await seg.source.read(seg.position, n, out);
          break;
        case 'encoded': {
          if (packed && seg.pack) {
            packed.push({ ...(await seg.pack()), offset: pos, length: n, skip: seg.skip });
            break;
          }
          const unit = await seg.load();
          if (seg.skip + n > unit.length) {
            throw new VmferryError(`decoded unit is ${unit.length} bytes, shorter than expected`, this.filename);
          }
          unit.copy(out, 0, seg.skip, seg.skip + n);
          break;
        }
        case 'zero':
          out.fill(0);
          break;
        case 'unallocated':
          await this.readBelow(pos, out);
          break;
      }
      done += n;
    }
  }

  /** A read of [offset, offset + length) must lie inside the virtual size. */
  protected checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new VmferryError(
        `read of ${length} bytes at ${offset} is outside the virtual size ${this.virtualSize}`,
        this.filename,
      );
    }
  }

  /** Unallocated bytes come from the backing image where it reaches, zeros elsewhere. */
  protected async readBelow(pos: number, out: Buffer): Promise<void> {
    const backing = this.backing;
    const inBacking = backing ? Math.max(0, Math.min(out.length, backing.virtualSize - pos)) : 0;
    if (backing && inBacking > 0) await backing.read(pos, inBacking, out.subarray(0, inBacking));
    out.fill(0, inBacking);
  }

  private checkedLength(seg: Segment, pos: number, max: number): number {
    if (!(seg.length >= 1) || !Number.isSafeInteger(seg.length)) {
      throw new VmferryError(`internal: empty segment at ${pos}`, this.filename);
    }
    return Math.min(seg.length, max);
  }

  async close(): Promise<void> {
    await this.closeSources();
    await this.backing?.close();
  }
}
