/**
 * A QMP (QEMU Machine Protocol) client: JSON objects over a UNIX socket, one per line. The server
 * greets with {"QMP": {...}}; the client negotiates capabilities (qmp_capabilities) and then sends
 * commands with an id; replies carry {"return": ...} or {"error": {"class", "desc"}} and the same
 * id; events ({"event", "data", "timestamp"}) arrive at any time and are queued for waitEvent.
 */
import { connect, type Socket } from 'node:net';
import { VmferryError } from '../disk/errors.js';
import { endSocket } from '../transfer/socket.js';

/** QEMU refused a command: `qmpClass` is QEMU's error class (GenericError, DeviceNotFound, ...). */
export class QmpError extends VmferryError {
  constructor(
    message: string,
    readonly qmpClass: string,
    file: string,
  ) {
    super(message, file);
  }
}

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version?: { qemu?: { major: number; minor: number; micro: number }; package?: string };
  capabilities?: string[];
}

interface Pending {
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
  command: string;
}

/** The commands vmferry uses and what they return (others come back as unknown). */
export interface QmpReturns {
  'query-status': { running: boolean; status: string; singlestep?: boolean };
  'query-block': QmpBlockInfo[];
  'query-name': { name?: string };
  'query-version': { qemu: { major: number; minor: number; micro: number }; package: string };
  [command: string]: unknown;
}

export interface QmpBlockInfo {
  device: string;
  qdev?: string;
  removable?: boolean;
  inserted?: {
    file: string;
    'node-name'?: string;
    drv: string;
    ro: boolean;
    image?: { filename: string; format: string; 'virtual-size': number; 'backing-image'?: unknown };
    'dirty-bitmaps'?: { name?: string; count: number; granularity: number; recording?: boolean; persistent?: boolean }[];
  };
}

const MAX_LINE = 64 * 1024 * 1024;

export class QmpClient {
  private buffer = '';
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private readonly events: QmpEvent[] = [];
  private readonly waiters: { match: (e: QmpEvent) => boolean; resolve: (e: QmpEvent) => void }[] = [];
  private closedError?: Error;
  greeting: QmpGreeting = {};

  private constructor(
    private readonly socket: Socket,
    readonly path: string,
    readonly defaultTimeout: number,
  ) {}

  /** Connects, reads the greeting and negotiates capabilities. */
  static async connect(path: string, options: { timeoutMs?: number } = {}): Promise<QmpClient> {
    const timeoutMs = options.timeoutMs ?? 30_000;
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = connect(path);
      const timer = setTimeout(() => {
        s.destroy();
        reject(new VmferryError(`no QMP connection after ${timeoutMs} ms`, path));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once('error', (err) => {
        clearTimeout(timer);
        reject(new VmferryError(`cannot connect to the QMP socket: ${(err as Error).message}`, path));
      });
    });
    const client = new QmpClient(socket, path, timeoutMs);
    const greeting = new Promise<QmpGreeting>((resolve, reject) => {
      client.onGreeting = resolve;
      client.onGreetingError = reject;
    });
    socket.setEncoding('utf8');
    socket.on('data', (chunk: string) => client.receive(chunk));
    socket.on('error', (err) => client.fail(new VmferryError(`QMP connection error: ${err.message}`, path)));
    socket.on('close', () => client.fail(new VmferryError('QEMU closed the QMP connection', path)));
    const timer = setTimeout(
      () => client.fail(new VmferryError(`no QMP greeting after ${timeoutMs} ms (is it a QMP socket?)`, path)),
      timeoutMs,
    );
    try {
      client.greeting = await greeting;
    } finally {
      clearTimeout(timer);
    }
    await client.execute('qmp_capabilities');
    return client;
  }

  private onGreeting?: (g: QmpGreeting) => void;
  private onGreetingError?: (e: Error) => void;

  private receive(chunk: string): void {
    this.buffer += chunk;
    if (this.buffer.length > MAX_LINE) {
      this.fail(new VmferryError('QMP message longer than 64 MiB; refusing', this.path));
      this.socket.destroy();
      return;
    }
    let nl = this.buffer.indexOf('\n');
    while (nl >= 0) {
      const line = this.buffer.slice(0, nl).trim();
      this.buffer = this.buffer.slice(nl + 1);
      if (line) this.message(line);
      nl = this.buffer.indexOf('\n');
    }
  }

  private message(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      this.fail(new VmferryError(`QMP sent a line that is not JSON: ${line.slice(0, 80)}`, this.path));
      return;
    }
    if (msg.QMP && this.onGreeting) {
      this.onGreeting(msg.QMP as QmpGreeting);
      this.onGreeting = undefined;
      this.onGreetingError = undefined;
      return;
    }
    if (typeof msg.event === 'string') {
      const ev = msg as unknown as QmpEvent;
      const w = this.waiters.findIndex((x) => x.match(ev));
      if (w >= 0) this.waiters.splice(w, 1)[0]!.resolve(ev);
      else {
        this.events.push(ev);
        if (this.events.length > 1000) this.events.shift();
      }
      return;
    }
    const id = msg.id === undefined ? undefined : String(msg.id);
    const p = id === undefined ? undefined : this.pending.get(id);
    if (!p) return;
    this.pending.delete(id!);
    clearTimeout(p.timer);
    if (msg.error) {
      const e = msg.error as { class?: string; desc?: string };
      p.reject(new QmpError(`QMP ${p.command}: ${e.desc ?? 'error'}`, e.class ?? 'GenericError', this.path));
    } else p.resolve(msg.return);
  }

  private fail(err: Error): void {
    if (this.closedError) return;
    this.closedError = err;
    this.onGreetingError?.(err);
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(err);
    }
  }

  /** Runs one command; rejects with QmpError when QEMU refuses it, or after the timeout. */
  execute<K extends keyof QmpReturns & string>(
    command: K,
    args?: Record<string, unknown>,
    options: { timeoutMs?: number } = {},
  ): Promise<QmpReturns[K]> {
    if (this.closedError) return Promise.reject(this.closedError);
    const id = `vmferry-${this.nextId++}`;
    const timeoutMs = options.timeoutMs ?? this.defaultTimeout;
    return new Promise<QmpReturns[K]>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new VmferryError(`QMP ${command}: no reply after ${timeoutMs} ms`, this.path));
      }, timeoutMs);
      this.pending.set(id, { resolve: resolve as (v: unknown) => void, reject, timer, command });
      const msg: Record<string, unknown> = { execute: command, id };
      if (args) msg.arguments = args;
      this.socket.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /** The first event named `name` (already queued or still to come) that `match` accepts. */
  waitEvent(name: string, options: { timeoutMs?: number; match?: (e: QmpEvent) => boolean } = {}): Promise<QmpEvent> {
    const match = (e: QmpEvent) => e.event === name && (options.match ? options.match(e) : true);
    const queued = this.events.findIndex(match);
    if (queued >= 0) return Promise.resolve(this.events.splice(queued, 1)[0]!);
    if (this.closedError) return Promise.reject(this.closedError);
    const timeoutMs = options.timeoutMs ?? this.defaultTimeout;
    return new Promise<QmpEvent>((resolve, reject) => {
      const waiter = {
        match,
        resolve: (e: QmpEvent) => {
          clearTimeout(timer);
          resolve(e);
        },
      };
      const timer = setTimeout(() => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new VmferryError(`QMP: no ${name} event after ${timeoutMs} ms`, this.path));
      }, timeoutMs);
      this.waiters.push(waiter);
    });
  }

  /** Events received so far that no waiter took (oldest first); clears the queue. */
  drainEvents(): QmpEvent[] {
    return this.events.splice(0, this.events.length);
  }

  async close(): Promise<void> {
    this.fail(new VmferryError('QMP connection closed', this.path));
    await endSocket(this.socket);
  }
}
