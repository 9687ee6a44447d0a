/** qemu-nbd servers for the NBD and warm-migration tests. */
import { type ChildProcess, spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { connect } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

export interface NbdServer {
  uri: string;
  proc: ChildProcess;
  stderr: () => string;
  stop: () => Promise<void>;
}

async function tcpOpen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, '127.0.0.1');
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

let portSeed = 20000 + Math.floor(Math.random() * 20000);

/**
 * Starts `qemu-nbd -t -r` on `file` (format `format`), on a UNIX socket or a TCP port on
 * 127.0.0.1, and waits until it listens. `extra` goes before the file name.
 */
export async function startQemuNbd(
  file: string,
  format: string,
  o: { socket?: string; tcp?: boolean; exportName?: string; extra?: string[]; uriScheme?: string; query?: string } = {},
): Promise<NbdServer> {
  const exportName = o.exportName ?? 'disk';
  const args = ['-t', '-r', '-f', format, '-x', exportName, ...(o.extra ?? [])];
  let uri: string;
  let port = 0;
  if (o.tcp) {
    port = portSeed++;
    args.push('-b', '127.0.0.1', '-p', String(port));
    uri = `${o.uriScheme ?? 'nbd'}://127.0.0.1:${port}/${exportName}${o.query ? `?${o.query}` : ''}`;
  } else {
    const socket = o.socket!;
    args.push('--socket', socket);
    uri = `${o.uriScheme ?? 'nbd+unix'}:///${exportName}?socket=${socket}${o.query ? `&${o.query}` : ''}`;
  }
  args.push(file);
  const proc = spawn('qemu-nbd', args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr!.on('data', (d: Buffer) => {
    err += d.toString();
  });
  let exited = false;
  proc.once('exit', () => {
    exited = true;
  });
  for (let i = 0; i < 200; i++) {
    if (exited) throw new Error(`qemu-nbd ${args.join(' ')} exited: ${err}`);
    if (o.tcp ? await tcpOpen(port) : existsSync(o.socket!)) break;
    await sleep(25);
  }
  return {
    uri,
    proc,
    stderr: () => err,
    stop: async () => {
      if (exited) return;
      const done = new Promise((r) => proc.once('exit', r));
      proc.kill('SIGTERM');
      await done;
    },
  };
}
