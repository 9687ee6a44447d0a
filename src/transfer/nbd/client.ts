/**
 * An NBD client connection (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md):
 * fixed-newstyle handshake, optional STARTTLS, structured replies, meta contexts
 * (base:allocation, qemu:dirty-bitmap:NAME), NBD_OPT_GO with block-size info (NBD_OPT_EXPORT_NAME
 * as the fallback), then pipelined NBD_CMD_READ and NBD_CMD_BLOCK_STATUS requests, each answered
 * by a simple or a chain of structured reply chunks matched by cookie.
 */
import { readFileSync } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { type TLSSocket, connect as tlsConnect } from 'node:tls';
import { UnsupportedFeatureError, UsageError, VmferryError } from '../../disk/errors.js';
import { endSocket } from '../socket.js';
import type { NbdAddress } from './uri.js';

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const OLDSTYLE_MAGIC = 0x00420281861253n;
const OPT_REPLY_MAGIC = 0x3e889045565a9n;
const REQUEST_MAGIC = 0x25609513;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;

const OPT_EXPORT_NAME = 1;
const OPT_STARTTLS = 5;
const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_SET_META_CONTEXT = 10;

const REP_ACK = 1;
const REP_INFO = 3;
const REP_META_CONTEXT = 4;
const REP_ERR_BIT = 0x80000000;
const REP_ERR_UNSUP = REP_ERR_BIT + 1;
const REP_ERR_POLICY = REP_ERR_BIT + 2;
const REP_ERR_TLS_REQD = REP_ERR_BIT + 5;
const REP_ERR_UNKNOWN = REP_ERR_BIT + 6;

const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;

const CMD_READ = 0;
const CMD_DISC = 2;
const CMD_BLOCK_STATUS = 7;

const REPLY_FLAG_DONE = 1;
const REPLY_TYPE_NONE = 0;
const REPLY_TYPE_OFFSET_DATA = 1;
const REPLY_TYPE_OFFSET_HOLE = 2;
const REPLY_TYPE_BLOCK_STATUS = 5;
const REPLY_TYPE_ERROR_BIT = 0x8000;

/** base:allocation flags. */
export const NBD_STATE_HOLE = 1;
export const NBD_STATE_ZERO = 2;
/** qemu:dirty-bitmap:NAME flag. */
export const NBD_STATE_DIRTY = 1;

/** Transmission flags. */
export const NBD_FLAG_READ_ONLY = 2;

const ERRNO: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};

/** Longest option reply and structured chunk header payload accepted beyond the data asked for. */
const MAX_OPTION_REPLY = 16 * 1024 * 1024;
const MAX_STATUS_PAYLOAD = 64 * 1024 * 1024;

/** Buffered exact reads from a socket. */
class ByteStream {
  private chunks: Buffer[] = [];
  private available = 0;
  /** n = 0: wake as soon as any byte is buffered, consuming nothing. */
  private waiter?: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void };
  private error?: Error;
  private readonly onData = (b: Buffer) => {
    this.chunks.push(b);
    this.available += b.length;
    this.wake();
  };
  private readonly onEnd = () => this.fail(new Error('the server closed the connection'));
  private readonly onError = (e: Error) => this.fail(e);

  constructor(private readonly socket: Socket | TLSSocket) {
    socket.on('data', this.onData);
    socket.on('end', this.onEnd);
    socket.on('close', this.onEnd);
    socket.on('error', this.onError);
  }

  detach(): void {
    this.socket.off('data', this.onData);
    this.socket.off('end', this.onEnd);
    this.socket.off('close', this.onEnd);
    this.socket.off('error', this.onError);
  }

  get buffered(): number {
    return this.available;
  }

  fail(e: Error): void {
    if (!this.error) this.error = e;
    const w = this.waiter;
    if (w) {
      this.waiter = undefined;
      w.reject(e);
    }
  }

  private wake(): void {
    const w = this.waiter;
    if (w && w.n === 0 && this.available > 0) {
      this.waiter = undefined;
      w.resolve(Buffer.alloc(0));
    } else if (w && w.n > 0 && this.available >= w.n) {
      this.waiter = undefined;
      w.resolve(this.take(w.n));
    }
  }

  private take(n: number): Buffer {
    this.available -= n;
    const first = this.chunks[0];
    if (first && first.length >= n) {
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let done = 0;
    while (done < n) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, n - done);
      c.copy(out, done, 0, k);
      done += k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    return out;
  }

  /** Reads exactly target.length bytes straight into `target` (no intermediate buffer). */
  async readInto(target: Buffer): Promise<void> {
    let done = 0;
    while (done < target.length) {
      if (this.available === 0) {
        if (this.error) throw this.error;
        await new Promise<void>((resolve, reject) => {
          this.waiter = { n: 0, resolve: () => resolve(), reject };
        });
        continue;
      }
      const c = this.chunks[0]!;
      const k = Math.min(c.length, target.length - done);
      c.copy(target, done, 0, k);
      done += k;
      this.available -= k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
  }

  read(n: number): Promise<Buffer> {
    if (this.available >= n) return Promise.resolve(this.take(n));
    if (this.error) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
    });
  }
}

export interface BlockStatusDescriptor {
  length: number;
  flags: number;
}

interface PendingRead {
  kind: 'read';
  offset: number;
  length: number;
  into: Buffer;
  error?: string;
  resolve: (b: Buffer) => void;
  reject: (e: Error) => void;
}

interface PendingStatus {
  kind: 'status';
  offset: number;
  length: number;
  results: Map<number, BlockStatusDescriptor[]>;
  error?: string;
  resolve: (r: Map<number, BlockStatusDescriptor[]>) => void;
  reject: (e: Error) => void;
}

type Pending = PendingRead | PendingStatus;

export interface NbdConnectOptions {
  /** Meta contexts to negotiate (base:allocation, qemu:dirty-bitmap:NAME). */
  metaContexts?: string[];
  timeoutMs?: number;
}

/** One NBD connection in the transmission phase. */
export class NbdConnection {
  size = 0;
  transmissionFlags = 0;
  structuredReplies = false;
  /** Negotiated meta contexts, name -> id. */
  readonly contexts = new Map<string, number>();
  minBlock = 1;
  preferredBlock = 4096;
  maxBlock = 32 * 1024 * 1024;
  tls = false;
  private stream!: ByteStream;
  private socket!: Socket | TLSSocket;
  private readonly pending = new Map<number, Pending>();
  private nextCookie = 1;
  private failed?: Error;

  private constructor(
    readonly name: string,
    readonly address: NbdAddress,
  ) {}

  static async connect(name: string, address: NbdAddress, options: NbdConnectOptions = {}): Promise<NbdConnection> {
    const c = new NbdConnection(name, address);
    const timeoutMs = options.timeoutMs ?? 30_000;
    c.socket = await new Promise<Socket>((resolve, reject) => {
      const s = address.socket ? netConnect(address.socket) : netConnect(address.port!, address.host!);
      const timer = setTimeout(() => {
        s.destroy();
        reject(new VmferryError(`no NBD connection after ${timeoutMs} ms`, name));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        s.setNoDelay(true);
        resolve(s);
      });
      s.once('error', (e) => {
        clearTimeout(timer);
        reject(new VmferryError(`cannot connect to the NBD server: ${e.message}`, name));
      });
    });
    c.stream = new ByteStream(c.socket);
    const timer = setTimeout(() => {
      c.stream.fail(new Error(`handshake did not finish in ${timeoutMs} ms`));
      c.socket.destroy();
    }, timeoutMs);
    try {
      await c.handshake(options.metaContexts ?? []);
    } catch (err) {
      c.socket.destroy();
      if (err instanceof VmferryError) throw err;
      throw new VmferryError(`NBD handshake failed: ${(err as Error).message}`, name);
    } finally {
      clearTimeout(timer);
    }
    void c.replyLoop();
    return c;
  }

  private protocolError(msg: string): VmferryError {
    return new VmferryError(`NBD protocol error: ${msg}`, this.name);
  }

  private write(buf: Buffer): void {
    this.socket.write(buf);
  }

  private sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.write(Buffer.concat([h, data]));
  }

  private async optionReply(option: number): Promise<{ type: number; data: Buffer }> {
    const h = await this.stream.read(20);
    if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw this.protocolError('bad option reply magic');
    if (h.readUInt32BE(8) !== option) throw this.protocolError(`reply to option ${h.readUInt32BE(8)}, expected ${option}`);
    const type = h.readUInt32BE(12);
    const length = h.readUInt32BE(16);
    if (length > MAX_OPTION_REPLY) throw this.protocolError(`option reply of ${length} bytes`);
    const data = length ? await this.stream.read(length) : Buffer.alloc(0);
    return { type, data };
  }

  private replyError(type: number, data: Buffer, what: string): VmferryError {
    const text = data.length ? `: ${data.toString('utf8').slice(0, 200)}` : '';
    if (type === REP_ERR_TLS_REQD)
      return new UnsupportedFeatureError(`the server requires TLS for ${what}; use nbds:// or nbds+unix://`, this.name);
    if (type === REP_ERR_UNKNOWN)
      return new VmferryError(`the server has no export '${this.address.exportName}'${text}`, this.name);
    if (type === REP_ERR_POLICY) return new VmferryError(`the server refused ${what} by policy${text}`, this.name);
    return new VmferryError(`the server refused ${what} (error ${type - REP_ERR_BIT})${text}`, this.name);
  }

  private exportNameBuffer(): Buffer {
    const n = Buffer.from(this.address.exportName, 'utf8');
    if (n.length > 4096) throw new UsageError('NBD export name longer than 4096 bytes', this.name);
    const b = Buffer.alloc(4 + n.length);
    b.writeUInt32BE(n.length, 0);
    n.copy(b, 4);
    return b;
  }

  private async handshake(metaContexts: string[]): Promise<void> {
    const h = await this.stream.read(16);
    if (h.readBigUInt64BE(0) !== NBDMAGIC) throw new VmferryError('not an NBD server (no NBDMAGIC greeting)', this.name);
    const second = h.readBigUInt64BE(8);
    if (second === OLDSTYLE_MAGIC)
      throw new UnsupportedFeatureError('the server speaks the oldstyle NBD handshake; only newstyle is supported', this.name);
    if (second !== IHAVEOPT) throw this.protocolError('unknown handshake magic');
    const flags = (await this.stream.read(2)).readUInt16BE(0);
    if (!(flags & FLAG_FIXED_NEWSTYLE))
      throw new UnsupportedFeatureError('the server does not offer the fixed-newstyle handshake', this.name);
    const noZeroes = (flags & FLAG_NO_ZEROES) !== 0;
    const cf = Buffer.alloc(4);
    cf.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (noZeroes ? FLAG_NO_ZEROES : 0), 0);
    this.write(cf);

    if (this.address.tls) await this.startTls();

    this.sendOption(OPT_STRUCTURED_REPLY);
    const sr = await this.optionReply(OPT_STRUCTURED_REPLY);
    if (sr.type === REP_ACK) this.structuredReplies = true;
    else if (sr.type === REP_ERR_TLS_REQD) throw this.replyError(sr.type, sr.data, 'structured replies');

    if (this.structuredReplies && metaContexts.length > 0) {
      const queries = metaContexts.map((q) => {
        const s = Buffer.from(q, 'utf8');
        const b = Buffer.alloc(4 + s.length);
        b.writeUInt32BE(s.length, 0);
        s.copy(b, 4);
        return b;
      });
      const count = Buffer.alloc(4);
      count.writeUInt32BE(queries.length, 0);
      this.sendOption(OPT_SET_META_CONTEXT, Buffer.concat([this.exportNameBuffer(), count, ...queries]));
      for (;;) {
        const r = await this.optionReply(OPT_SET_META_CONTEXT);
        if (r.type === REP_META_CONTEXT) {
          if (r.data.length < 4) throw this.protocolError('short meta context reply');
          this.contexts.set(r.data.subarray(4).toString('utf8'), r.data.readUInt32BE(0));
        } else if (r.type === REP_ACK) break;
        else if (r.type & REP_ERR_BIT) {
          if (r.type === REP_ERR_UNSUP) break;
          throw this.replyError(r.type, r.data, 'the meta contexts');
        }
      }
    }

    const infos = Buffer.alloc(4);
    infos.writeUInt16BE(1, 0);
    infos.writeUInt16BE(INFO_BLOCK_SIZE, 2);
    this.sendOption(OPT_GO, Buffer.concat([this.exportNameBuffer(), infos]));
    let gotExport = false;
    for (;;) {
      const r = await this.optionReply(OPT_GO);
      if (r.type === REP_INFO) {
        if (r.data.length < 2) throw this.protocolError('short info reply');
        const kind = r.data.readUInt16BE(0);
        if (kind === INFO_EXPORT && r.data.length >= 12) {
          this.size = Number(r.data.readBigUInt64BE(2));
          this.transmissionFlags = r.data.readUInt16BE(10);
          gotExport = true;
        } else if (kind === INFO_BLOCK_SIZE && r.data.length >= 14) {
          this.minBlock = r.data.readUInt32BE(2);
          this.preferredBlock = r.data.readUInt32BE(6);
          this.maxBlock = r.data.readUInt32BE(10);
        }
      } else if (r.type === REP_ACK) break;
      else if (r.type === REP_ERR_UNSUP) {
        // An old server: NBD_OPT_EXPORT_NAME ends the handshake with the export's size and flags.
        const name = Buffer.from(this.address.exportName, 'utf8');
        const hdr = Buffer.alloc(16);
        hdr.writeBigUInt64BE(IHAVEOPT, 0);
        hdr.writeUInt32BE(OPT_EXPORT_NAME, 8);
        hdr.writeUInt32BE(name.length, 12);
        this.write(Buffer.concat([hdr, name]));
        const e = await this.stream.read(10 + (noZeroes ? 0 : 124));
        this.size = Number(e.readBigUInt64BE(0));
        this.transmissionFlags = e.readUInt16BE(8);
        gotExport = true;
        this.contexts.clear();
        this.structuredReplies = false;
        break;
      } else if (r.type & REP_ERR_BIT) throw this.replyError(r.type, r.data, `export '${this.address.exportName}'`);
    }
    if (!gotExport) throw this.protocolError('the server did not say the export size');
    if (!Number.isSafeInteger(this.size) || this.size < 0) throw this.protocolError(`export size ${this.size}`);
    if (!(this.minBlock >= 1 && this.minBlock <= 65536 && (this.minBlock & (this.minBlock - 1)) === 0)) this.minBlock = 1;
    if (!(this.maxBlock >= this.minBlock)) this.maxBlock = 32 * 1024 * 1024;
    this.maxBlock = Math.min(this.maxBlock, 32 * 1024 * 1024);
  }

  private async startTls(): Promise<void> {
    const tlsOpts = this.address.tls!;
    this.sendOption(OPT_STARTTLS);
    const r = await this.optionReply(OPT_STARTTLS);
    if (r.type !== REP_ACK) throw this.replyError(r.type, r.data, 'STARTTLS');
    if (this.stream.buffered > 0) throw this.protocolError('data after the STARTTLS reply');
    this.stream.detach();
    const raw = this.socket as Socket;
    const read = (p: string | undefined) => {
      if (!p) return undefined;
      try {
        return readFileSync(p);
      } catch (err) {
        throw new UsageError(`cannot read TLS file: ${(err as Error).message}`, p);
      }
    };
    const secure = await new Promise<TLSSocket>((resolve, reject) => {
      const s = tlsConnect({
        socket: raw,
        ca: read(tlsOpts.ca),
        cert: read(tlsOpts.cert),
        key: read(tlsOpts.key),
        servername: tlsOpts.servername ?? this.address.host ?? 'localhost',
        rejectUnauthorized: !tlsOpts.insecure,
        minVersion: 'TLSv1.2',
      });
      s.once('secureConnect', () => resolve(s));
      s.once('error', (e) => reject(new VmferryError(`TLS handshake failed: ${e.message}`, this.name)));
    });
    this.socket = secure;
    this.stream = new ByteStream(secure);
    this.tls = true;
  }

  private failAll(err: Error): void {
    if (!this.failed) this.failed = err;
    for (const [cookie, p] of this.pending) {
      this.pending.delete(cookie);
      p.reject(err);
    }
  }

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const m = await this.stream.read(4);
        const magic = m.readUInt32BE(0);
        if (magic === SIMPLE_REPLY_MAGIC) {
          const h = await this.stream.read(12);
          const error = h.readUInt32BE(0);
          const cookie = Number(h.readBigUInt64BE(4));
          const p = this.pending.get(cookie);
          if (!p) throw this.protocolError(`reply for unknown request ${cookie}`);
          this.pending.delete(cookie);
          if (error) p.reject(this.commandError(p, error));
          else if (p.kind === 'read') {
            await this.stream.readInto(p.into.subarray(0, p.length));
            p.resolve(p.into);
          } else p.reject(this.protocolError('simple reply to a block status request'));
        } else if (magic === STRUCTURED_REPLY_MAGIC) {
          const h = await this.stream.read(16);
          const flags = h.readUInt16BE(0);
          const type = h.readUInt16BE(2);
          const cookie = Number(h.readBigUInt64BE(4));
          const length = h.readUInt32BE(12);
          const p = this.pending.get(cookie);
          if (!p) throw this.protocolError(`reply chunk for unknown request ${cookie}`);
          const limit = p.kind === 'read' ? p.length + 8 : MAX_STATUS_PAYLOAD;
          if (length > limit) throw this.protocolError(`reply chunk of ${length} bytes for a ${p.length}-byte request`);
          if (p.kind === 'read' && type === REPLY_TYPE_OFFSET_DATA && length >= 8) {
            // Data goes straight from the socket into the caller's buffer, after a bounds check.
            const at = Number((await this.stream.read(8)).readBigUInt64BE(0)) - p.offset;
            const n = length - 8;
            if (at < 0 || at + n > p.length) throw this.protocolError('read chunk outside the request');
            await this.stream.readInto(p.into.subarray(at, at + n));
          } else {
            const payload = length ? await this.stream.read(length) : Buffer.alloc(0);
            this.chunk(p, type, payload);
          }
          if (flags & REPLY_FLAG_DONE) {
            this.pending.delete(cookie);
            if (p.error) p.reject(new VmferryError(p.error, this.name));
            else if (p.kind === 'read') p.resolve(p.into);
            else p.resolve(p.results);
          }
        } else throw this.protocolError(`unknown reply magic 0x${magic.toString(16)}`);
      }
    } catch (err) {
      const e = err instanceof VmferryError ? err : new VmferryError(`NBD connection lost: ${(err as Error).message}`, this.name);
      this.failAll(e);
      this.socket.destroy();
    }
  }

  private commandError(p: Pending, errno: number): VmferryError {
    const what = p.kind === 'read' ? 'read' : 'block status';
    return new VmferryError(
      `NBD ${what} of ${p.length} bytes at ${p.offset} failed: ${ERRNO[errno] ?? `error ${errno}`}`,
      this.name,
    );
  }

  private chunk(p: Pending, type: number, payload: Buffer): void {
    if (type & REPLY_TYPE_ERROR_BIT) {
      if (payload.length < 6) throw this.protocolError('short error chunk');
      const errno = payload.readUInt32BE(0);
      const msgLen = payload.readUInt16BE(4);
      const msg = payload.subarray(6, 6 + msgLen).toString('utf8');
      p.error = `NBD ${p.kind === 'read' ? 'read' : 'block status'} at ${p.offset} failed: ${ERRNO[errno] ?? `error ${errno}`}${msg ? ` (${msg})` : ''}`;
      return;
    }
    if (type === REPLY_TYPE_NONE) return;
    if (p.kind === 'read') {
      if (type !== REPLY_TYPE_OFFSET_DATA && type !== REPLY_TYPE_OFFSET_HOLE)
        throw this.protocolError(`chunk type ${type} in a read reply`);
      if (payload.length < (type === REPLY_TYPE_OFFSET_HOLE ? 12 : 8)) throw this.protocolError('short read chunk');
      const at = Number(payload.readBigUInt64BE(0)) - p.offset;
      const n = type === REPLY_TYPE_OFFSET_DATA ? payload.length - 8 : payload.readUInt32BE(8);
      if (at < 0 || at + n > p.length) throw this.protocolError('read chunk outside the request');
      if (type === REPLY_TYPE_OFFSET_DATA) payload.copy(p.into, at, 8);
      else p.into.fill(0, at, at + n);
      return;
    }
    if (type !== REPLY_TYPE_BLOCK_STATUS) throw this.protocolError(`chunk type ${type} in a block status reply`);
    if (payload.length < 4 || (payload.length - 4) % 8 !== 0) throw this.protocolError('malformed block status chunk');
    const id = payload.readUInt32BE(0);
    const list: BlockStatusDescriptor[] = [];
    for (let i = 4; i < payload.length; i += 8)
      list.push({ length: payload.readUInt32BE(i), flags: payload.readUInt32BE(i + 4) });
    p.results.set(id, list);
  }

  private request(type: number, offset: number, length: number, cmdFlags = 0): number {
    if (this.failed) throw this.failed;
    const cookie = this.nextCookie++;
    const h = Buffer.alloc(28);
    h.writeUInt32BE(REQUEST_MAGIC, 0);
    h.writeUInt16BE(cmdFlags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(cookie), 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.write(h);
    return cookie;
  }

  /** Reads [offset, offset+length) (length at most maxBlock, inside the export) into `into`. */
  read(offset: number, length: number, into: Buffer = Buffer.allocUnsafe(length)): Promise<Buffer> {
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => {
      const cookie = this.request(CMD_READ, offset, length);
      this.pending.set(cookie, { kind: 'read', offset, length, into, resolve, reject });
    });
  }

  /** Block status of [offset, offset+length) for every negotiated context, by context id. */
  blockStatus(offset: number, length: number): Promise<Map<number, BlockStatusDescriptor[]>> {
    if (this.failed) return Promise.reject(this.failed);
    return new Promise((resolve, reject) => {
      const cookie = this.request(CMD_BLOCK_STATUS, offset, length);
      this.pending.set(cookie, { kind: 'status', offset, length, results: new Map(), resolve, reject });
    });
  }

  async close(): Promise<void> {
    if (!this.failed && !this.socket.destroyed) {
      try {
        this.request(CMD_DISC, 0, 0);
      } catch {
        // already failing
      }
    }
    this.failAll(new VmferryError('NBD connection closed', this.name));
    await endSocket(this.socket);
  }
}
