import { realpathSync, statSync } from 'node:fs';
import { dirname, isAbsolute, resolve } from 'node:path';
import { type CopyProgress, type CopyStats, copyDisk } from '../convert/pipeline.js';
import { UsageError } from '../disk/errors.js';
import { getDriver, openImage } from '../disk/registry.js';
import type { DiskReader, OpenOptions } from '../disk/types.js';

export interface ConvertRequest extends OpenOptions {
  source: string;
  target: string;
  /** -f; probed when absent. */
  sourceFormat?: string;
  /** -O; raw when absent, as qemu-img. */
  targetFormat?: string;
  /** -o */
  options?: Record<string, string>;
  /** -c */
  compress?: boolean;
  /** -B: the new image is a copy-on-write child of this image. */
  targetBacking?: string;
  /** -F */
  targetBackingFormat?: string;
  /** A larger target than the source (e.g. rounded for Azure); the rest reads as zeros. */
  targetSize?: number;
  onProgress?: (p: CopyProgress) => void;
}

export interface ConvertResult extends CopyStats {
  source: string;
  target: string;
  sourceFormat: string;
  targetFormat: string;
  seconds: number;
}

/** Whether two names are one file. A name that does not exist (a new output) answers without an exception. */
function sameFile(a: string, b: string): boolean {
  try {
    const sa = statSync(a, { throwIfNoEntry: false });
    if (!sa) return false;
    const sb = statSync(b, { throwIfNoEntry: false });
    return sb !== undefined && sa.dev === sb.dev && sa.ino === sb.ino;
  } catch {
    return false;
  }
}

/** `convert`: reads any image, writes it in the target format, atomically. */
export async function convertImage(req: ConvertRequest): Promise<ConvertResult> {
  const started = process.hrtime.bigint();
  const targetFormat = req.targetFormat ?? 'raw';
  const driver = getDriver(targetFormat);
  if (!driver.create) throw new UsageError(`Format ${driver.name} does not support writing`);
  if (sameFile(req.source, req.target)) {
    throw new UsageError(`the output is the input image; refusing to overwrite a source`, req.target);
  }
  const { source, target, sourceFormat, options = {}, compress, onProgress, ...openOptions } = req;
  const reader = await openImage(source, { ...openOptions, format: sourceFormat });
  let baseline: DiskReader | undefined;
  try {
    const createOptions = { ...options };
    let topLayerOnly = false;
    if (req.targetBacking) {
      createOptions.backing_file = req.targetBacking;
      if (req.targetBackingFormat) createOptions.backing_fmt = req.targetBackingFormat;
      const backingPath = isAbsolute(req.targetBacking)
        ? req.targetBacking
        : resolve(dirname(resolve(target)), req.targetBacking);
      baseline = await openImage(backingPath, { format: req.targetBackingFormat, allowExternalFiles: req.allowExternalFiles });
      topLayerOnly = reader.backing !== undefined && sameFile(reader.backing.filename, baseline.filename);
    }
    const size = Math.max(req.targetSize ?? 0, reader.virtualSize);
    const writer = await driver.create(target, size, { options: createOptions, compress });
    let stats: CopyStats;
    try {
      stats = await copyDisk(reader, writer, { onProgress, baseline, topLayerOnly });
      if (size > reader.virtualSize) await writer.zero(reader.virtualSize, size - reader.virtualSize);
      await writer.finish();
    } catch (err) {
      await writer.abort();
      throw err;
    }
    return {
      ...stats,
      source,
      target,
      sourceFormat: reader.format,
      targetFormat: driver.name,
      seconds: Number(process.hrtime.bigint() - started) / 1e9,
    };
  } finally {
    await reader.close();
    await baseline?.close();
  }
}

/** Resolves a path the user typed for messages; never throws. */
export function displayPath(p: string): string {
  try {
    return realpathSync(p);
  } catch {
    return p;
  }
}
