/** Shared test plumbing: temp folders, the oracles (qemu-img, libyal), the corpus, the CLI. */
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { after } from 'node:test';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';
import type { DiskReader } from '../../src/disk/types.js';

export { patternBuffer } from './pattern.js';

/** The repository root (tests run from dist/test/...). */
export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../../..');
export const corpusDir = process.env.VMFERRY_CORPUS ?? resolve(repoRoot, '../shared/corpus');
export const vmferryBin = join(repoRoot, 'bin/vmferry');

const made: string[] = [];
after(() => {
  for (const d of made) rmSync(d, { recursive: true, force: true });
});

/** A fresh temp folder, removed when the test file ends. */
export function tmpDir(prefix = 'vmferry-test-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  made.push(d);
  return d;
}

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export function run(
  cmd: string,
  args: string[],
  opts: { input?: string | Buffer; cwd?: string; env?: NodeJS.ProcessEnv } = {},
): RunResult {
  const r = spawnSync(cmd, args, {
    input: opts.input,
    cwd: opts.cwd,
    env: opts.env ?? process.env,
    maxBuffer: 256 * 1024 * 1024,
    encoding: 'utf8',
  });
  if (r.error) throw r.error;
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

/** Runs a command that must succeed; the failure message carries its stderr. */
export function runOk(cmd: string, args: string[], opts: Parameters<typeof run>[2] = {}): string {
  const r = run(cmd, args, opts);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code}: ${r.stderr || r.stdout}`);
  return r.stdout;
}

/**
 * Runs node with `args` under strace (every thread; only the successful calls of `syscalls`, e.g.
 * 'openat,rename'); it must succeed. Returns its stdout and one line per system call (with a status
 * filter strace logs each call whole, even when threads overlap), so a test sees the calls
 * themselves rather than the program's account of them. `paths`: file descriptors are followed by
 * their path (strace -y), as in `pread64(18</a/b>, ...`. `unreturned`: calls that never return
 * (exit, exit_group) are logged too, which the status filter would drop.
 */
export function underStrace(
  dir: string,
  syscalls: string,
  args: string[],
  { paths = false, unreturned = false }: { paths?: boolean; unreturned?: boolean } = {},
): { stdout: string; calls: string[] } {
  const log = join(dir, `${syscalls.replace(/\W/g, '-')}.strace`);
  const r = run('strace', [
    '-f',
    '-qq',
    ...(paths ? ['-y'] : []),
    '-e',
    `trace=${syscalls}`,
    '-e',
    unreturned ? 'status=successful,unfinished' : 'status=successful',
    '-o',
    log,
    process.execPath,
    ...args,
  ]);
  if (r.code !== 0) throw new Error(`under strace, node ${args.join(' ')} exited ${r.code}: ${r.stderr}`);
  return { stdout: r.stdout, calls: readFileSync(log, 'utf8').split('\n') };
}

/** The byte counts of the pwrite64 calls in strace lines (underStrace with 'pwrite64'). */
export function pwriteSizes(lines: string[]): number[] {
  return lines.flatMap((l) => /pwrite64\(\d+, .*, (\d+), \d+\) = \d+/.exec(l)?.[1] ?? []).map(Number);
}

export function qemuImg(...args: string[]): string {
  return runOk('qemu-img', args);
}

/** vmferry's CLI as a user runs it. */
export function vmferry(...args: string[]): RunResult {
  return run(process.execPath, [vmferryBin, ...args]);
}

/** Unpacks a gzipped corpus file into `dir` and returns its path. */
export function corpusFile(relative: string, dir: string): string {
  const src = join(corpusDir, relative);
  const out = join(dir, relative.split('/').pop()!.replace(/\.gz$/, ''));
  if (relative.endsWith('.gz')) writeFileSync(out, gunzipSync(readFileSync(src)));
  else writeFileSync(out, readFileSync(src));
  return out;
}

export function sha256(buf: Buffer): string {
  return createHash('sha256').update(buf).digest('hex');
}

export async function sha256File(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(path)) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** SHA-256 of the whole guest-visible content as vmferry reads it. */
export async function sha256OfReader(reader: DiskReader, chunk = 4 * 1024 * 1024): Promise<string> {
  const h = createHash('sha256');
  const buf = Buffer.allocUnsafe(chunk);
  for (let pos = 0; pos < reader.virtualSize; pos += chunk) {
    const n = Math.min(chunk, reader.virtualSize - pos);
    h.update(await reader.read(pos, n, buf.subarray(0, n)));
  }
  return h.digest('hex');
}

/** SHA-256 of the content as qemu-img reads it (convert to raw, hash). Use on small images. */
export async function sha256ViaQemu(path: string, format?: string): Promise<string> {
  const dir = tmpDir('vmferry-qemu-');
  const out = join(dir, 'content.raw');
  qemuImg('convert', ...(format ? ['-f', format] : []), '-O', 'raw', path, out);
  const digest = await sha256File(out);
  rmSync(dir, { recursive: true, force: true });
  return digest;
}

/**
 * SHA-256 of the content as a libyal python binding reads it (pyqcow, pyvmdk, pyvhdi).
 * Debian's python3 is used: the bindings are Debian packages.
 */
export function sha256ViaLibyal(module: 'pyqcow' | 'pyvmdk' | 'pyvhdi', path: string): string {
  const script = `
import hashlib, sys, ${module} as m
f = m.${module === 'pyvmdk' ? 'handle' : 'file'}()
f.open(sys.argv[1])
${module === 'pyvmdk' ? 'f.open_extent_data_files()\n' : ''}size = f.get_media_size()
h = hashlib.sha256()
pos = 0
while pos < size:
    n = min(4 << 20, size - pos)
    data = f.read_buffer(n)
    if len(data) != n:
        raise SystemExit('short read at %d' % pos)
    h.update(data)
    pos += n
print(size, h.hexdigest())
`;
  const outText = runOk(debianPython(), ['-c', script, path]).trim();
  return outText.split(' ')[1]!;
}

/** Debian's own python3 (the libyal bindings are installed for it, not for other pythons). */
export function debianPython(): string {
  return existsSync('/usr/bin/python3') ? '/usr/bin/python3' : 'python3';
}
