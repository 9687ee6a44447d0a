/** Benchmark workloads, built once into a cache folder with independent tools. */
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, renameSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { patternBuffer } from '../test/helpers/pattern.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function sh(cmd: string, args: string[], input?: string): void {
  const r = spawnSync(cmd, args, { input, stdio: [input ? 'pipe' : 'ignore', 'inherit', 'inherit'] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.error})`);
}

function have(cmd: string): boolean {
  return spawnSync('sh', ['-c', `command -v ${cmd}`], { stdio: 'ignore' }).status === 0;
}

function buildOnce(path: string, build: (temp: string) => void): string {
  if (existsSync(path)) return path;
  const temp = `${path}.building`;
  rmSync(temp, { recursive: true, force: true });
  build(temp);
  renameSync(temp, path);
  return path;
}

/** Debian's mirror as apt is configured here (debootstrap needs one). */
function debianMirror(): string {
  const r = spawnSync(
    'sh',
    [
      '-c',
      "grep -rhE '^(URIs:|deb )' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -1",
    ],
    {
      encoding: 'utf8',
    },
  );
  return r.stdout.trim() || 'http://deb.debian.org/debian';
}

/**
 * os: 8 GiB virtual, GPT with one ext4 partition holding a minimal Debian root file system
 * (debootstrap --variant=minbase), written with mke2fs -d so no mount is needed.
 */
export function osWorkload(cache: string): string {
  const rootfs = buildOnce(join(cache, 'debian-rootfs'), (temp) => {
    if (!have('debootstrap')) sh('apt-get', ['install', '-y', '-qq', 'debootstrap']);
    sh('debootstrap', ['--variant=minbase', 'bookworm', temp, debianMirror()]);
    rmSync(join(temp, 'var/cache/apt/archives'), { recursive: true, force: true });
    mkdirSync(join(temp, 'var/cache/apt/archives/partial'), { recursive: true });
  });
  return buildOnce(join(cache, 'os.raw'), (temp) => {
    const size = 8 * GiB;
    const fd = openSync(temp, 'w');
    ftruncateSync(fd, size);
    closeSync(fd);
    sh('sfdisk', ['--quiet', temp], 'label: gpt\nstart=2048, type=linux, name=root\n');
    const partSectors = size / 512 - 2048 - 34;
    sh('mke2fs', ['-q', '-F', '-t', 'ext4', '-E', `offset=${MiB}`, '-d', rootfs, temp, `${Math.floor(partSectors / 2)}k`]);
  });
}

/** dense: 1 GiB of incompressible data, fully allocated. */
export function denseWorkload(cache: string): string {
  return buildOnce(join(cache, 'dense.raw'), (temp) => {
    const fd = openSync(temp, 'w');
    for (let i = 0; i < 1024; i++) writeSync(fd, patternBuffer(MiB, i + 1), 0, MiB, i * MiB);
    closeSync(fd);
  });
}

/** huge: 1 TiB virtual with 256 MiB of data in 1 MiB pieces scattered over the disk. */
export function hugeWorkload(cache: string): string {
  return buildOnce(join(cache, 'huge.raw'), (temp) => {
    const size = 1024 * GiB;
    const fd = openSync(temp, 'w');
    ftruncateSync(fd, size);
    const stride = size / 256;
    for (let i = 0; i < 256; i++) {
      // Half the pieces are random, half text-like, so compression has something to do.
      const block = i % 2 === 0 ? patternBuffer(MiB, 1000 + i) : Buffer.alloc(MiB, `piece ${i} of the huge workload; `);
      writeSync(fd, block, 0, MiB, i * stride + ((i * 7) % 64) * MiB);
    }
    closeSync(fd);
  });
}
