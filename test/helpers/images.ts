/** Test images built with independent tools (sfdisk, mke2fs, qemu-img), cached per test run. */
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { patternBuffer, runOk } from './index.js';

const MiB = 1024 * 1024;
const cacheDir = join(tmpdir(), `vmferry-fixtures-${process.getuid?.() ?? 0}`);

function cached(name: string, build: (path: string) => void): string {
  mkdirSync(cacheDir, { recursive: true });
  const path = join(cacheDir, name);
  if (!existsSync(path)) {
    const temp = `${path}.building-${process.pid}`;
    build(temp);
    runOk('mv', [temp, path]);
  }
  return path;
}

/** The uncompressed output formats, each with the options that pick its plain (non-streaming) kind. */
export const PLAIN_OUTPUTS: readonly (readonly [string, readonly string[]])[] = [
  ['qcow2', []],
  ['vmdk', ['-o', 'subformat=monolithicSparse']],
  ['vpc', []],
  ['vhdx', []],
  ['vdi', []],
];

/**
 * A realistic Linux-like disk as raw: GPT (sfdisk) with an ext4 partition (mke2fs -d) filled
 * from a real directory tree, 256 MiB virtual, some tens of MiB used. Shared by all tests.
 */
export function realisticRawImage(): string {
  return cached('realistic-256M.raw', (path) => {
    const size = 256 * MiB;
    const fd = openSync(path, 'w');
    ftruncateSync(fd, size);
    closeSync(fd);
    runOk('sfdisk', ['--quiet', path], { input: 'label: gpt\nstart=2048, size=450560, type=linux, name=root\n' });
    const source = existsSync('/usr/lib/python3') ? '/usr/lib/python3' : '/usr/share/doc';
    runOk('mke2fs', ['-q', '-F', '-t', 'ext4', '-E', `offset=${MiB}`, '-d', source, path, `${450560 / 2}k`]);
  });
}

/**
 * A synthetic sparse raw image: `virtualSize` bytes with pseudo-random data at the start,
 * the middle and the end (1 MiB each, plus a 4 KiB piece at an odd offset).
 */
export function sparseRawImage(virtualSize: number, name = `sparse-${virtualSize}.raw`): string {
  return cached(name, (path) => {
    const fd = openSync(path, 'w');
    ftruncateSync(fd, virtualSize);
    const mid = Math.floor(virtualSize / 2 / MiB) * MiB;
    writeSync(fd, patternBuffer(MiB, 1), 0, MiB, 0);
    writeSync(fd, patternBuffer(MiB, 2), 0, MiB, mid);
    writeSync(fd, patternBuffer(4096, 3), 0, 4096, mid + 3 * MiB + 512);
    writeSync(fd, patternBuffer(MiB, 4), 0, MiB, virtualSize - MiB);
    closeSync(fd);
  });
}

/**
 * A file's extents as e2fsprogs' filefrag lists them after a sync (-s): [start, end, written]
 * byte ranges in order, written 0 for an unwritten extent (allocated, reading as zeros), else 1.
 */
export function allocatedRanges(path: string): [number, number, number][] {
  const out = runOk('filefrag', ['-s', '-v', path]);
  const block = Number(/blocks of (\d+) bytes/.exec(out)?.[1] ?? Number.NaN);
  const ranges: [number, number, number][] = [];
  for (const m of out.matchAll(/^\s*\d+:\s+(\d+)\.\.\s*(\d+):.*$/gm)) {
    ranges.push([Number(m[1]) * block, (Number(m[2]) + 1) * block, /\bunwritten\b/.test(m[0]) ? 0 : 1]);
  }
  return ranges;
}

/**
 * A file's unwritten extents (allocated, reading as zeros) as e2fsprogs' filefrag reports them:
 * [start, end) byte ranges. qemu-img map counts them as data once their pages are cached.
 */
export function unwrittenRanges(path: string): [number, number][] {
  const out = runOk('filefrag', ['-v', path]);
  const block = Number(/blocks of (\d+) bytes/.exec(out)?.[1] ?? Number.NaN);
  const ranges: [number, number][] = [];
  for (const m of out.matchAll(/^\s*\d+:\s+(\d+)\.\.\s*(\d+):.*\bunwritten\b/gm)) {
    ranges.push([Number(m[1]) * block, (Number(m[2]) + 1) * block]);
  }
  return ranges;
}
