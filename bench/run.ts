/**
 * npm run bench [-- --runs N --only REGEX --workloads os,dense,huge]
 * Runs vmferry and qemu-img side by side on the same inputs, taking turns to go first, and prints for each case
 * the median wall time of both, their ratio (vmferry / qemu-img), output sizes and vmferry's peak RSS.
 * It only reports; nothing here asserts on time.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { cpus, loadavg, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { denseWorkload, hugeWorkload, osWorkload } from './workloads.js';

const repo = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const vmferryBin = join(repo, 'bin/vmferry');

const { values } = parseArgs({
  options: {
    runs: { type: 'string', default: '3' },
    only: { type: 'string' },
    workloads: { type: 'string', default: 'os,dense,huge' },
    cache: { type: 'string', default: join(repo, '.bench-cache') },
    'no-verify': { type: 'boolean' },
  },
});
const runs = Number(values.runs);
const cache = resolve(values.cache!);
mkdirSync(cache, { recursive: true });
const scratch = join(cache, 'out');
mkdirSync(scratch, { recursive: true });

type SourceKind = 'raw' | 'qcow2' | 'vmdk-stream' | 'vhdx';
interface Case {
  name: string;
  from: SourceKind;
  ext: string;
  /** convert arguments shared by both tools (qemu-img's syntax, which vmferry follows). */
  args: string[];
}

const cases: Case[] = [
  { name: 'raw -> qcow2', from: 'raw', ext: 'qcow2', args: ['-O', 'qcow2'] },
  { name: 'raw -> qcow2 -c (zlib)', from: 'raw', ext: 'qcow2', args: ['-c', '-O', 'qcow2'] },
  { name: 'raw -> qcow2 -c zstd', from: 'raw', ext: 'qcow2', args: ['-c', '-O', 'qcow2', '-o', 'compression_type=zstd'] },
  { name: 'raw -> vmdk streamOptimized', from: 'raw', ext: 'vmdk', args: ['-O', 'vmdk', '-o', 'subformat=streamOptimized'] },
  { name: 'raw -> vmdk monolithicSparse', from: 'raw', ext: 'vmdk', args: ['-O', 'vmdk', '-o', 'subformat=monolithicSparse'] },
  { name: 'raw -> vhdx', from: 'raw', ext: 'vhdx', args: ['-O', 'vhdx'] },
  { name: 'raw -> vpc', from: 'raw', ext: 'vhd', args: ['-O', 'vpc'] },
  { name: 'raw -> vdi', from: 'raw', ext: 'vdi', args: ['-O', 'vdi'] },
  { name: 'qcow2 -> vmdk', from: 'qcow2', ext: 'vmdk', args: ['-O', 'vmdk'] },
  { name: 'vmdk streamOptimized -> qcow2', from: 'vmdk-stream', ext: 'qcow2', args: ['-O', 'qcow2'] },
  { name: 'vhdx -> qcow2', from: 'vhdx', ext: 'qcow2', args: ['-O', 'qcow2'] },
];

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'inherit'] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status})`);
}

/** Source images in each format, made by qemu-img from the raw workload (cached). */
function sourceFor(workload: string, raw: string, kind: SourceKind): string {
  if (kind === 'raw') return raw;
  const made: Record<Exclude<SourceKind, 'raw'>, [string, string[]]> = {
    qcow2: ['qcow2', ['-O', 'qcow2']],
    'vmdk-stream': ['vmdk', ['-O', 'vmdk', '-o', 'subformat=streamOptimized']],
    vhdx: ['vhdx', ['-O', 'vhdx']],
  };
  const [ext, args] = made[kind];
  const path = join(cache, `${workload}.${kind}.${ext}`);
  if (!existsSync(path)) {
    sh('qemu-img', ['convert', '-f', 'raw', ...args, raw, `${path}.tmp`]);
    sh('mv', [`${path}.tmp`, path]);
  }
  return path;
}

function timed(cmd: string, args: string[], env?: NodeJS.ProcessEnv): number {
  const start = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], env: env ?? process.env, encoding: 'utf8' });
  const secs = Number(process.hrtime.bigint() - start) / 1e9;
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return secs;
}

/** The size of a tool's output; a missing output is that tool's failure. */
function sizeOf(path: string, tool: string): number {
  if (!existsSync(path)) throw new Error(`no output (${tool})`);
  return statSync(path).size;
}

/**
 * Untimed, before every timed run: dirty pages still being written back are written now, so that
 * no run pays for another's.
 */
function settle(): void {
  spawnSync('sync');
}

/**
 * vmferry's environment: this one, without NODE_EXTRA_CA_CERTS, which makes Node parse a CA bundle
 * at start-up (about 90 ms here) for TLS that convert never uses; qemu-img ignores it anyway.
 */
function vmferryEnv(statsFile: string): NodeJS.ProcessEnv {
  const { NODE_EXTRA_CA_CERTS: _unused, ...env } = process.env;
  return { ...env, VMFERRY_STATS: statsFile };
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

interface Row {
  workload: string;
  case: string;
  qemuSeconds: number;
  vmferrySeconds: number;
  ratio: number;
  qemuBytes: number;
  vmferryBytes: number;
  sizeRatio: number;
  vmferryPeakRssMiB: number;
  identical: boolean | null;
  /** Set when a tool failed: the case is reported, the run goes on. */
  failed?: string;
}

const loadAtStart = loadavg();
const builders: Record<string, (c: string) => string> = { os: osWorkload, dense: denseWorkload, huge: hugeWorkload };
const rows: Row[] = [];
const only = values.only ? new RegExp(values.only) : null;

for (const workload of values.workloads!.split(',')) {
  const build = builders[workload];
  if (!build) throw new Error(`unknown workload ${workload}`);
  process.stderr.write(`bench: preparing workload ${workload}...\n`);
  const raw = build(cache);
  for (const c of cases) {
    if (only && !only.test(`${workload} ${c.name}`)) continue;
    // qemu's vhdx driver reports no allocation status, so qemu-img reads every byte of a vhdx:
    // all 1 TiB of the huge one, for each conversion from it and for each compare against it.
    const qemuReadsAllOfVhdx = workload === 'huge';
    if (qemuReadsAllOfVhdx && c.from === 'vhdx') {
      process.stdout.write(`${workload.padEnd(6)} ${c.name.padEnd(32)} not run: qemu-img would read all 1 TiB of the vhdx\n`);
      continue;
    }
    const verify = !values['no-verify'] && !(qemuReadsAllOfVhdx && c.ext === 'vhdx');
    const src = sourceFor(workload, raw, c.from);
    const qOut = join(scratch, `qemu.${c.ext}`);
    const vOut = join(scratch, `vmferry.${c.ext}`);
    const statsFile = join(scratch, 'stats.jsonl');
    const q: number[] = [];
    const v: number[] = [];
    let qemuBytes = 0;
    let vmferryBytes = 0;
    let identical: boolean | null = null;
    let peak = 0;
    let failed: string | undefined;
    const runQemu = () => {
      settle();
      q.push(timed('qemu-img', ['convert', ...c.args, src, qOut]));
      qemuBytes = sizeOf(qOut, 'qemu-img');
      rmSync(qOut, { force: true });
    };
    const runVmferry = (last: boolean) => {
      rmSync(statsFile, { force: true });
      settle();
      v.push(timed(process.execPath, [vmferryBin, 'convert', ...c.args, src, vOut], vmferryEnv(statsFile)));
      vmferryBytes = sizeOf(vOut, 'vmferry');
      const stats = JSON.parse(readFileSync(statsFile, 'utf8').trim().split('\n').pop()!) as { maxRssBytes: number };
      peak = Math.max(peak, stats.maxRssBytes);
      // Read with O_DIRECT (-T none), so the check leaves the page cache as it found it: a compare
      // that reads all of the os disk (against a vhdx, which qemu maps as all data) cached its 64 MiB
      // ext4 journal, an unwritten extent, and qemu-img's SEEK_DATA then took it for data in every
      // later case and read it (os raw -> qcow2: 0.10 s with it uncached, 0.115 s cached).
      if (last && verify) identical = spawnSync('qemu-img', ['compare', '-q', '-T', 'none', src, vOut]).status === 0;
      rmSync(vOut, { force: true });
    };
    try {
      for (let i = 0; i < runs; i++) {
        // Each output is removed as soon as it is measured: a 1 GiB output left in the page cache
        // made the next run of either tool up to 1.5x slower here (the same qemu-img command, run
        // twice in a row, took 0.55 s and 0.83 s). The order also alternates, so that neither tool
        // always runs right after the other.
        const last = i === runs - 1;
        if (i % 2 === 0) {
          runQemu();
          runVmferry(last);
        } else {
          runVmferry(last);
          runQemu();
        }
      }
    } catch (err) {
      failed = (err as Error).message.split('\n')[0]!;
    }
    rmSync(qOut, { force: true });
    rmSync(vOut, { force: true });
    if (failed) {
      rows.push({
        workload,
        case: c.name,
        qemuSeconds: Number.NaN,
        vmferrySeconds: Number.NaN,
        ratio: Number.NaN,
        qemuBytes: 0,
        vmferryBytes: 0,
        sizeRatio: Number.NaN,
        vmferryPeakRssMiB: peak / 2 ** 20,
        identical: null,
        failed,
      });
      process.stdout.write(`${workload.padEnd(6)} ${c.name.padEnd(32)} FAILED: ${failed}\n`);
      continue;
    }
    const row: Row = {
      workload,
      case: c.name,
      qemuSeconds: median(q),
      vmferrySeconds: median(v),
      ratio: median(v) / median(q),
      qemuBytes,
      vmferryBytes,
      sizeRatio: vmferryBytes / qemuBytes,
      vmferryPeakRssMiB: peak / 2 ** 20,
      identical,
    };
    rows.push(row);
    process.stdout.write(
      `${workload.padEnd(6)} ${c.name.padEnd(32)} qemu-img ${row.qemuSeconds.toFixed(2).padStart(7)} s  vmferry ${row.vmferrySeconds.toFixed(2).padStart(7)} s  ratio ${row.ratio.toFixed(2)}  size ${(row.vmferryBytes / 2 ** 20).toFixed(1)}/${(row.qemuBytes / 2 ** 20).toFixed(1)} MiB (${row.sizeRatio.toFixed(3)})  RSS ${row.vmferryPeakRssMiB.toFixed(0)} MiB${identical === false ? '  CONTENT MISMATCH' : ''}\n`,
    );
  }
}

const machine = `${cpus().length} x ${cpus()[0]?.model ?? 'cpu'}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB, ${spawnSync('qemu-img', ['--version'], { encoding: 'utf8' }).stdout.split('\n')[0]}, node ${process.version}`;
const load = (l: number[]) => l.map((x) => x.toFixed(1)).join(' ');
const table = [
  `Measured ${new Date().toISOString().slice(0, 10)} on ${machine}; median of ${runs} runs each, the tools taking turns to go first, every output removed once measured; ratio = vmferry / qemu-img wall time; load average ${load(loadAtStart)} at the start, ${load(loadavg())} at the end.`,
  '',
  '| workload | case | qemu-img s | vmferry s | ratio | vmferry / qemu-img size | vmferry peak RSS | content |',
  '|---|---|---:|---:|---:|---:|---:|---|',
  ...rows.map((r) =>
    r.failed
      ? `| ${r.workload} | ${r.case} | | | | | | FAILED: ${r.failed.replace(/\|/g, '/')} |`
      : `| ${r.workload} | ${r.case} | ${r.qemuSeconds.toFixed(2)} | ${r.vmferrySeconds.toFixed(2)} | ${r.ratio.toFixed(2)} | ${(r.vmferryBytes / 2 ** 20).toFixed(1)} / ${(r.qemuBytes / 2 ** 20).toFixed(1)} MiB (${r.sizeRatio.toFixed(3)}) | ${r.vmferryPeakRssMiB.toFixed(0)} MiB | ${r.identical === null ? 'not checked' : r.identical ? 'identical' : 'MISMATCH'} |`,
  ),
].join('\n');
writeFileSync(join(cache, 'results.md'), `${table}\n`);
writeFileSync(join(cache, 'results.json'), JSON.stringify({ machine, runs, rows }, null, 2));
process.stdout.write(`\n${table}\n\n(written to ${join(cache, 'results.md')})\n`);
