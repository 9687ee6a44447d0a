import type { DiskReader, Extent } from './types.js';

/** An extent of guest-visible content, resolved through the backing chain. */
export interface FlatExtent {
  offset: number;
  length: number;
  /** data: read it; zero: reads as zeros. */
  kind: 'data' | 'zero';
  /** How many backing hops down the content comes from (0 = the top image). */
  depth: number;
  /** False where no layer stores anything (a hole all the way down). */
  present: boolean;
}

/**
 * Walks the chain: this layer's unallocated ranges are looked up in its backing image, and
 * past the end of a shorter backing image (or with none) they read as zeros.
 */
export async function* flatExtents(reader: DiskReader, from = 0, to = reader.virtualSize, depth = 0): AsyncGenerator<FlatExtent> {
  let pending: FlatExtent | null = null;
  const emit = function* (e: FlatExtent): Generator<FlatExtent> {
    if (e.length <= 0) return;
    if (
      pending &&
      pending.kind === e.kind &&
      pending.depth === e.depth &&
      pending.present === e.present &&
      pending.offset + pending.length === e.offset
    ) {
      pending.length += e.length;
      return;
    }
    if (pending) yield pending;
    pending = { ...e };
  };
  for await (const ext of reader.extents(from, to)) {
    if (ext.kind !== 'unallocated') {
      yield* emit({ offset: ext.offset, length: ext.length, kind: ext.kind, depth, present: true });
      continue;
    }
    const backing = reader.backing;
    const end = ext.offset + ext.length;
    const inBacking = backing ? Math.min(end, backing.virtualSize) : ext.offset;
    if (backing && inBacking > ext.offset) {
      for await (const sub of flatExtents(backing, ext.offset, inBacking, depth + 1)) yield* emit(sub);
    }
    const tailStart = Math.max(ext.offset, inBacking);
    if (tailStart < end) yield* emit({ offset: tailStart, length: end - tailStart, kind: 'zero', depth, present: false });
  }
  if (pending) yield pending;
}

/** Collects an extent iterator (tests, small images). */
export async function collectExtents(it: AsyncIterable<Extent>): Promise<Extent[]> {
  const out: Extent[] = [];
  for await (const e of it) out.push(e);
  return out;
}

/** Merges adjacent extents of one kind and clips to [from, to); drivers use it to normalise. */
export function* mergeExtents(items: Iterable<Extent>, from: number, to: number): Generator<Extent> {
  let cur: Extent | null = null;
  for (const raw of items) {
    const start = Math.max(raw.offset, from);
    const end = Math.min(raw.offset + raw.length, to);
    if (end <= start) continue;
    if (cur && cur.kind === raw.kind && cur.offset + cur.length === start) {
      cur.length = end - cur.offset;
      continue;
    }
    if (cur) yield cur;
    cur = { offset: start, length: end - start, kind: raw.kind };
  }
  if (cur) yield cur;
}
