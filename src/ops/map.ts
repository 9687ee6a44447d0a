import { flatExtents } from '../disk/chain.js';
import type { DiskReader } from '../disk/types.js';

/** One row of qemu-img map --output=json. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
}

export async function* mapImage(reader: DiskReader): AsyncGenerator<MapEntry> {
  for await (const e of flatExtents(reader)) {
    yield {
      start: e.offset,
      length: e.length,
      depth: e.depth,
      present: e.present,
      zero: e.kind === 'zero',
      data: e.kind === 'data',
    };
  }
}
