import { dirname, isAbsolute, resolve } from 'node:path';
import { UsageError } from '../disk/errors.js';
import { getDriver, openImage } from '../disk/registry.js';

export interface CreateRequest {
  path: string;
  format: string;
  /** Bytes; may be omitted when options.backing_file names an image to take the size from. */
  size?: number;
  options: Record<string, string>;
  allowExternalFiles?: boolean;
}

/** `create`: a new empty image (qemu-img create). */
export async function createImage(req: CreateRequest): Promise<{ size: number }> {
  const driver = getDriver(req.format);
  if (!driver.create) throw new UsageError(`Format ${driver.name} does not support image creation`);
  let size = req.size;
  const backing = req.options.backing_file;
  if (size === undefined) {
    if (!backing) throw new UsageError('Image creation needs a size parameter');
    // The backing name is relative to the new image, as qemu-img resolves it.
    const backingPath = isAbsolute(backing) ? backing : resolve(dirname(resolve(req.path)), backing);
    const reader = await openImage(backingPath, {
      format: req.options.backing_fmt,
      allowExternalFiles: req.allowExternalFiles,
      noBacking: true,
    });
    size = reader.virtualSize;
    await reader.close();
  }
  const writer = await driver.create(req.path, size, { options: req.options });
  try {
    await writer.finish();
  } catch (err) {
    await writer.abort();
    throw err;
  }
  return { size };
}
