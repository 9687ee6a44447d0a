/**
 * The receiving agent (`vmferry serve`): accepts authenticated chunked transfers and writes each
 * disk in its target format with the format drivers' writers, straight into a hidden partial folder
 * under ROOT; checkpoints writer state so a killed agent resumes; checks the whole-content digest
 * by reading the finished image back; then moves it into ROOT under its name.
 */
import { createHash, randomBytes } from 'node:crypto';
import {
  closeSync,
  createReadStream,
  existsSync,
  fsyncSync,
  lstatSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import http, { type IncomingMessage, type ServerResponse } from 'node:http';
import https from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { UsageError, VmferryError } from '../disk/errors.js';
import { getDriver, openImage } from '../disk/registry.js';
import type { DiskWriter, FormatDriver } from '../disk/types.js';
import { isZero } from '../disk/zero.js';
import { contentDigest, DIGEST_BLOCK } from './digest.js';
import {
  type BeginRequest,
  type BeginResponse,
  type ChunkMeta,
  type ChunkResponse,
  chunkDigest,
  decodeChunk,
  type FileResponse,
  type FinishRequest,
  type FinishResponse,
  PROTOCOL_VERSION,
  unpackPayload,
  WIRE_CODECS,
} from './protocol.js';
import { AuditLog, isLoopback, pathNameProblem, tokenMatches } from './security.js';

export interface AgentOptions {
  host: string;
  port: number;
  root: string;
  token: string;
  /** PEM certificate and key; without them the agent speaks plain HTTP (loopback only). */
  tls?: { cert: string | Buffer; key: string | Buffer };
  /** Transfers active at once (others are told to retry later). */
  maxTransfers?: number;
  /** Largest request body, bytes. */
  maxRequestBytes?: number;
  /** Checkpoint a resumable writer after this many guest bytes applied... */
  checkpointBytes?: number;
  /** ...or this many seconds, whichever comes first. */
  checkpointSeconds?: number;
  /** A transfer without requests for this long no longer counts against maxTransfers. */
  idleSeconds?: number;
  /** Largest whole file accepted by PUT /v1/NAME/file (descriptors, reports), bytes. */
  maxFileBytes?: number;
  /**
   * Largest disk image a transfer may produce (--max-file-size), bytes: a declared virtual size
   * above it is refused at begin, and the bytes the writer actually put on disk are checked after
   * every chunk and at finish (format metadata can push a file past its virtual size). No limit by default.
   */
  maxFileSize?: number;
  /** Audit log path (default ROOT/.vmferry-audit.log). */
  auditLog?: string;
  log?: (line: string) => void;
}

export interface Agent {
  readonly url: string;
  readonly port: number;
  readonly auditPath: string;
  close(): Promise<void>;
}

const MiB = 1024 * 1024;
const PARTIAL = '.vmferry-partial';
const STATE_FILE = 'state.json';
const MAX_JSON_BODY = 64 * 1024;
const MAX_WAITING = 64;
const WAIT_LIMIT_MS = 120_000;

interface SavedState {
  version: number;
  name: string;
  format: string;
  options: Record<string, string>;
  virtualSize: number;
  sourceKey: string;
  applied: number;
  bytesReceived: number;
  writerState: unknown;
}

interface Transfer {
  name: string;
  req: BeginRequest;
  driver: FormatDriver;
  dir: string;
  /** The folder the result lands in (ROOT, or ROOT/PREFIX) and its file name there. */
  folder: string;
  file: string;
  outPath: string;
  writer: DiskWriter;
  session: string;
  applied: number;
  align: number;
  maxChunk: number;
  bytesReceived: number;
  sinceCheckpoint: number;
  checkpointAt: number;
  lastActivity: number;
  started: number;
  remote: string;
  lock: Promise<unknown>;
  wakers: Set<() => void>;
  waiting: number;
  closed: boolean;
}

class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
    readonly retry = false,
  ) {
    super(message);
  }
}

function lcm(a: number, b: number): number {
  const gcd = (x: number, y: number): number => (y === 0 ? x : gcd(y, x % y));
  return (a / gcd(a, b)) * b;
}

export async function startAgent(o: AgentOptions): Promise<Agent> {
  if (!o.tls && !isLoopback(o.host)) {
    throw new UsageError(
      `plain HTTP is only allowed on a loopback address, not ${o.host}; give a certificate or drop --insecure`,
    );
  }
  let root: string;
  try {
    root = realpathSync(o.root);
  } catch {
    throw new UsageError(`the root folder does not exist`, o.root);
  }
  const maxTransfers = o.maxTransfers ?? 16;
  const maxRequestBytes = o.maxRequestBytes ?? 80 * MiB;
  const maxFileBytes = o.maxFileBytes ?? 16 * MiB;
  const maxFileSize = o.maxFileSize ?? Number.POSITIVE_INFINITY;
  const checkpointBytes = o.checkpointBytes ?? 64 * MiB;
  const checkpointMs = (o.checkpointSeconds ?? 5) * 1000;
  const idleMs = (o.idleSeconds ?? 120) * 1000;
  const auditPath = o.auditLog ?? join(root, '.vmferry-audit.log');
  const audit = new AuditLog(auditPath);
  const log = o.log ?? (() => {});
  const transfers = new Map<string, Transfer>();
  mkdirSync(join(root, PARTIAL), { recursive: true, mode: 0o700 });

  /**
   * Where a name lands: NAME in ROOT, PREFIX/NAME in ROOT/PREFIX. Partial folders of PREFIX/NAME
   * live under PARTIAL/.sub/PREFIX/NAME, apart from those of plain names (which never start with '.').
   */
  const placeOf = (name: string) => {
    const slash = name.indexOf('/');
    if (slash < 0) return { folder: root, file: name, partial: join(root, PARTIAL, name) };
    const prefix = name.slice(0, slash);
    const file = name.slice(slash + 1);
    return { folder: join(root, prefix), file, partial: join(root, PARTIAL, '.sub', prefix, file) };
  };

  /** Makes ROOT/PREFIX when missing; refuses one that is not a real folder (a file, a symbolic link). */
  const ensureFolder = (folder: string) => {
    if (folder === root) return;
    try {
      if (!lstatSync(folder).isDirectory())
        throw new HttpError(409, `${folder.slice(root.length + 1)} exists on the agent and is not a folder`);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      mkdirSync(folder, { mode: 0o755 });
    }
  };

  const refuse = (req: IncomingMessage, reason: string, extra: Record<string, unknown> = {}) => {
    audit.append({ event: 'refused', remote: remoteOf(req), method: req.method, path: req.url, reason, ...extra });
    log(`refused ${req.method} ${req.url} from ${remoteOf(req)}: ${reason}`);
  };

  const activeCount = () => {
    const now = Date.now();
    let n = 0;
    for (const t of transfers.values()) if (!t.closed && now - t.lastActivity < idleMs) n++;
    return n;
  };

  const withLock = <T>(t: Transfer, fn: () => Promise<T>): Promise<T> => {
    const p = t.lock.then(fn, fn);
    t.lock = p.catch(() => {});
    return p;
  };

  const wake = (t: Transfer) => {
    for (const w of [...t.wakers]) w();
  };

  const saveState = (t: Transfer, writerState: unknown) => {
    const state: SavedState = {
      version: PROTOCOL_VERSION,
      name: t.name,
      format: t.req.format,
      options: t.req.options,
      virtualSize: t.req.virtualSize,
      sourceKey: t.req.sourceKey,
      applied: t.applied,
      bytesReceived: t.bytesReceived,
      writerState,
    };
    const path = join(t.dir, STATE_FILE);
    const temp = `${path}.new`;
    writeFileSync(temp, JSON.stringify(state));
    const fd = openSync(temp, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(temp, path);
  };

  const checkpoint = async (t: Transfer) => {
    if (!t.writer.checkpoint || !t.driver.resume) return;
    t.sinceCheckpoint = 0;
    t.checkpointAt = Date.now();
    try {
      saveState(t, await t.writer.checkpoint());
    } catch (err) {
      // Not fatal: the transfer goes on, a resume after a crash starts further back.
      log(`${t.name}: checkpoint failed: ${err instanceof VmferryError ? err.describe() : (err as Error).message}`);
    }
  };

  /** Bytes the writer has put on disk for this transfer (allocated blocks of every file it made). */
  const writtenBytes = (t: Transfer) => {
    let n = 0;
    for (const f of readdirSync(t.dir)) {
      if (f === STATE_FILE || f === `${STATE_FILE}.new`) continue;
      const st = lstatSync(join(t.dir, f));
      if (st.isFile()) n += Math.min(st.size, st.blocks * 512);
    }
    return n;
  };

  /** The --max-file-size guard on what was actually written: past it, the transfer ends and leaves nothing. */
  const enforceSize = async (req: IncomingMessage, t: Transfer) => {
    if (!Number.isFinite(maxFileSize)) return;
    const written = writtenBytes(t);
    if (written <= maxFileSize) return;
    t.closed = true;
    transfers.delete(t.name);
    wake(t);
    await t.writer.abort().catch(() => {});
    rmSync(t.dir, { recursive: true, force: true });
    const reason = `the written image reached ${written} bytes, over the agent's --max-file-size of ${maxFileSize} bytes; transfer abandoned`;
    refuse(req, reason, { name: t.name, written });
    throw new HttpError(413, `${t.name}: ${reason}`);
  };

  const begin = async (req: IncomingMessage, name: string, body: BeginRequest): Promise<BeginResponse> => {
    validateBegin(body);
    if (body.virtualSize > maxFileSize) {
      const reason = `declared virtual size ${body.virtualSize} exceeds the agent's --max-file-size of ${maxFileSize} bytes`;
      refuse(req, reason, { name, virtualSize: body.virtualSize });
      throw new HttpError(413, `${name}: ${reason}`);
    }
    const driver = getDriver(body.format);
    if (!driver.create) throw new HttpError(400, `format ${driver.name} cannot be written`);
    const place = placeOf(name);
    const finalPath = join(place.folder, place.file);
    // Refuse now, not after the whole disk has arrived, when PREFIX is not a real folder.
    if (existsSync(place.folder)) ensureFolder(place.folder);
    if (existsSync(finalPath) && !body.overwrite) {
      throw new HttpError(409, `${name} already exists on the agent (send with --overwrite to replace it)`);
    }
    const existing = transfers.get(name);
    if (existing && !existing.closed) {
      return withLock(existing, async () => {
        if (sameTransfer(existing.req, body)) {
          existing.session = randomBytes(16).toString('hex');
          existing.lastActivity = Date.now();
          existing.remote = remoteOf(req);
          wake(existing);
          audit.append({
            event: 'resume',
            remote: remoteOf(req),
            name,
            source: body.source,
            resumeAt: existing.applied,
            from: 'memory',
          });
          log(`${name}: sender reconnected, continuing at ${existing.applied}`);
          return response(existing);
        }
        existing.closed = true;
        wake(existing);
        await existing.writer.abort();
        transfers.delete(name);
        return startNew(req, name, body, driver, 'a different source or target took over this name; restarted from zero');
      });
    }
    if (activeCount() >= maxTransfers)
      throw new HttpError(503, `the agent is busy (${maxTransfers} transfers at once); retry later`, true);
    // A checkpoint left by an earlier agent process?
    const dir = place.partial;
    const statePath = join(dir, STATE_FILE);
    let note: string | undefined;
    if (existsSync(statePath)) {
      try {
        const saved = JSON.parse(readFileSync(statePath, 'utf8')) as SavedState;
        if (
          saved.version === PROTOCOL_VERSION &&
          sameTransfer({ ...body, ...pick(saved) }, body) &&
          saved.writerState !== undefined &&
          driver.resume
        ) {
          const writer = await driver.resume(
            join(dir, place.file),
            body.virtualSize,
            { options: body.options },
            saved.writerState,
          );
          const t = makeTransfer(req, name, body, driver, dir, writer);
          t.applied = saved.applied;
          t.bytesReceived = saved.bytesReceived;
          transfers.set(name, t);
          audit.append({
            event: 'resume',
            remote: remoteOf(req),
            name,
            source: body.source,
            resumeAt: t.applied,
            from: 'checkpoint',
          });
          log(`${name}: resuming from its checkpoint at ${t.applied}`);
          return response(t);
        }
        note = !sameTransfer({ ...body, ...pick(saved) }, body)
          ? 'the saved checkpoint belongs to a different transfer; restarted from zero'
          : `format ${driver.name} cannot resume this half-written image; restarted this disk from zero`;
      } catch (err) {
        note = `the saved checkpoint could not be resumed (${err instanceof Error ? err.message : String(err)}); restarted from zero`;
      }
    } else if (existsSync(dir)) {
      // A half-written disk without a saved state: its writer keeps none (e.g. multi-file VMDK),
      // or the agent stopped before the first checkpoint.
      note = driver.resume
        ? 'no checkpoint was saved for this half-written disk; restarted it from zero'
        : `format ${driver.name} cannot resume a half-written image; restarted this disk from zero`;
    }
    return startNew(req, name, body, driver, note);
  };

  const pick = (s: SavedState) => ({
    format: s.format,
    options: s.options,
    virtualSize: s.virtualSize,
    sourceKey: s.sourceKey,
  });

  const makeTransfer = (
    req: IncomingMessage,
    name: string,
    body: BeginRequest,
    driver: FormatDriver,
    dir: string,
    writer: DiskWriter,
  ): Transfer => {
    const unit = Math.max(512, writer.clusterSize);
    const align = lcm(DIGEST_BLOCK, unit);
    if (align > 64 * MiB) throw new HttpError(400, `the target's cluster size ${unit} is too large to transfer`);
    const place = placeOf(name);
    return {
      name,
      req: body,
      driver,
      dir,
      folder: place.folder,
      file: place.file,
      outPath: join(dir, place.file),
      writer,
      session: randomBytes(16).toString('hex'),
      applied: 0,
      align,
      maxChunk: Math.max(4 * MiB, align),
      bytesReceived: 0,
      sinceCheckpoint: 0,
      checkpointAt: Date.now(),
      lastActivity: Date.now(),
      started: Date.now(),
      remote: remoteOf(req),
      lock: Promise.resolve(),
      wakers: new Set(),
      waiting: 0,
      closed: false,
    };
  };

  const startNew = async (req: IncomingMessage, name: string, body: BeginRequest, driver: FormatDriver, note?: string) => {
    const place = placeOf(name);
    const dir = place.partial;
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { recursive: true, mode: 0o700 });
    let writer: DiskWriter;
    try {
      writer = await driver.create!(join(dir, place.file), body.virtualSize, { options: body.options });
    } catch (err) {
      rmSync(dir, { recursive: true, force: true });
      if (err instanceof VmferryError) throw new HttpError(400, err.message);
      throw err;
    }
    const t = makeTransfer(req, name, body, driver, dir, writer);
    transfers.set(name, t);
    if (note) log(`${name}: ${note}`);
    audit.append({
      event: 'begin',
      remote: remoteOf(req),
      sender: req.headers['x-vmferry-sender'] ?? null,
      name,
      source: body.source,
      format: driver.name,
      options: body.options,
      virtualSize: body.virtualSize,
      note: note ?? null,
    });
    log(`${name}: receiving ${body.virtualSize} bytes as ${driver.name} from ${remoteOf(req)}`);
    return response(t, note);
  };

  const response = (t: Transfer, note?: string): BeginResponse => ({
    session: t.session,
    resumeAt: t.applied,
    align: t.align,
    maxChunk: t.maxChunk,
    ...(note ? { note } : {}),
  });

  const apply = async (t: Transfer, meta: ChunkMeta, data: Buffer) => {
    const w = t.writer;
    const unit = Math.max(512, w.clusterSize);
    let pos = 0;
    for (const piece of meta.pieces) {
      if ('z' in piece) {
        await w.zero(piece.z[0], piece.z[1] - piece.z[0]);
        continue;
      }
      const [s, e] = piece.d;
      const buf = Buffer.alloc(e - s);
      let o = 0;
      for (const [kind, len] of piece.runs) {
        if (kind === 'd') {
          data.copy(buf, o, pos, pos + len);
          pos += len;
        }
        o += len;
      }
      // As the copy pipeline does: all-zero units become zero(), the rest coalesced writes.
      const emit = async (from: number, to: number, zero: boolean) => {
        if (zero) await w.zero(s + from, to - from);
        else await w.write(s + from, buf.subarray(from, to));
      };
      let runStart = 0;
      let runZero: boolean | null = null;
      for (let u = 0; u < buf.length; u += unit) {
        const z = isZero(buf, u, Math.min(u + unit, buf.length));
        if (runZero === null) runZero = z;
        else if (z !== runZero) {
          await emit(runStart, u, runZero);
          runStart = u;
          runZero = z;
        }
      }
      if (runZero !== null) await emit(runStart, buf.length, runZero);
    }
  };

  const chunk = async (req: IncomingMessage, name: string, t: Transfer, body: Buffer): Promise<ChunkResponse> => {
    let meta: ChunkMeta;
    let payload: Buffer;
    try {
      ({ meta, payload } = decodeChunk(body));
      validateMeta(meta, t);
    } catch (err) {
      // A damaged header reads as malformed; the sender may re-send it.
      throw new HttpError(400, `malformed chunk: ${(err as Error).message}`, true);
    }
    t.bytesReceived += body.length;
    t.lastActivity = Date.now();
    // The digest binds session and offsets too: anything damaged in transit is caught here, before
    // those fields are trusted.
    let data: Buffer;
    try {
      data = unpackPayload(meta.codec, payload, meta.rawLength);
    } catch (err) {
      audit.append({ event: 'chunk-damaged', remote: remoteOf(req), name, start: meta.start, reason: (err as Error).message });
      throw new HttpError(422, `chunk at ${meta.start} does not decompress (damaged in transit); re-send it`, true);
    }
    if (data.length !== meta.rawLength || chunkDigest(meta, data) !== meta.digest) {
      audit.append({ event: 'chunk-damaged', remote: remoteOf(req), name, start: meta.start, reason: 'digest mismatch' });
      throw new HttpError(422, `chunk at ${meta.start} fails its digest (damaged in transit); re-send it`, true);
    }
    if (meta.session !== t.session) {
      audit.append({ event: 'refused', remote: remoteOf(req), name, reason: 'stale session', start: meta.start });
      throw new HttpError(409, 'stale session: a newer send of this name took over');
    }
    if (meta.start < t.applied) {
      audit.append({
        event: 'refused',
        remote: remoteOf(req),
        name,
        reason: 'replayed chunk',
        start: meta.start,
        applied: t.applied,
      });
      throw new HttpError(409, `replayed chunk: [${meta.start}, ${meta.end}) is already committed (up to ${t.applied})`);
    }
    // Chunks are applied in offset order; later ones wait for their turn (bounded).
    if (meta.start > t.applied) {
      if (t.waiting >= MAX_WAITING) throw new HttpError(429, 'too many chunks waiting for their turn; retry', true);
      t.waiting++;
      try {
        const deadline = Date.now() + WAIT_LIMIT_MS;
        while (t.applied < meta.start && t.session === meta.session && !t.closed) {
          if (Date.now() > deadline)
            throw new HttpError(408, `chunk at ${meta.start} waited too long for the chunk before it`, true);
          await new Promise<void>((resolve) => {
            const done = () => {
              t.wakers.delete(done);
              clearTimeout(timer);
              resolve();
            };
            const timer = setTimeout(done, 1000);
            t.wakers.add(done);
          });
        }
      } finally {
        t.waiting--;
      }
    }
    return withLock(t, async () => {
      if (t.closed || meta.session !== t.session) throw new HttpError(409, 'stale session: a newer send of this name took over');
      if (meta.start !== t.applied) {
        throw new HttpError(409, `replayed or out-of-order chunk at ${meta.start} (applied up to ${t.applied})`);
      }
      await apply(t, meta, data);
      await enforceSize(req, t);
      t.applied = meta.end;
      t.sinceCheckpoint += meta.end - meta.start > 0 ? meta.rawLength : 0;
      t.lastActivity = Date.now();
      if (t.sinceCheckpoint >= checkpointBytes || Date.now() - t.checkpointAt >= checkpointMs) await checkpoint(t);
      wake(t);
      return { applied: t.applied };
    });
  };

  const finish = async (req: IncomingMessage, name: string, t: Transfer, body: FinishRequest): Promise<FinishResponse> => {
    if (typeof body?.session !== 'string' || typeof body.digest !== 'string')
      throw new HttpError(400, 'malformed finish request');
    return withLock(t, async () => {
      if (t.closed || body.session !== t.session) throw new HttpError(409, 'stale session: a newer send of this name took over');
      if (t.applied !== t.req.virtualSize) {
        throw new HttpError(409, `transfer incomplete: ${t.applied} of ${t.req.virtualSize} bytes committed`);
      }
      t.closed = true;
      transfers.delete(name);
      try {
        await t.writer.finish();
        await enforceSize(req, t);
        const reader = await openImage(t.outPath, { format: t.driver.name });
        let digest: string;
        try {
          digest = await contentDigest(reader, t.req.virtualSize);
        } finally {
          await reader.close();
        }
        const match = digest === body.digest;
        const result: FinishResponse = {
          digest,
          match,
          path: name,
          bytesReceived: t.bytesReceived,
          dir: t.folder,
          fileSize: statSync(t.outPath).size,
          ...(match && body.fileSha256 === true ? { fileSha256: await sha256OfFile(t.outPath) } : {}),
        };
        if (!match) {
          rmSync(t.dir, { recursive: true, force: true });
          audit.append({
            event: 'failed',
            remote: remoteOf(req),
            name,
            reason: 'content digest mismatch',
            digest,
            expected: body.digest,
          });
          log(`${name}: content digest mismatch; result discarded`);
          return result;
        }
        const files = readdirSync(t.dir).filter((f) => f !== STATE_FILE && !f.startsWith('.'));
        if (!body || !t.req.overwrite) {
          for (const f of files) {
            if (existsSync(join(t.folder, f))) throw new HttpError(409, `${f} already exists on the agent`);
          }
        }
        ensureFolder(t.folder);
        // The main file last, so it appears only when its extents are in place.
        for (const f of files.sort((a, b) => (a === t.file ? 1 : b === t.file ? -1 : a.localeCompare(b)))) {
          renameSync(join(t.dir, f), join(t.folder, f));
        }
        syncFolder(t.folder);
        rmSync(t.dir, { recursive: true, force: true });
        audit.append({
          event: 'complete',
          remote: remoteOf(req),
          name,
          source: t.req.source,
          format: t.driver.name,
          virtualSize: t.req.virtualSize,
          bytesReceived: t.bytesReceived,
          digest,
          seconds: (Date.now() - t.started) / 1000,
        });
        log(`${name}: complete, content digest ${digest}`);
        return result;
      } catch (err) {
        await t.writer.abort().catch(() => {});
        rmSync(t.dir, { recursive: true, force: true });
        audit.append({ event: 'failed', remote: remoteOf(req), name, reason: (err as Error).message });
        throw err;
      }
    });
  };

  /**
   * A whole small file (a descriptor, a report) in one request: checked against its SHA-256,
   * written to a temp name beside its final name, synced, renamed into place.
   */
  const putFile = (req: IncomingMessage, name: string, body: Buffer): FileResponse => {
    const sha256 = createHash('sha256').update(body).digest('hex');
    const expected = String(req.headers['x-vmferry-sha256'] ?? '').toLowerCase();
    if (expected !== sha256) {
      audit.append({ event: 'file-damaged', remote: remoteOf(req), name, reason: 'digest mismatch', bytes: body.length });
      throw new HttpError(422, `${name} fails its digest (damaged in transit); re-send it`, true);
    }
    const live = transfers.get(name);
    if (live && !live.closed) throw new HttpError(409, `${name} is being received as a disk image right now`);
    const place = placeOf(name);
    const finalPath = join(place.folder, place.file);
    const overwrite = req.headers['x-vmferry-overwrite'] === '1';
    ensureFolder(place.folder);
    let existing: ReturnType<typeof lstatSync> | undefined;
    try {
      existing = lstatSync(finalPath);
    } catch {
      existing = undefined;
    }
    if (existing && !overwrite) {
      refuse(req, 'file exists', { name });
      throw new HttpError(409, `${name} already exists on the agent (send with overwrite to replace it)`);
    }
    if (existing && !existing.isFile()) {
      refuse(req, 'not a regular file', { name });
      throw new HttpError(409, `${name} exists on the agent and is not a regular file`);
    }
    const temp = join(place.folder, `.${place.file}.vmferry-put-${randomBytes(6).toString('hex')}`);
    const fd = openSync(temp, 'wx', 0o644);
    try {
      for (let at = 0; at < body.length; ) at += writeSync(fd, body, at, body.length - at);
      fsyncSync(fd);
    } catch (err) {
      closeSync(fd);
      rmSync(temp, { force: true });
      throw err;
    }
    closeSync(fd);
    renameSync(temp, finalPath);
    syncFolder(place.folder);
    audit.append({
      event: 'file',
      remote: remoteOf(req),
      sender: req.headers['x-vmferry-sender'] ?? null,
      name,
      bytes: body.length,
      sha256,
      replaced: Boolean(existing),
    });
    log(`${name}: received ${body.length} bytes`);
    return { path: name, dir: place.folder, bytes: body.length, sha256 };
  };

  const handle = async (req: IncomingMessage, res: ServerResponse) => {
    const url = new URL(req.url ?? '/', 'http://agent');
    const m = /^\/v1\/([^/]*)\/(begin|chunk|finish|file)$/.exec(url.pathname);
    const auth = req.headers.authorization;
    if (!auth || !/^Bearer \S+$/.test(auth)) {
      refuse(req, 'no bearer token');
      throw new HttpError(401, 'no bearer token (give --token-file or VMFERRY_TOKEN)');
    }
    if (!tokenMatches(auth.slice(7), o.token)) {
      refuse(req, 'wrong token');
      throw new HttpError(401, 'wrong token');
    }
    if (!m) {
      refuse(req, 'unknown request');
      throw new HttpError(404, `no such endpoint ${req.method} ${url.pathname}`);
    }
    let name: string;
    try {
      name = decodeURIComponent(m[1]!);
    } catch {
      name = '';
    }
    const problem = pathNameProblem(name);
    if (problem) {
      refuse(req, `refused name: ${problem}`, { name });
      throw new HttpError(400, `refused name '${name}': ${problem}`);
    }
    const op = m[2]!;
    const expectMethod = op === 'chunk' || op === 'file' ? 'PUT' : 'POST';
    if (req.method !== expectMethod) throw new HttpError(405, `${op} needs ${expectMethod}`);
    const limit = op === 'chunk' ? maxRequestBytes : op === 'file' ? maxFileBytes : MAX_JSON_BODY;
    const declared = Number(req.headers['content-length'] ?? Number.NaN);
    if (!Number.isFinite(declared)) {
      refuse(req, 'no content length', { name });
      throw new HttpError(411, 'a Content-Length is required');
    }
    if (declared > limit) {
      refuse(req, `request of ${declared} bytes exceeds the limit of ${limit}`, { name });
      throw new HttpError(413, `request of ${declared} bytes exceeds the limit of ${limit}`);
    }
    const body = await readBody(req, declared);
    if (body === null) {
      refuse(req, `truncated request: the connection closed before ${declared} bytes arrived`, { name });
      return;
    }
    let out: unknown;
    if (op === 'begin') out = await begin(req, name, parseJson<BeginRequest>(body));
    else if (op === 'file') out = putFile(req, name, body);
    else {
      const t = transfers.get(name);
      if (!t || t.closed) {
        refuse(req, 'no transfer in progress', { name, op });
        throw new HttpError(404, `no transfer of ${name} in progress (begin again to resume)`);
      }
      t.lastActivity = Date.now();
      out = op === 'chunk' ? await chunk(req, name, t, body) : await finish(req, name, t, parseJson<FinishRequest>(body));
    }
    send(res, 200, out);
  };

  const onRequest = (req: IncomingMessage, res: ServerResponse) => {
    handle(req, res).catch((err) => {
      if (res.headersSent || res.destroyed) return;
      if (err instanceof HttpError) {
        send(res, err.status, { error: err.message, ...(err.retry ? { retry: true } : {}) });
      } else {
        const message = err instanceof VmferryError ? err.describe() : `internal error: ${(err as Error)?.message ?? err}`;
        log(`error: ${message}`);
        send(res, 500, { error: message });
      }
    });
  };

  const server = o.tls
    ? https.createServer({ cert: o.tls.cert, key: o.tls.key, minVersion: 'TLSv1.3' }, onRequest)
    : http.createServer(onRequest);
  server.headersTimeout = 30_000;
  server.requestTimeout = 600_000;
  server.keepAliveTimeout = 30_000;
  server.maxHeadersCount = 64;
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(o.port, o.host, () => {
      server.off('error', reject);
      resolve();
    });
  });
  const port = (server.address() as AddressInfo).port;
  const hostPart = o.host.includes(':') ? `[${o.host}]` : o.host;
  audit.append({ event: 'start', listen: `${hostPart}:${port}`, tls: Boolean(o.tls), root });
  return {
    url: `${o.tls ? 'https' : 'http'}://${hostPart}:${port}`,
    port,
    auditPath,
    close: async () => {
      await new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
      });
      for (const t of transfers.values()) {
        if (t.closed) continue;
        t.closed = true;
        await withLock(t, async () => {
          if (t.writer.checkpoint && t.driver.resume) await checkpoint(t).catch(() => {});
        });
      }
      try {
        audit.append({ event: 'stop' });
      } catch {
        // the root may already be gone (tests)
      }
    },
  };
}

function sameTransfer(a: BeginRequest, b: BeginRequest): boolean {
  return (
    a.format === b.format &&
    a.virtualSize === b.virtualSize &&
    a.sourceKey === b.sourceKey &&
    JSON.stringify(Object.entries(a.options).sort()) === JSON.stringify(Object.entries(b.options).sort())
  );
}

function validateBegin(b: BeginRequest): void {
  if (!b || typeof b !== 'object') throw new HttpError(400, 'malformed begin request');
  if (b.version !== PROTOCOL_VERSION) throw new HttpError(400, `protocol version ${b.version} is not ${PROTOCOL_VERSION}`);
  if (typeof b.format !== 'string' || typeof b.sourceKey !== 'string' || typeof b.source !== 'string') {
    throw new HttpError(400, 'malformed begin request');
  }
  if (!Number.isSafeInteger(b.virtualSize) || b.virtualSize <= 0)
    throw new HttpError(400, `invalid virtual size ${b.virtualSize}`);
  if (!b.options || typeof b.options !== 'object' || Object.values(b.options).some((v) => typeof v !== 'string')) {
    throw new HttpError(400, 'options must be strings');
  }
  try {
    getDriver(b.format);
  } catch (err) {
    throw new HttpError(400, (err as Error).message);
  }
  // Options that name files would let a sender make the agent open paths of its choosing.
  for (const key of Object.keys(b.options)) {
    if (/backing|file|parent|extent/i.test(key))
      throw new HttpError(400, `option ${key} names a file; not accepted over the network`);
  }
}

function validateMeta(m: ChunkMeta, t: Transfer): void {
  const size = t.req.virtualSize;
  const int = (v: unknown) => Number.isSafeInteger(v) && (v as number) >= 0;
  if (!m || typeof m !== 'object' || typeof m.session !== 'string' || typeof m.digest !== 'string') throw new Error('bad header');
  if (!WIRE_CODECS.includes(m.codec)) throw new Error(`unknown codec ${m.codec}`);
  if (!int(m.start) || !int(m.end) || m.end <= m.start || m.end > size || !int(m.rawLength)) throw new Error('bad range');
  if (m.start % t.align !== 0) throw new Error(`start ${m.start} is not aligned to ${t.align}`);
  if (!Array.isArray(m.pieces) || m.pieces.length === 0) throw new Error('no pieces');
  let pos = m.start;
  let raw = 0;
  let dataSpan = 0;
  for (const p of m.pieces) {
    const range = 'z' in p ? p.z : 'd' in p ? p.d : null;
    if (!Array.isArray(range) || range[0] !== pos || !int(range[1]) || range[1] <= range[0])
      throw new Error('pieces do not tile the range');
    if ('d' in p) {
      if (range[0] % t.align !== 0) throw new Error('data piece not aligned');
      if (!Array.isArray(p.runs)) throw new Error('bad runs');
      let len = 0;
      for (const r of p.runs) {
        if (!Array.isArray(r) || (r[0] !== 'd' && r[0] !== 'z') || !int(r[1]) || r[1] === 0) throw new Error('bad run');
        len += r[1];
        if (r[0] === 'd') raw += r[1];
      }
      if (len !== range[1] - range[0]) throw new Error('runs do not cover their piece');
      dataSpan += len;
    }
    pos = range[1];
  }
  if (pos !== m.end) throw new Error('pieces do not reach the end');
  if (raw !== m.rawLength) throw new Error('raw length does not match the runs');
  if (dataSpan > t.maxChunk) throw new Error(`data of ${dataSpan} bytes exceeds the chunk limit ${t.maxChunk}`);
}

function syncFolder(dir: string): void {
  let fd: number | undefined;
  try {
    fd = openSync(dir, 'r');
    fsyncSync(fd);
  } catch {
    // some file systems refuse fsync on a folder; the rename is still atomic
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

async function sha256OfFile(path: string): Promise<string> {
  const h = createHash('sha256');
  for await (const part of createReadStream(path, { highWaterMark: 4 * MiB })) h.update(part as Buffer);
  return h.digest('hex');
}

function remoteOf(req: IncomingMessage): string {
  const s = req.socket;
  return s.remoteAddress ? `${s.remoteAddress}:${s.remotePort}` : 'unknown';
}

function parseJson<T>(body: Buffer): T {
  try {
    return JSON.parse(body.toString('utf8')) as T;
  } catch {
    throw new HttpError(400, 'malformed JSON body');
  }
}

function send(res: ServerResponse, status: number, value: unknown): void {
  const text = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

/** Reads exactly `length` bytes; null when the peer went away first (a truncated request). */
function readBody(req: IncomingMessage, length: number): Promise<Buffer | null> {
  return new Promise((resolve, reject) => {
    const buf = Buffer.allocUnsafe(length);
    let got = 0;
    let settled = false;
    const finish = (v: Buffer | null) => {
      if (settled) return;
      settled = true;
      resolve(v);
    };
    req.on('data', (d: Buffer) => {
      if (got + d.length > length) {
        settled = true;
        reject(new HttpError(400, 'body longer than its Content-Length'));
        req.destroy();
        return;
      }
      d.copy(buf, got);
      got += d.length;
    });
    req.on('end', () => finish(got === length ? buf : null));
    req.on('aborted', () => finish(null));
    req.on('close', () => finish(got === length ? buf : null));
    req.on('error', () => finish(null));
  });
}
