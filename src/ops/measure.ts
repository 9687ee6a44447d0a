import { UnsupportedFeatureError } from '../disk/errors.js';
import { getDriver } from '../disk/registry.js';
import type { DiskReader, MeasureResult } from '../disk/types.js';

/** `measure`: the size a conversion of `source` (or an empty image of `size`) would need. */
export async function measureImage(
  targetFormat: string,
  options: Record<string, string>,
  source: DiskReader | null,
  size: number,
): Promise<MeasureResult> {
  const driver = getDriver(targetFormat);
  if (!driver.measure) throw new UnsupportedFeatureError(`Format driver '${driver.name}' does not support measure`);
  return driver.measure(source ?? emptyReader(size), size, { options });
}

/** A disk of `size` zero bytes, for measure --size. */
function emptyReader(size: number): DiskReader {
  return {
    format: 'raw',
    filename: '(empty)',
    virtualSize: size,
    details: {},
    async *extents(from = 0, to = size) {
      if (to > from) yield { offset: from, length: to - from, kind: 'zero' as const };
    },
    async read(_o: number, length: number, into?: Buffer) {
      return (into ?? Buffer.alloc(length)).fill(0, 0, length);
    },
    async close() {},
  };
}
