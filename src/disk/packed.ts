/** readPacked for readers built on MappedDiskReader's segment lookup (VMDK grains, qcow2 clusters). */
import { VmferryError } from './errors.js';
import type { Segment } from './mapped.js';
import type { PackedUnit } from './types.js';

/** What a format's lookup gives for a compressed unit it can hand over undecoded. */
export type PackedSource = Omit<PackedUnit, 'offset' | 'length' | 'skip'>;

/** A segment whose encoded kind may also offer its stored bytes, undecoded. */
export type PackableSegment =
  | Exclude<Segment, { kind: 'encoded' }>
  | (Extract<Segment, { kind: 'encoded' }> & { pack?: () => Promise<PackedSource> });

export interface PackedAccess {
  filename: string;
  virtualSize: number;
  segment(offset: number, max: number): Promise<PackableSegment>;
  /** Unallocated bytes: the backing image's, or zeros. */
  readBelow(offset: number, out: Buffer): Promise<void>;
}

/**
 * Fills `into` with guest bytes [offset, offset + length) as read() would, except the ranges of
 * packable encoded segments, returned undecoded in ascending order.
 */
export async function readPackedVia(access: PackedAccess, offset: number, length: number, into: Buffer): Promise<PackedUnit[]> {
  if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > access.virtualSize || into.length < length) {
    throw new VmferryError(
      `read of ${length} bytes at ${offset} is outside the virtual size ${access.virtualSize}`,
      access.filename,
    );
  }
  const units: PackedUnit[] = [];
  let done = 0;
  while (done < length) {
    const pos = offset + done;
    const seg = await access.segment(pos, length - done);
    if (!(seg.length >= 1) || !Number.isSafeInteger(seg.length)) {
      throw new VmferryError(`internal: empty segment at ${pos}`, access.filename);
    }
    const n = Math.min(seg.length, length - done);
    const out = into.subarray(done, done + n);
    switch (seg.kind) {
      case 'data':
        await seg.source.read(seg.position, n, out);
        break;
      case 'encoded': {
        if (seg.pack) {
          units.push({ ...(await seg.pack()), offset: pos, length: n, skip: seg.skip });
          break;
        }
        const unit = await seg.load();
        if (seg.skip + n > unit.length) {
          throw new VmferryError(`decoded unit is ${unit.length} bytes, shorter than expected`, access.filename);
        }
        unit.copy(out, 0, seg.skip, seg.skip + n);
        break;
      }
      case 'zero':
        out.fill(0);
        break;
      case 'unallocated':
        await access.readBelow(pos, out);
        break;
    }
    done += n;
  }
  return units;
}
