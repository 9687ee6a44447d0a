/** Shared plumbing for the vpc and vdi tests: only the drivers they need are registered. */
import { createHash } from 'node:crypto';
import { createReadStream, statSync } from 'node:fs';
import { copyDisk } from '../../src/convert/pipeline.js';
import { openImage, registerFormat } from '../../src/disk/registry.js';
import type { CreateOptions, DiskWriter, FormatDriver } from '../../src/disk/types.js';
import { rawDriver } from '../../src/formats/raw/index.js';
import { vdiDriver } from '../../src/formats/vdi/index.js';
import { vpcDriver } from '../../src/formats/vpc/index.js';
import { qemuImg } from '../helpers/index.js';

for (const d of [rawDriver, vpcDriver, vdiDriver]) registerFormat(d);

export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

/** SHA-256 of a file's bytes followed by zeros up to `size` (a disk that grew to its geometry). */
export async function sha256Padded(path: string, size: number): Promise<string> {
  const h = createHash('sha256');
  let n = 0;
  for await (const chunk of createReadStream(path)) {
    h.update(chunk as Buffer);
    n += (chunk as Buffer).length;
  }
  const zeros = Buffer.alloc(MiB);
  while (n < size) {
    const k = Math.min(zeros.length, size - n);
    h.update(zeros.subarray(0, k));
    n += k;
  }
  return h.digest('hex');
}

/** Converts any image to `driver` through the copy pipeline, as the CLI does. */
export async function convertWith(
  src: string,
  driver: FormatDriver,
  out: string,
  options: CreateOptions['options'] = {},
  size?: number,
): Promise<DiskWriter> {
  const reader = await openImage(src);
  try {
    const writer = await driver.create!(out, size ?? reader.virtualSize, { options });
    try {
      await copyDisk(reader, writer);
      await writer.finish();
    } catch (err) {
      await writer.abort();
      throw err;
    }
    return writer;
  } finally {
    await reader.close();
  }
}

export function qemuVirtualSize(path: string, format: string): number {
  return JSON.parse(qemuImg('info', '-f', format, '--output=json', path))['virtual-size'] as number;
}

export function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}
