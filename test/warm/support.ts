/** Running QEMU VMs and vmferry side by side for the warm-migration tests. */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { QmpClient } from '../../src/migrate/qmp.js';
import { vmferryBin } from '../helpers/index.js';

export interface Proc {
  proc: ChildProcess;
  out: () => string;
  err: () => string;
  done: Promise<number | null>;
  kill: (signal?: NodeJS.Signals) => Promise<void>;
}

export function start(cmd: string, args: string[], env: NodeJS.ProcessEnv = process.env): Proc {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
  let out = '';
  let err = '';
  proc.stdout!.on('data', (d: Buffer) => {
    out += d.toString();
  });
  proc.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
  });
  let exited = false;
  const done = new Promise<number | null>((resolve) =>
    proc.once('exit', (code) => {
      exited = true;
      resolve(code);
    }),
  );
  return {
    proc,
    out: () => out,
    err: () => err,
    done,
    kill: async (signal = 'SIGTERM') => {
      if (exited) return;
      if (cmd === 'strace') {
        // The traced program is strace's child: signal it (killing strace alone would detach it).
        try {
          const kids = readFileSync(`/proc/${proc.pid}/task/${proc.pid}/children`, 'utf8').trim().split(/\s+/).filter(Boolean);
          for (const k of kids) process.kill(Number(k), signal);
        } catch {
          proc.kill(signal);
        }
      } else proc.kill(signal);
      await done;
    },
  };
}

/**
 * vmferry's CLI, optionally under strace recording every open (to prove what it opened for writing).
 * ACCEL=tcg: the target VM it starts runs under TCG (this machine's KVM cannot run these guests).
 */
export function startVmferry(args: string[], straceLog?: string): Proc {
  const env = { ...process.env, ACCEL: 'tcg' };
  if (straceLog) {
    return start(
      'strace',
      [
        '-f',
        '--detach-on=execve',
        '-qq',
        '-e',
        'trace=open,openat,openat2,creat,truncate',
        '-o',
        straceLog,
        process.execPath,
        vmferryBin,
        ...args,
      ],
      env,
    );
  }
  return start(process.execPath, [vmferryBin, ...args], env);
}

/** Files an strace log shows opened for writing (O_WRONLY/O_RDWR/O_CREAT) or truncated. */
export function writableOpens(straceLog: string): string[] {
  const out: string[] = [];
  for (const line of readFileSync(straceLog, 'utf8').split('\n')) {
    const m = /(?:open|openat|openat2)\((?:[^,]+, )?"([^"]+)", ([^,)]+)/.exec(line);
    if (m && /O_WRONLY|O_RDWR|O_CREAT|O_TRUNC/.test(m[2]!)) out.push(m[1]!);
    const t = /(?:creat|truncate)\("([^"]+)"/.exec(line);
    if (t) out.push(t[1]!);
  }
  return out;
}

export async function waitFor<T>(
  what: string,
  fn: () => T | undefined | false | Promise<T | undefined | false>,
  timeoutMs: number,
): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

export function fileText(path: string): string {
  return existsSync(path) ? readFileSync(path, 'latin1') : '';
}

/** One QMP exchange on a socket no one else holds. */
export async function qmpOnce<T>(socket: string, fn: (q: QmpClient) => Promise<T>): Promise<T> {
  const q = await QmpClient.connect(socket, { timeoutMs: 10_000 });
  try {
    return await fn(q);
  } finally {
    await q.close();
  }
}

export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
