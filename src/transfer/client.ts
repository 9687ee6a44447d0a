/**
 * The sending side (`vmferry send`, and later `migrate --out https://...`): reads any image
 * through the disk plane, sends only allocated data in compressed, digested chunks over several
 * streams, resumes where the agent's committed state ends, and compares content digests at the end.
 */
import { createHash, X509Certificate } from 'node:crypto';
import { realpathSync, statSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import { hostname, userInfo } from 'node:os';
import tls from 'node:tls';
import { UsageError, VmferryError } from '../disk/errors.js';
import { type OpenImageOptions, openImage } from '../disk/registry.js';
import type { DiskReader } from '../disk/types.js';
import { isZero } from '../disk/zero.js';
import { blockPieces, ContentDigest, DIGEST_BLOCK } from './digest.js';
import {
  type BeginRequest,
  type BeginResponse,
  type ChunkMeta,
  type ChunkPiece,
  chunkDigest,
  encodeChunk,
  type FileResponse,
  type FinishResponse,
  GRAIN,
  PROTOCOL_VERSION,
  packPayload,
  type WireCodec,
} from './protocol.js';
import { isLoopback, normaliseFingerprint, TransferRefusedError } from './security.js';

/** The network or the agent failed; what was committed stays, and the same send resumes. */
export class TransferError extends VmferryError {}

/** The agent's --max-file-size refused the transfer (HTTP 413): running it again would be refused again. */
export class TransferTooLargeError extends TransferRefusedError {}

export interface SendOptions {
  /** https://HOST:PORT/NAME (or http:// to an --insecure loopback agent). */
  url: string;
  token: string;
  /** -f: the source's format (probed when absent). */
  sourceFormat?: string;
  /** -O: the format the agent writes (raw when absent). */
  targetFormat?: string;
  /** -o: the target format's create options. */
  options?: Record<string, string>;
  codec?: WireCodec;
  /** Compression level for the codec. */
  level?: number;
  /** Bytes per second on the wire (all streams together). */
  rate?: number;
  /** Requests in flight at once. */
  streams?: number;
  /** Pin the agent's certificate (SHA-256). */
  fingerprint?: string;
  /** Replace a file of that name on the agent. */
  overwrite?: boolean;
  open?: Omit<OpenImageOptions, 'format'>;
  /** Opens the source instead of openImage(source) (a disk inside a package, a padded reader); `source` then only names it. */
  openReader?: () => Promise<DiskReader>;
  /** Ask the agent for the written file's SHA-256 and size (for a manifest). */
  fileSha256?: boolean;
  onProgress?: (p: { done: number; total: number; wireBytes: number }) => void;
  log?: (line: string) => void;
  /** Attempts per chunk when it is damaged in transit or the connection breaks. */
  maxAttempts?: number;
  /** How long to keep retrying a busy agent, seconds. */
  busyWaitSeconds?: number;
}

export interface SendResult {
  name: string;
  virtualSize: number;
  /** Where this run started (a resume starts past 0). */
  resumedAt: number;
  /** Guest data bytes carried in chunks (zeros and holes excluded). */
  dataBytes: number;
  /** Payload bytes put on the wire, re-sends included. */
  wireBytes: number;
  /** Of those, bytes sent again after a damaged chunk or broken connection. */
  resentBytes: number;
  resentChunks: number;
  chunks: number;
  digest: string;
  /** Wire bytes the agent received for this transfer over its life (across resumes). */
  agentReceivedBytes: number;
  seconds: number;
  note?: string;
  /** The agent's own content digest, read back from the written image (equal to `digest`). */
  agentDigest: string;
  /** Absolute folder on the agent holding the result, as the agent reports it. */
  agentDir?: string;
  /** Bytes of the written file on the agent, and its SHA-256 when asked for. */
  fileSize?: number;
  fileSha256?: string;
}

interface Endpoint {
  base: URL;
  name: string;
  agent: http.Agent;
  mod: typeof http | typeof https;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function parseTarget(url: string): { base: URL; name: string } {
  let u: URL;
  try {
    u = new URL(url);
  } catch {
    throw new UsageError(`'${url}' is not a URL (https://HOST:PORT/NAME)`);
  }
  if (u.protocol !== 'https:' && u.protocol !== 'http:')
    throw new UsageError(`'${url}': only https:// (or http:// to a loopback agent)`);
  if (u.protocol === 'http:' && !isLoopback(u.hostname)) {
    throw new UsageError(`'${url}': plain http is only allowed to a loopback address; the token would travel in clear`);
  }
  const parts = u.pathname.split('/').filter((p) => p.length > 0);
  if (parts.length !== 1 && parts.length !== 2)
    throw new UsageError(
      `'${url}': the path must be a file name, or one folder and a file name (https://HOST:PORT/[PREFIX/]NAME)`,
    );
  let name: string;
  try {
    name = parts.map((p) => decodeURIComponent(p)).join('/');
  } catch {
    throw new UsageError(`'${url}': the path is not valid percent-encoding`);
  }
  return { base: new URL(`${u.protocol}//${u.host}`), name };
}

/** Fetches the agent's certificate once and checks it against the pin; connections then trust only it. */
async function pinnedCa(base: URL, fingerprint: string): Promise<string> {
  const want = normaliseFingerprint(fingerprint);
  const host = base.hostname.replace(/^\[|\]$/g, '');
  const der = await new Promise<Buffer>((resolve, reject) => {
    const sock = tls.connect(
      { host, port: Number(base.port || 443), rejectUnauthorized: false, minVersion: 'TLSv1.3', servername: undefined },
      () => {
        const cert = sock.getPeerCertificate();
        sock.destroy();
        if (!cert?.raw) reject(new TransferError('the agent presented no certificate', base.href));
        else resolve(cert.raw);
      },
    );
    sock.once('error', (err) => reject(new TransferError(`cannot reach the agent: ${err.message}`, base.href)));
  });
  const x = new X509Certificate(der);
  if (x.fingerprint256 !== want) {
    throw new TransferRefusedError(
      `the agent's certificate fingerprint ${x.fingerprint256} does not match the pinned ${want}; refusing to send`,
      base.href,
    );
  }
  return x.toString();
}

async function endpoint(url: string, streams: number, fingerprint?: string): Promise<Endpoint> {
  const { base, name } = parseTarget(url);
  if (base.protocol === 'http:') {
    return { base, name, agent: new http.Agent({ keepAlive: true, maxSockets: streams }), mod: http };
  }
  const options: https.AgentOptions = { keepAlive: true, maxSockets: streams, minVersion: 'TLSv1.3' };
  if (fingerprint) {
    options.ca = await pinnedCa(base, fingerprint);
    // The pin replaces name checks: only that exact certificate is trusted.
    options.checkServerIdentity = () => undefined;
  }
  return { base, name, agent: new https.Agent(options), mod: https };
}

interface Reply {
  status: number;
  body: Record<string, unknown>;
}

function request(
  ep: Endpoint,
  token: string,
  method: string,
  op: string,
  body: Buffer | Buffer[],
  extraHeaders: Record<string, string> = {},
): Promise<Reply> {
  const parts = Array.isArray(body) ? body : [body];
  const length = parts.reduce((n, b) => n + b.length, 0);
  const url = new URL(`/v1/${encodeURIComponent(ep.name)}/${op}`, ep.base);
  return new Promise((resolve, reject) => {
    const req = ep.mod.request(
      url,
      {
        method,
        agent: ep.agent,
        headers: {
          authorization: `Bearer ${token}`,
          'content-type': op === 'chunk' || op === 'file' ? 'application/octet-stream' : 'application/json',
          'content-length': length,
          'x-vmferry-sender': `${safeUser()}@${hostname()}`,
          ...extraHeaders,
        },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (d: Buffer) => chunks.push(d));
        res.on('end', () => {
          let parsed: Record<string, unknown>;
          try {
            parsed = JSON.parse(Buffer.concat(chunks).toString('utf8')) as Record<string, unknown>;
          } catch {
            parsed = { error: `unreadable reply (HTTP ${res.statusCode})`, retry: true };
          }
          resolve({ status: res.statusCode ?? 0, body: parsed });
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    for (const p of parts) req.write(p);
    req.end();
  });
}

function safeUser(): string {
  try {
    return userInfo().username;
  } catch {
    return 'unknown';
  }
}

/** A token bucket over all streams: the wire never carries more than `rate` bytes per second on average. */
class RateLimiter {
  private next = 0;
  constructor(private readonly rate: number) {}
  async take(bytes: number): Promise<void> {
    const now = performance.now();
    const start = Math.max(now, this.next);
    this.next = start + (bytes / this.rate) * 1000;
    // Pay for the bytes before sending them, so the average never exceeds the rate.
    const wait = this.next - now;
    if (wait > 1) await sleep(wait);
  }
}

/** The source's identity: a resume only continues the very same source and target. */
function sourceKey(path: string, reader: DiskReader, targetFormat: string, options: Record<string, string>): string {
  let ident: unknown[] = [path];
  try {
    const st = statSync(path);
    ident = [realpathSync(path), st.size, st.mtimeMs, st.ino];
  } catch {
    // a non-file source: its name is all we have
  }
  return createHash('sha256')
    .update(
      JSON.stringify([PROTOCOL_VERSION, ident, reader.format, reader.virtualSize, targetFormat, Object.entries(options).sort()]),
    )
    .digest('hex');
}

/** Splits a data piece into runs of sent data and zero grains. */
function grainRuns(buf: Buffer): ['d' | 'z', number][] {
  const runs: ['d' | 'z', number][] = [];
  for (let s = 0; s < buf.length; s += GRAIN) {
    const e = Math.min(buf.length, s + GRAIN);
    const kind = isZero(buf, s, e) ? 'z' : 'd';
    const last = runs[runs.length - 1];
    if (last && last[0] === kind) last[1] += e - s;
    else runs.push([kind, e - s]);
  }
  return runs;
}

interface Outgoing {
  meta: ChunkMeta;
  payload: Buffer;
  /** Guest bytes of data read for this chunk. */
  dataBytes: number;
}

/** Sends one image to an agent; resumes when the agent already holds part of it. */
export async function sendImage(source: string, options: SendOptions): Promise<SendResult> {
  const started = performance.now();
  const streams = Math.max(1, Math.min(64, options.streams ?? 4));
  const codec = options.codec ?? 'zstd';
  const targetFormat = options.targetFormat ?? 'raw';
  const createOptions = options.options ?? {};
  const maxAttempts = options.maxAttempts ?? 8;
  const log = options.log ?? (() => {});
  const ep = await endpoint(options.url, streams, options.fingerprint);
  let reader: DiskReader;
  try {
    reader = options.openReader
      ? await options.openReader()
      : await openImage(source, { ...options.open, format: options.sourceFormat });
  } catch (err) {
    ep.agent.destroy();
    throw err;
  }
  const limiter = options.rate ? new RateLimiter(options.rate) : null;
  const stats = { wire: 0, resent: 0, resentChunks: 0, chunks: 0, data: 0 };
  try {
    const beginBody: BeginRequest = {
      version: PROTOCOL_VERSION,
      format: targetFormat,
      options: createOptions,
      virtualSize: reader.virtualSize,
      sourceKey: sourceKey(source, reader, targetFormat, createOptions),
      source,
      ...(options.overwrite ? { overwrite: true } : {}),
    };
    const busyUntil = Date.now() + (options.busyWaitSeconds ?? 600) * 1000;
    let begun: BeginResponse;
    for (let attempt = 0; ; attempt++) {
      const r = await call(ep, options.token, 'POST', 'begin', Buffer.from(JSON.stringify(beginBody)), options.url);
      if (r.status === 200) {
        begun = r.body as unknown as BeginResponse;
        break;
      }
      if (r.status === 503 && Date.now() < busyUntil) {
        await sleep(Math.min(2000, 100 * 2 ** Math.min(attempt, 5)) * (0.5 + Math.random()));
        continue;
      }
      throw replyError(r, options.url);
    }
    if (begun.note) log(`agent: ${begun.note}`);
    if (begun.resumeAt > 0) log(`resuming at ${begun.resumeAt} of ${reader.virtualSize} bytes`);
    const { session, resumeAt, align, maxChunk } = begun;
    if (
      !Number.isSafeInteger(align) ||
      align <= 0 ||
      align % DIGEST_BLOCK !== 0 ||
      !Number.isSafeInteger(resumeAt) ||
      resumeAt % align !== 0
    ) {
      if (resumeAt !== reader.virtualSize)
        throw new TransferError('the agent answered with an invalid alignment or resume point', options.url);
    }

    // The digest covers everything, including what an earlier run already sent.
    const digest = new ContentDigest();
    if (resumeAt > 0) {
      for await (const p of blockPieces(reader, DIGEST_BLOCK, 8 * DIGEST_BLOCK)) {
        if (p.start >= resumeAt) break;
        const end = Math.min(p.end, resumeAt);
        if (p.kind === 'zero') digest.addZeros(end - p.start);
        else digest.addData(await reader.read(p.start, end - p.start));
      }
    }

    const chunks = makeChunks(reader, session, resumeAt, align, maxChunk, codec, options.level, digest);
    const inFlight = new Set<Promise<void>>();
    let failure: unknown = null;
    let done = resumeAt;
    const sendOne = async (c: Outgoing) => {
      const body = encodeChunk(c.meta, c.payload);
      const size = body.reduce((n, b) => n + b.length, 0);
      for (let attempt = 1; ; attempt++) {
        if (limiter) await limiter.take(size);
        const count = () => {
          stats.wire += size;
          if (attempt > 1) {
            stats.resent += size;
            stats.resentChunks++;
          }
        };
        let r: Reply;
        try {
          r = await request(ep, options.token, 'PUT', 'chunk', body);
          count();
        } catch (err) {
          // A refused connection carried nothing; anything else may have carried some of the body.
          if ((err as NodeJS.ErrnoException).code !== 'ECONNREFUSED') count();
          if (attempt >= maxAttempts)
            throw new TransferError(`connection to the agent failed: ${(err as Error).message}`, options.url);
          await sleep(100 * attempt);
          continue;
        }
        if (r.status === 200) break;
        if (r.body.retry && attempt < maxAttempts) {
          if (r.status === 422 || r.status === 400) log(`chunk at ${c.meta.start}: ${String(r.body.error)}`);
          if (r.status === 429 || r.status === 408) await sleep(100 * attempt);
          continue;
        }
        throw replyError(r, options.url);
      }
      stats.chunks++;
      stats.data += c.dataBytes;
      done = Math.max(done, c.meta.end);
      options.onProgress?.({ done, total: reader.virtualSize, wireBytes: stats.wire });
    };
    for await (const c of chunks) {
      if (failure) break;
      const p = sendOne(c).then(
        () => {
          inFlight.delete(p);
        },
        (err) => {
          inFlight.delete(p);
          failure ??= err;
        },
      );
      inFlight.add(p);
      if (inFlight.size >= streams) await Promise.race(inFlight);
    }
    await Promise.all(inFlight);
    if (failure) throw failure;

    const own = digest.digest();
    const fin = await call(
      ep,
      options.token,
      'POST',
      'finish',
      Buffer.from(JSON.stringify({ session, digest: own, ...(options.fileSha256 ? { fileSha256: true } : {}) })),
      options.url,
    );
    if (fin.status !== 200) throw replyError(fin, options.url);
    const f = fin.body as unknown as FinishResponse;
    if (!f.match) {
      throw new TransferError(
        `content digest mismatch: sent ${own}, the agent read back ${f.digest}; the agent discarded the result`,
        options.url,
      );
    }
    return {
      name: ep.name,
      virtualSize: reader.virtualSize,
      resumedAt: resumeAt,
      dataBytes: stats.data,
      wireBytes: stats.wire,
      resentBytes: stats.resent,
      resentChunks: stats.resentChunks,
      chunks: stats.chunks,
      digest: own,
      agentReceivedBytes: f.bytesReceived,
      seconds: (performance.now() - started) / 1000,
      ...(begun.note ? { note: begun.note } : {}),
      agentDigest: f.digest,
      ...(typeof f.dir === 'string' ? { agentDir: f.dir } : {}),
      ...(typeof f.fileSize === 'number' ? { fileSize: f.fileSize } : {}),
      ...(typeof f.fileSha256 === 'string' ? { fileSha256: f.fileSha256 } : {}),
    };
  } catch (err) {
    // Over the agent's --max-file-size, the same send would be refused again: no resume hint then.
    if (err instanceof VmferryError && !(err instanceof TransferTooLargeError) && stats.wire > 0) {
      err.message += ` (${stats.wire} bytes were sent in this run; run the same send again to resume)`;
    }
    throw err;
  } finally {
    ep.agent.destroy();
    await reader.close();
  }
}

export interface PutFileOptions {
  /** https://HOST:PORT/[PREFIX/]NAME */
  url: string;
  token: string;
  fingerprint?: string;
  /** Replace a file of that name on the agent. */
  overwrite?: boolean;
  /** Attempts when the file is damaged in transit or the connection breaks. */
  maxAttempts?: number;
}

/**
 * Uploads one whole small file (a descriptor, a report) to the agent's file endpoint; the agent
 * checks its SHA-256 and writes it atomically. Returns what the agent reports.
 */
export async function putFile(data: Buffer, options: PutFileOptions): Promise<FileResponse> {
  const ep = await endpoint(options.url, 1, options.fingerprint);
  const sha256 = createHash('sha256').update(data).digest('hex');
  const headers: Record<string, string> = {
    'x-vmferry-sha256': sha256,
    ...(options.overwrite ? { 'x-vmferry-overwrite': '1' } : {}),
  };
  const maxAttempts = options.maxAttempts ?? 4;
  try {
    for (let attempt = 1; ; attempt++) {
      const r = await call(ep, options.token, 'PUT', 'file', data, options.url, headers);
      if (r.status === 200) {
        const f = r.body as unknown as FileResponse;
        if (f.sha256 !== sha256)
          throw new TransferError(`the agent stored ${ep.name} with SHA-256 ${f.sha256}, not ${sha256}`, options.url);
        return f;
      }
      if (r.body.retry && attempt < maxAttempts) continue;
      throw replyError(r, options.url);
    }
  } finally {
    ep.agent.destroy();
  }
}

/** A request whose transport failure becomes a one-line TransferError. */
async function call(
  ep: Endpoint,
  token: string,
  method: string,
  op: string,
  body: Buffer,
  url: string,
  extraHeaders: Record<string, string> = {},
): Promise<Reply> {
  try {
    return await request(ep, token, method, op, body, extraHeaders);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (
      e.code === 'DEPTH_ZERO_SELF_SIGNED_CERT' ||
      e.code === 'SELF_SIGNED_CERT_IN_CHAIN' ||
      e.code === 'UNABLE_TO_VERIFY_LEAF_SIGNATURE'
    ) {
      throw new TransferRefusedError(
        `the agent's certificate is not trusted (${e.code}); pin it with --fingerprint (printed by vmferry serve)`,
        url,
      );
    }
    throw new TransferError(`cannot reach the agent: ${e.message}`, url);
  }
}

function replyError(r: Reply, url: string): VmferryError {
  const text = typeof r.body.error === 'string' ? r.body.error : `HTTP ${r.status}`;
  if (r.status === 413) return new TransferTooLargeError(`agent refused: ${text}`, url);
  if (r.status === 401 || r.status === 403 || r.status === 400 || r.status === 409)
    return new TransferRefusedError(`agent refused: ${text}`, url);
  return new TransferError(`agent: ${text}`, url);
}

/** Chunks in ascending order: zero ranges described, data read, grain-split, compressed, digested. */
async function* makeChunks(
  reader: DiskReader,
  session: string,
  from: number,
  align: number,
  maxChunk: number,
  codec: WireCodec,
  level: number | undefined,
  digest: ContentDigest,
): AsyncGenerator<Outgoing> {
  let pieces: ChunkPiece[] = [];
  let buffers: Buffer[] = [];
  let start = from;
  let end = from;
  let dataSpan = 0;
  const flush = (): Outgoing => {
    const data = buffers.length === 1 ? buffers[0]! : Buffer.concat(buffers);
    const base = { session, start, end, pieces };
    const hash = chunkDigest(base, data);
    let packed = packPayload(codec, data, level);
    let used: WireCodec = codec;
    if (packed.length >= data.length) {
      packed = data;
      used = 'none';
    }
    const out: Outgoing = {
      meta: { ...base, codec: used, rawLength: data.length, digest: hash },
      payload: packed,
      dataBytes: dataSpan,
    };
    pieces = [];
    buffers = [];
    start = end;
    dataSpan = 0;
    return out;
  };
  for await (const p of blockPieces(reader, align, maxChunk, from)) {
    if (p.kind === 'zero') {
      digest.addZeros(p.end - p.start);
      pieces.push({ z: [p.start, p.end] });
      end = p.end;
      if (pieces.length >= 4096) yield flush();
      continue;
    }
    if (dataSpan + (p.end - p.start) > maxChunk || pieces.length >= 4096) {
      if (pieces.length) yield flush();
    }
    const buf = await reader.read(p.start, p.end - p.start);
    digest.addData(buf);
    const runs = grainRuns(buf);
    let o = 0;
    for (const [kind, len] of runs) {
      if (kind === 'd') buffers.push(buf.subarray(o, o + len));
      o += len;
    }
    pieces.push({ d: [p.start, p.end], runs });
    dataSpan += p.end - p.start;
    end = p.end;
  }
  if (pieces.length) yield flush();
}
