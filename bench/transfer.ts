/**
 * Transfer benchmark (run by hand, never asserts): `vmferry estimate`'s prediction next to the
 * measured wall time of a real `vmferry send` process (spawn to exit, so process start and the TLS
 * handshake count) into a `vmferry serve` process over HTTPS with a pinned certificate.
 *
 *   node dist/bench/transfer.js [--image os|dense|PATH]... [--rate 20M]... [-c none,zstd] [--runs 3]
 *                               [--sub MiB] [--netns] [--rtt MS] [--streams N]
 *
 * Bandwidth is limited by `send --rate` (the sender's token bucket), or with --netns by the kernel:
 * the agent runs in a network namespace behind a veth pair whose host side carries a tbf qdisc
 * (rate) and, for --rtt, whose namespace side carries netem (delay); the sender then runs without
 * --rate. Needs root and iproute2 (netem also needs the sch_netem kernel module).
 * Target: estimate within 15% of the median measured time.
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import '../src/formats/index.js';
import { openImage } from '../src/disk/registry.js';
import { estimateTransfer, parseRate } from '../src/plan/estimate.js';
import type { WireCodec } from '../src/transfer/protocol.js';
import { denseWorkload, osWorkload } from './workloads.js';

const MiB = 1024 * 1024;
// dist/bench/transfer.js -> the repository (not test/helpers: importing node:test would print TAP).
const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), '../..');
const vmferryBin = join(repoRoot, 'bin/vmferry');
const NS = 'vmferry-bench';
const HOST_IF = 'vmfb-h';
const NS_IF = 'vmfb-a';
const HOST_IP = '10.231.7.1';
const NS_IP = '10.231.7.2';

interface Args {
  images: string[];
  rates: number[];
  codecs: WireCodec[];
  runs: number;
  sub: number;
  netns: boolean;
  rtt: number;
  streams: number;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { images: [], rates: [], codecs: [], runs: 3, sub: 256, netns: false, rtt: 0, streams: 4 };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i]!;
    const v = () => {
      const x = argv[++i];
      if (x === undefined) throw new Error(`${k} needs a value`);
      return x;
    };
    if (k === '--help' || k === '-h') {
      console.log(
        'node dist/bench/transfer.js [--image os|dense|PATH]... [--rate 20M]... [-c none,zstd] [--runs 3] [--sub MiB] [--netns] [--rtt MS] [--streams N]\n' +
          '  defaults: --image os --image dense (first --sub MiB of the 1 GiB dense workload), --rate 20M --rate 100M, -c none,zstd',
      );
      process.exit(0);
    } else if (k === '--image') a.images.push(v());
    else if (k === '--rate') a.rates.push(parseRate(v()));
    else if (k === '-c') a.codecs.push(...(v().split(',') as WireCodec[]));
    else if (k === '--runs') a.runs = Number(v());
    else if (k === '--sub') a.sub = Number(v());
    else if (k === '--netns') a.netns = true;
    else if (k === '--rtt') a.rtt = Number(v()) / 1000;
    else if (k === '--streams') a.streams = Number(v());
    else throw new Error(`unknown argument ${k}`);
  }
  if (!a.images.length) a.images = ['os', 'dense'];
  if (!a.rates.length) a.rates = [20e6, 100e6];
  if (!a.codecs.length) a.codecs = ['none', 'zstd'];
  return a;
}

/** The first `mib` MiB of the dense workload: same data, a run short enough for slow rates. */
function denseSub(cache: string, mib: number): string {
  const out = join(cache, `transfer-dense-${mib}M.raw`);
  if (existsSync(out)) return out;
  const src = denseWorkload(cache);
  const fd = openSync(src, 'r');
  const tmp = `${out}.tmp`;
  const wfd = openSync(tmp, 'w');
  const buf = Buffer.alloc(4 * MiB);
  for (let done = 0; done < mib * MiB; ) {
    const n = readSync(fd, buf, 0, Math.min(buf.length, mib * MiB - done), done);
    if (n <= 0) break;
    writeSync(wfd, buf, 0, n);
    done += n;
  }
  closeSync(fd);
  closeSync(wfd);
  copyFileSync(tmp, out);
  rmSync(tmp);
  return out;
}

function resolveImage(spec: string, cache: string, sub: number): string {
  if (spec === 'os') return osWorkload(cache);
  if (spec === 'dense') return sub > 0 ? denseSub(cache, sub) : denseWorkload(cache);
  return resolve(spec);
}

function sh(cmd: string, args: string[]): void {
  execFileSync(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
}

/** A namespace for the agent behind a veth pair; the host side's netem carries rate and delay. */
function netnsUp(): void {
  netnsDown();
  sh('ip', ['netns', 'add', NS]);
  sh('ip', ['link', 'add', HOST_IF, 'type', 'veth', 'peer', 'name', NS_IF]);
  sh('ip', ['link', 'set', NS_IF, 'netns', NS]);
  sh('ip', ['addr', 'add', `${HOST_IP}/24`, 'dev', HOST_IF]);
  sh('ip', ['link', 'set', HOST_IF, 'up']);
  sh('ip', ['netns', 'exec', NS, 'ip', 'addr', 'add', `${NS_IP}/24`, 'dev', NS_IF]);
  sh('ip', ['netns', 'exec', NS, 'ip', 'link', 'set', NS_IF, 'up']);
  sh('ip', ['netns', 'exec', NS, 'ip', 'link', 'set', 'lo', 'up']);
}

function netnsShape(rate: number, rtt: number): void {
  // tbf shapes sender -> agent; the latency bound is a queue long enough that it delays, not drops.
  sh('tc', [
    'qdisc',
    'replace',
    'dev',
    HOST_IF,
    'root',
    'tbf',
    'rate',
    `${Math.round(rate * 8)}bit`,
    'burst',
    // tbf cannot reach its rate with a bucket smaller than rate / HZ (tc-tbf(8)); 1/100 s covers HZ >= 100.
    `${Math.max(256 * 1024, Math.ceil(rate / 100))}b`,
    'latency',
    '500ms',
  ]);
  // The round trip on the way back (agent -> sender), so the two qdiscs do not stack. Needs sch_netem,
  // which this VM's kernel lacks ("Error: Specified qdisc kind is unknown.").
  if (rtt > 0)
    sh('ip', [
      'netns',
      'exec',
      NS,
      'tc',
      'qdisc',
      'replace',
      'dev',
      NS_IF,
      'root',
      'netem',
      'delay',
      `${(rtt * 1000).toFixed(3)}ms`,
    ]);
}

function netnsDown(): void {
  try {
    sh('ip', ['netns', 'del', NS]);
  } catch {
    // not there
  }
  try {
    sh('ip', ['link', 'del', HOST_IF]);
  } catch {
    // gone with the namespace
  }
}

interface Served {
  child: ChildProcess;
  url: string;
  fingerprint: string;
}

async function serve(root: string, tokenFile: string, netns: boolean): Promise<Served> {
  const host = netns ? NS_IP : '127.0.0.1';
  const argv = [vmferryBin, 'serve', '--listen', `${host}:0`, '--root', root, '--token-file', tokenFile];
  const child = netns
    ? spawn('ip', ['netns', 'exec', NS, process.execPath, ...argv], { stdio: ['ignore', 'pipe', 'pipe'] })
    : spawn(process.execPath, argv, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
  });
  return new Promise((resolvePromise, reject) => {
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const fp = /fingerprint \(SHA-256\): (\S+)/.exec(out);
      const url = /listening on (https:\/\/\S+)/.exec(out);
      if (fp && url) resolvePromise({ child, url: url[1]!, fingerprint: fp[1]! });
    });
    child.once('exit', (code) => reject(new Error(`serve exited ${code}: ${err}`)));
  });
}

/** One `vmferry send` process: wall time from spawn to exit, and what it reported. */
function sendOnce(args: string[]): Promise<{ wall: number; inner: number; wire: number }> {
  return new Promise((resolvePromise, reject) => {
    const t0 = performance.now();
    const child = spawn(process.execPath, [vmferryBin, 'send', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
    });
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
    });
    child.once('exit', (code) => {
      const wall = (performance.now() - t0) / 1000;
      if (code !== 0) return reject(new Error(`send failed (${code}): ${err}`));
      const j = JSON.parse(out) as { seconds: number; wireBytes: number };
      resolvePromise({ wall, inner: j.seconds, wire: j.wireBytes });
    });
  });
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) >> 1]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  const cache = join(repoRoot, '.bench-cache');
  mkdirSync(cache, { recursive: true });
  const images = a.images.map((s) => resolveImage(s, cache, a.sub));
  const base = mkdtempSync(join(tmpdir(), 'vmferry-bench-transfer-'));
  const root = join(base, 'root');
  mkdirSync(root);
  const tokenFile = join(base, 'token');
  writeFileSync(tokenFile, 'bench-token-0123456789abcdef0123456789\n', { mode: 0o600 });
  if (a.netns) netnsUp();
  const agent = await serve(root, tokenFile, a.netns);
  console.log(
    `mode ${a.netns ? `netns (tbf rate${a.rtt ? `, netem delay ${a.rtt * 1000} ms` : ''})` : 'send --rate'}; ${a.runs} runs per row; streams ${a.streams}`,
  );
  console.log(
    'image                 codec rate(MB/s) estimate(s) [95%]      measured(s) [min..max]   diff   wire est/actual MiB  limited by',
  );
  const diffs: number[] = [];
  let n = 0;
  try {
    for (const image of images) {
      for (const codec of a.codecs) {
        for (const rate of a.rates) {
          if (a.netns) netnsShape(rate, a.rtt);
          const reader = await openImage(image);
          const est = await estimateTransfer(reader, { bandwidth: rate, codec, rtt: a.rtt, streams: a.streams });
          await reader.close();
          const walls: number[] = [];
          const inner: number[] = [];
          let wire = 0;
          for (let r = 0; r < a.runs; r++) {
            const name = `b${n++}.raw`;
            const args = [
              '-c',
              codec,
              '--streams',
              String(a.streams),
              '--token-file',
              tokenFile,
              '--fingerprint',
              agent.fingerprint,
            ];
            if (!a.netns) args.push('--rate', String(Math.round(rate)));
            const m = await sendOnce([...args, '--output', 'json', image, `${agent.url}/${name}`]);
            walls.push(m.wall);
            inner.push(m.inner);
            wire = m.wire;
            rmSync(join(root, name), { force: true });
          }
          const measured = median(walls);
          const e = est.seconds!;
          const diff = (e.mean - measured) / measured;
          diffs.push(Math.abs(diff));
          const label = image.length > 21 ? `…${image.slice(-20)}` : image;
          console.log(
            `${label.padEnd(21)} ${codec.padEnd(5)} ${(rate / 1e6).toFixed(0).padStart(10)} ${e.mean.toFixed(2).padStart(7)} [${e.low.toFixed(2)}..${e.high.toFixed(2)}]`.padEnd(
              67,
            ) +
              `${measured.toFixed(2).padStart(6)} [${Math.min(...walls).toFixed(2)}..${Math.max(...walls).toFixed(2)}]`.padEnd(
                22,
              ) +
              `${(diff * 100).toFixed(1).padStart(6)}%  ${(est.wireBytes.mean / MiB).toFixed(1)}/${(wire / MiB).toFixed(1)}`.padEnd(
                28,
              ) +
              `${est.limitedBy}`,
          );
          const t = est.terms!;
          const f = (x: number) => x.toFixed(2);
          console.log(
            `    terms: fixed ${f(t.fixed)} + max(net ${f(t.network)}, sender ${f(t.sender)}, agent ${f(t.agent)}) + fill ${f(t.fill)} + sync ${f(t.sync)} + verify ${f(t.verify)} s; send's own clock ${f(median(inner))} s`,
          );
        }
      }
    }
    console.log(`largest |difference| ${(Math.max(...diffs) * 100).toFixed(1)}% over ${diffs.length} rows (target: 15%)`);
  } finally {
    agent.child.kill('SIGTERM');
    await new Promise((r) => agent.child.once('exit', r));
    if (a.netns) netnsDown();
    rmSync(base, { recursive: true, force: true });
  }
}

main().catch((err) => {
  const e = err as Error & { stderr?: Buffer };
  console.error(`${e.message ?? e}${e.stderr ? ` ${e.stderr.toString().trim()}` : ''}`);
  if (parseArgs(process.argv.slice(2)).netns) netnsDown();
  process.exit(1);
});
