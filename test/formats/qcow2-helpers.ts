/** Fixtures shared by the qcow2 tests: a small mixed-content raw source and qemu-built images. */
import { closeSync, ftruncateSync, openSync, readFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { openImage } from '../../src/disk/registry.js';
import type { DiskReader, Extent, OpenOptions } from '../../src/disk/types.js';
import '../../src/formats/index.js';
import { patternBuffer, qemuImg, run, runOk, sha256 } from '../helpers/index.js';

const KiB = 1024;
const MiB = 1024 * 1024;

/** 20 MiB + 3.5 KiB (not a whole number of clusters): random and compressible data, zeros, odd pieces. */
export const MIXED_SIZE = 20 * MiB + 3584;

export function mixedRaw(dir: string): { path: string; sha: string } {
  const path = join(dir, 'mixed.raw');
  const fd = openSync(path, 'w');
  ftruncateSync(fd, MIXED_SIZE);
  const text = Buffer.from('qcow2 test text, quite compressible; '.repeat(30000)).subarray(0, MiB);
  const put = (buf: Buffer, at: number) => writeSync(fd, buf, 0, buf.length, at);
  put(patternBuffer(MiB, 11), 0);
  put(text, 2 * MiB);
  put(patternBuffer(4096, 12), 4 * MiB + 512);
  put(patternBuffer(64 * KiB, 13), 7 * MiB);
  put(text.subarray(0, 64 * KiB), 7 * MiB + 128 * KiB);
  put(patternBuffer(3 * MiB, 14), 10 * MiB + 1536);
  put(text.subarray(0, 200 * KiB), 15 * MiB);
  put(patternBuffer(64 * KiB + 3584, 15), MIXED_SIZE - 64 * KiB - 3584);
  closeSync(fd);
  return { path, sha: sha256(readFileSync(path)) };
}

export async function open(path: string, options: OpenOptions & { format?: string } = {}): Promise<DiskReader> {
  return openImage(path, options);
}

/** The data ranges qemu-img map reports (present data in any layer), merged. */
export function qemuDataRanges(path: string, extra: string[] = []): [number, number][] {
  const map = JSON.parse(qemuImg('map', '--output=json', ...extra, path)) as {
    start: number;
    length: number;
    data: boolean;
  }[];
  return merge(map.filter((m) => m.data).map((m) => [m.start, m.start + m.length] as [number, number]));
}

export function merge(ranges: [number, number][]): [number, number][] {
  const out: [number, number][] = [];
  for (const r of ranges) {
    const last = out[out.length - 1];
    if (last && last[1] === r[0]) last[1] = r[1];
    else out.push([r[0], r[1]]);
  }
  return out;
}

export function dataRanges(extents: Extent[]): [number, number][] {
  return merge(extents.filter((e) => e.kind === 'data').map((e) => [e.offset, e.offset + e.length] as [number, number]));
}

/** qemu-io, the independent writer for test images. */
export function qemuIo(path: string, ...commands: string[]): void {
  runOk('qemu-io', ['-f', 'qcow2', ...commands.flatMap((c) => ['-c', c]), path]);
}

export interface QemuCheck {
  'check-errors': number;
  corruptions?: number;
  leaks?: number;
  'image-end-offset'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
}

export function qemuCheck(path: string, cwd?: string): QemuCheck {
  // qemu-img check exits 2 (corruptions) or 3 (leaks) and still prints the JSON.
  // (qemu resolves an external data file name against the working directory, hence `cwd`.)
  const r = run('qemu-img', ['check', '--output=json', path], { cwd });
  if (![0, 2, 3].includes(r.code)) throw new Error(`qemu-img check ${path} exited ${r.code}: ${r.stderr}`);
  return JSON.parse(r.stdout) as QemuCheck;
}
