/** Shared plumbing for the transfer tests: agents in this process or as `vmferry serve` children. */
import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import '../../src/formats/index.js';
import { type Agent, type AgentOptions, startAgent } from '../../src/transfer/agent.js';
import { qemuImg, run, tmpDir, vmferryBin } from '../helpers/index.js';

export const TOKEN = 'test-token-0123456789abcdef0123456789';

export async function localAgent(extra: Partial<AgentOptions> = {}): Promise<{ agent: Agent; root: string; base: string }> {
  const base = tmpDir('vmferry-transfer-');
  const root = join(base, 'root');
  mkdirSync(root);
  const agent = await startAgent({ host: '127.0.0.1', port: 0, root, token: TOKEN, ...extra });
  return { agent, root, base };
}

/** qemu-img compare's verdict (exit 0 = identical guest content). */
export function identical(a: string, b: string, bFormat?: string): boolean {
  const args = ['compare', '-f', 'raw', ...(bFormat ? ['-F', bFormat] : []), a, b];
  const r = run('qemu-img', args);
  if (r.code === 2) throw new Error(`qemu-img compare failed: ${r.stderr}`);
  return r.code === 0;
}

export function qemuInfoFormat(path: string): string {
  return (JSON.parse(qemuImg('info', '--output=json', path)) as { format: string }).format;
}

/** A deterministic generator (mulberry32) for the kill points. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export interface Served {
  child: ChildProcess;
  url: string;
  stderr: () => string;
}

/** `vmferry serve --insecure` on loopback as a child process (so it can be killed with SIGKILL). */
export async function serveChild(root: string, tokenFile: string, extra: string[] = []): Promise<Served> {
  const child = spawn(
    process.execPath,
    [vmferryBin, 'serve', '--listen', '127.0.0.1:0', '--root', root, '--insecure', '--token-file', tokenFile, ...extra],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let out = '';
  let err = '';
  child.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
  });
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve did not start: ${err}`)), 30_000);
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const m = /listening on (http:\/\/\S+)/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]!);
      }
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`serve exited ${code}: ${err}`));
    });
  });
  return { child, url, stderr: () => err };
}

export interface SendRun {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** `vmferry send` as a child; `killAfterMs` sends SIGKILL that long after it starts. */
export function sendChild(
  args: string[],
  env: NodeJS.ProcessEnv,
  killAfterMs?: number,
  onSpawn?: (c: ChildProcess) => void,
): Promise<SendRun> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [vmferryBin, 'send', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, ...env },
    });
    onSpawn?.(child);
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => {
      stdout += d.toString();
    });
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    const timer = killAfterMs === undefined ? null : setTimeout(() => child.kill('SIGKILL'), killAfterMs);
    child.once('exit', (code, signal) => {
      if (timer) clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

export function exited(child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once('exit', () => resolve());
  });
}
