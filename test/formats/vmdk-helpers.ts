/** Shared plumbing of the vmdk tests: convert with vmferry's library, read windows with qemu. */
import { createHash } from 'node:crypto';
import { closeSync, openSync, readFileSync, readSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { copyDisk } from '../../src/convert/pipeline.js';
import { getDriver, openImage } from '../../src/disk/registry.js';
import type { DiskReader, OpenOptions } from '../../src/disk/types.js';
import '../../src/formats/index.js';
import { debianPython, qemuImg, runOk, tmpDir } from '../helpers/index.js';

export const MiB = 1024 * 1024;
export const TiB = 2 ** 40;
export const SUBFORMATS = [
  'monolithicSparse',
  'monolithicFlat',
  'twoGbMaxExtentSparse',
  'twoGbMaxExtentFlat',
  'streamOptimized',
] as const;

/** vmferry convert (library): any image -> vmdk with `-o` options. */
export async function toVmdk(source: string, target: string, options: Record<string, string> = {}): Promise<void> {
  const reader = await openImage(source);
  try {
    const writer = await getDriver('vmdk').create!(target, reader.virtualSize, { options });
    try {
      await copyDisk(reader, writer);
      await writer.finish();
    } catch (err) {
      await writer.abort();
      throw err;
    }
  } finally {
    await reader.close();
  }
}

export async function withReader<T>(path: string, fn: (r: DiskReader) => Promise<T>, options: OpenOptions = {}): Promise<T> {
  const r = await openImage(path, options);
  try {
    return await fn(r);
  } finally {
    await r.close();
  }
}

/** Bytes [offset, offset + length) of a plain file (the raw source). */
export function rawBytes(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const buf = Buffer.alloc(length);
    readSync(fd, buf, 0, length, offset);
    return buf;
  } finally {
    closeSync(fd);
  }
}

/** Bytes of a window of a vmdk as qemu reads it (qemu's raw driver with offset/size over vmdk). */
export function qemuWindow(vmdk: string, offset: number, length: number): Buffer {
  const dir = tmpDir('vmdk-window-');
  const out = join(dir, 'w.raw');
  qemuImg(
    'convert',
    '-O',
    'raw',
    '--image-opts',
    `driver=raw,offset=${offset},size=${length},file.driver=vmdk,file.file.filename=${vmdk}`,
    out,
  );
  const data = readFileSync(out);
  rmSync(dir, { recursive: true, force: true });
  return data;
}

export function sha(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

/** The windows of sparseRawImage(size) that hold data, widened by a little zero on each side. */
export function sparseWindows(size: number): [number, number][] {
  const mid = Math.floor(size / 2 / MiB) * MiB;
  return [
    [0, 2 * MiB],
    [mid - MiB, 6 * MiB],
    [size - 2 * MiB, 2 * MiB],
  ];
}

/** Bytes of windows of a vmdk as libyal's pyvmdk reads them. */
export function pyvmdkWindows(vmdk: string, windows: [number, number][]): Buffer[] {
  const script = `
import sys, pyvmdk
h = pyvmdk.handle()
h.open(sys.argv[1])
h.open_extent_data_files()
for w in sys.argv[2:]:
    off, n = (int(x) for x in w.split(':'))
    sys.stdout.write(h.read_buffer_at_offset(n, off).hex() + '\\n')
`;
  const out = runOk(debianPython(), ['-c', script, vmdk, ...windows.map(([o, n]) => `${o}:${n}`)]);
  return out
    .trim()
    .split('\n')
    .map((line) => Buffer.from(line, 'hex'));
}
