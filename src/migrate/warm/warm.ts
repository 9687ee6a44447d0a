/**
 * Warm migration from a running QEMU VM (issue #9).
 *
 * Over QMP: a dirty bitmap per disk (block-dirty-bitmap-add), the disks exported read-only by
 * QEMU's own NBD server (nbd-server-start on a private UNIX socket, block-export-add per round),
 * round 0 copies every allocated block into a sparse raw working file per disk; rounds 1..n swap
 * bitmaps atomically in one QMP `transaction` (add the next bitmap, disable the current one, so
 * no write falls between them), read the frozen bitmap's extents through the
 * qemu:dirty-bitmap:NAME meta context, copy those blocks, then remove the frozen bitmap. When the
 * bytes still dirty would copy within --max-downtime (or --max-rounds is reached, or the rounds
 * stop shrinking) the source is stopped (ACPI powerdown with QEMU's shutdown action set to pause,
 * so QEMU stays to serve the last blocks; `stop` with --pause), the final set is copied, the
 * working files are converted into the target format, the target descriptor is written and the
 * VM is started on the target (--to qemu: NAME.sh in the background). Everything a run needs to
 * continue lives in `.DIR.vmferry-warm` beside DIR (state.json, the working files): killing
 * vmferry and running the same command again continues where it stopped, the source still
 * running, because the bitmap in QEMU kept recording.
 *
 * Without --source-qmp (an image file, a plain NBD export: no dirty tracking) each run compares
 * chunk digests of the source and the working copy and copies only the chunks that differ;
 * the operator stops the source and runs once more with --final to cut over.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  existsSync,
  fsyncSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { copyDisk } from '../../convert/pipeline.js';
import { UsageError, VmferryError } from '../../disk/errors.js';
import { getDriver, openImage } from '../../disk/registry.js';
import type { DiskReader, DiskWriter } from '../../disk/types.js';
import { convertImage } from '../../ops/convert.js';
import { type PrecopyEstimate, precopy } from '../../plan/estimate.js';
import '../../transfer/nbd/index.js';
import { NbdDiskReader } from '../../transfer/nbd/reader.js';
import { isNbdUri } from '../../transfer/nbd/uri.js';
import type { ReadVmOptions, TargetDisk } from '../../vm/dialect.js';
import { type MappingOverrides, mapModel } from '../../vm/mapping.js';
import { emptyModel, type Firmware, safeVmName, type TranslationNote, type VmModel } from '../../vm/model.js';
import { targetWriter } from '../../vm/registry.js';
import { contentDigest } from '../hash.js';
import { readVm } from '../inspect.js';
import { profileFor } from '../migrate.js';
import { QmpClient, QmpError } from '../qmp.js';
import { abortStaging, commitStaging, openStaging, type Staging } from '../staging.js';
import { copyRanges, type Range, syncByDigest, WorkFile, workDigest } from './copy.js';

export interface WarmMigrateRequest extends ReadVmOptions {
  /** The VM's descriptor or disk image (for the VM model), or an image / NBD URI without QMP. */
  source: string;
  /** QEMU's QMP socket: dirty tracking and stop/start. Without it, the digest fallback. */
  sourceQmp?: string;
  target: string;
  outDir: string;
  diskBus?: string;
  nicModel?: string;
  diskFormat?: string;
  diskOptions?: Record<string, string>;
  forceFirmware?: Firmware;
  /** Seconds the final stop-and-copy may take (default 1). */
  maxDowntime?: number;
  /** Pre-copy rounds after round 0 at most (default 10). */
  maxRounds?: number;
  /** `stop` the source instead of an ACPI shutdown. */
  pause?: boolean;
  /** Seconds to wait for the guest to power off (default 120) before pausing it instead. */
  shutdownTimeout?: number;
  /** Copy at most this many bytes per second while the source runs (0: unlimited). */
  rateLimit?: number;
  /** Do not start the VM on the target. */
  noStart?: boolean;
  /** Digest fallback: the source has been stopped; do the last pass and cut over. */
  final?: boolean;
  onEvent?: (line: string) => void;
}

export interface RoundReport {
  round: number;
  /** Blocks of `blockSize` bytes copied (bitmap granules; digest chunks that differed). */
  blocks: number;
  blockSize: number;
  /** Runs of contiguous blocks (allocated extents in round 0, dirty runs later). */
  ranges: number;
  bytes: number;
  seconds: number;
  /** Bytes per second copied. */
  rate: number;
  /** Bytes the guest dirtied while the round's bitmap recorded, per second. */
  dirtyRate?: number;
  /** What the pre-copy model predicted for this round, bytes (V*(D/R)^i). */
  predictedBytes?: number;
  /** This round continued one a killed run left unfinished. */
  resumed?: boolean;
  /** The source was stopped during this round (the stop-and-copy). */
  final?: boolean;
  /** Digest fallback: chunks compared. */
  comparedBytes?: number;
}

export interface WarmReport {
  tool: 'vmferry';
  mode: 'warm';
  tracking: 'qemu-dirty-bitmap' | 'digest';
  source: string;
  sourceQmp?: string;
  target: string;
  outDir: string;
  name: string;
  firmware: Firmware;
  mappings: TranslationNote[];
  warnings: string[];
  disks: {
    index: number;
    source: string;
    device?: string;
    virtualSize: number;
    target: string;
    targetFormat: string;
    sourceSha256?: string;
    workSha256?: string;
    verified?: boolean;
  }[];
  rounds: RoundReport[];
  /** The pre-copy model with the measured copy rate R and dirty rate D of round 0. */
  model?: PrecopyEstimate & { volume: number; rate: number; dirtyRate: number };
  cutover?: {
    reason: string;
    predictedSeconds: number;
    /** How the source was stopped: shutdown (ACPI), pause, or already stopped. */
    stoppedBy: string;
    stopSeconds: number;
    finalCopySeconds: number;
    finalBytes: number;
    /** Finishing the target disks (incremental) or converting the working copies to them. */
    convertSeconds: number;
    /** Writing the descriptor (done before the stop when the source is tracked). */
    descriptorSeconds: number;
    commitSeconds: number;
    /** Building the target disks from the working copies while the source still ran. */
    prebuildSeconds: number;
    /** The final round was written straight into the open target disks (no conversion in the downtime). */
    incremental: boolean;
    startSeconds: number;
    /** Source stopped -> target running (or the result committed when not started). */
    downtimeSeconds: number;
    /** What copying everything cold would take at the measured rate. */
    coldCopySeconds: number;
    /** A cold migration's downtime: stop, copy everything, build the target disks, commit, start. */
    coldDowntimeSeconds: number;
  };
  started?: { command: string; pid?: number; serialLog?: string; qmp?: string };
  /** Runs that continued a killed one. */
  resumes: { at: string; round: number; round0Done: number[] }[];
  files: string[];
  seconds: number;
  /** Digest fallback without --final: the run stopped after its passes; no target yet. */
  pending?: string;
}

interface DiskState {
  index: number;
  source: string;
  device?: string;
  node?: string;
  virtualSize: number;
  work: string;
  /** The bitmap recording now, and since when (ms). */
  bitmap?: string;
  bitmapSince?: number;
  /** A disabled bitmap whose blocks are not copied yet. */
  frozen?: string;
  frozenSeconds?: number;
  /** Bitmap names of a transaction that may or may not have run. */
  swap?: { next: string; old: string };
  round0Done: number;
  round0Complete: boolean;
}

interface WarmState {
  version: 1;
  source: string;
  sourceQmp?: string;
  target: string;
  phase: 'precopy' | 'stopped';
  stoppedBy?: string;
  stopAt?: number;
  nbdStarted?: boolean;
  nbdSocket?: string;
  disks: DiskState[];
  rounds: RoundReport[];
  resumes: WarmReport['resumes'];
  rate?: number;
  warnings: string[];
}

const STATE = 'state.json';
const GRANULARITY = 64 * 1024;
/** Digest fallback chunk (syncByDigest's default). */
const DIGEST_CHUNK = 1024 * 1024;

function now(): number {
  return Date.now();
}

function saveState(dir: string, state: WarmState): void {
  const tmp = join(dir, `${STATE}.tmp`);
  writeFileSync(tmp, `${JSON.stringify(state, null, 2)}\n`);
  renameSync(tmp, join(dir, STATE));
}

function loadState(dir: string): WarmState | undefined {
  const p = join(dir, STATE);
  if (!existsSync(p)) return undefined;
  try {
    const s = JSON.parse(readFileSync(p, 'utf8')) as WarmState;
    if (s.version !== 1 || !Array.isArray(s.disks)) throw new Error('unknown version');
    return s;
  } catch (err) {
    throw new VmferryError(
      `the saved warm-migration state is unreadable (${(err as Error).message}); remove the folder to start over`,
      p,
    );
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

/** The folder beside DIR where a warm migration keeps its state between runs. */
export function warmStateDir(outDir: string): string {
  const out = resolve(outDir);
  return join(dirname(out), `.${basename(out)}.vmferry-warm`);
}

function real(p: string): string {
  try {
    return realpathSync(p);
  } catch {
    return resolve(p);
  }
}

function fmtBytes(n: number): string {
  return n >= 1024 * 1024 ? `${(n / 1024 / 1024).toFixed(1)} MiB` : `${(n / 1024).toFixed(1)} KiB`;
}

export async function warmMigrate(req: WarmMigrateRequest): Promise<WarmReport> {
  const started = now();
  const say = (line: string) => req.onEvent?.(line);
  const writer = targetWriter(req.target);
  const maxDowntime = req.maxDowntime ?? 1;
  const maxRounds = req.maxRounds ?? 10;
  if (!(maxDowntime > 0)) throw new UsageError('--max-downtime must be a positive number of seconds');
  if (!(Number.isInteger(maxRounds) && maxRounds >= 0)) throw new UsageError('--max-rounds must be a whole number');

  // The VM model comes from the source descriptor or image; NBD URIs and images make a bare-disk VM.
  const readOptions: ReadVmOptions = {
    allowExternalFiles: req.allowExternalFiles,
    firmware: req.firmware,
    cpus: req.cpus,
    memory: req.memory,
    name: req.name,
  };
  let model: VmModel;
  if (isNbdUri(req.source)) {
    // A plain NBD export: a bare disk VM, everything else from the options.
    const r = await openImage(req.source);
    model = emptyModel(req.name ?? 'nbd-vm', 'nbd');
    model.firmware = req.firmware ?? 'bios';
    if (req.cpus) model.cpus = req.cpus;
    if (req.memory) model.memory = req.memory;
    model.controllers.push({ id: 'sata0', bus: 'sata' });
    model.disks.push({
      path: req.source,
      format: 'raw',
      capacity: r.virtualSize,
      bus: 'sata',
      controller: 'sata0',
      unit: 0,
      bootOrder: 1,
      notes: [],
    });
    await r.close();
  } else {
    model = (await readVm(req.source, readOptions)).model;
  }
  if (model.disks.length === 0) throw new UsageError('the source VM has no disks', req.source);
  const overrides: MappingOverrides = { diskBus: req.diskBus, nicModel: req.nicModel, firmware: req.forceFirmware };
  const mapped = mapModel(model, writer.profile, overrides);
  const target = mapped.model;
  const name = safeVmName(target.name);
  const profile = profileFor(writer, target);
  const format = req.diskFormat ? getDriver(req.diskFormat).name : profile.diskFormat;
  const createOptions = { ...(format === profile.diskFormat ? profile.diskOptions : {}), ...(req.diskOptions ?? {}) };
  const extension = format === profile.diskFormat ? profile.diskExtension : format;

  const dir = warmStateDir(req.outDir);
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const lock = join(dir, 'lock');
  if (existsSync(lock)) {
    const pid = Number(readFileSync(lock, 'utf8'));
    if (pid && pid !== process.pid && processAlive(pid))
      throw new UsageError(`another vmferry (pid ${pid}) is running this migration`, dir);
  }
  writeFileSync(lock, String(process.pid));

  let state = loadState(dir);
  if (state && (state.target !== req.target || real(state.source) !== real(req.source))) {
    throw new UsageError(
      `${dir} holds a warm migration of ${state.source} to ${state.target}; finish it with the same command or remove the folder`,
      req.outDir,
    );
  }
  if (!state) {
    state = {
      version: 1,
      source: req.source,
      sourceQmp: req.sourceQmp,
      target: req.target,
      phase: 'precopy',
      disks: model.disks.map((d, i) => ({
        index: i,
        source: d.path,
        virtualSize: 0,
        work: `disk${i}.raw`,
        round0Done: 0,
        round0Complete: false,
      })),
      rounds: [],
      resumes: [],
      warnings: [],
    };
  } else {
    state.resumes.push({
      at: new Date().toISOString(),
      round: state.rounds.length,
      round0Done: state.disks.map((d) => d.round0Done),
    });
    say(
      `resuming: ${state.rounds.length} round(s) done, round 0 at ${state.disks.map((d) => fmtBytes(d.round0Done)).join(', ')}`,
    );
  }
  const st = state;
  const save = () => saveState(dir, st);
  save();

  const ctx: Ctx = { req, dir, state: st, save, say, maxDowntime, maxRounds };
  const driver = getDriver(format);
  // Target disks that can take the final round in place (random rewrites of uncompressed clusters).
  const incremental = (driver.name === 'qcow2' || driver.name === 'raw') && driver.create !== undefined;
  let stagingOpened: Staging | undefined;
  /**
   * Builds the target disks from the working copies and writes the descriptor. Called while the
   * source still runs (the final round then goes into the open writers too), or at cutover.
   */
  const prepareTargets = async (): Promise<Prepared> => {
    const t0 = now();
    const staging = openStaging(req.outDir);
    stagingOpened = staging;
    const targetDisks: TargetDisk[] = [];
    const writers: Prepared['writers'] = [];
    for (const d of st.disks) {
      const fileName = `${name}-disk${d.index}.${extension}`;
      const path = join(staging.dir, fileName);
      targetDisks.push({ index: d.index, fileName, format, capacity: d.virtualSize });
      if (!incremental) {
        writers.push({ index: d.index, path });
        continue;
      }
      const w = await driver.create!(path, d.virtualSize, { options: createOptions });
      try {
        const r = await openImage(join(dir, d.work), { format: 'raw' });
        try {
          await copyDisk(r, w);
        } finally {
          await r.close();
        }
      } catch (err) {
        await w.abort();
        throw err;
      }
      writers.push({ index: d.index, path, writer: w });
    }
    const t1 = now();
    const written = await writer.write(target, targetDisks, staging.dir);
    for (const f of written) relocate(join(staging.dir, f), staging.dir, staging.outDir);
    return { staging, targetDisks, written, writers, prebuildSeconds: (t1 - t0) / 1000, descriptorSeconds: (now() - t1) / 1000 };
  };
  ctx.prepare = async () => {
    ctx.prepared = await prepareTargets();
    say(`target disks built from the working copies in ${ctx.prepared.prebuildSeconds.toFixed(2)} s (source still running)`);
  };
  let qmp: QmpClient | undefined;
  try {
    if (req.sourceQmp) {
      qmp = await QmpClient.connect(req.sourceQmp);
      ctx.qmp = qmp;
      await trackedPrecopy(ctx);
    } else {
      const done = await digestPrecopy(ctx);
      if (!done) {
        return {
          ...baseReport(ctx, name, target.firmware, mapped.notes, format, extension),
          pending: 'pre-copy passes done; stop the source and run the same command with --final to cut over',
          seconds: (now() - started) / 1000,
        };
      }
    }

    // Cutover: finish (or convert) the target disks, commit, start.
    const t0 = now();
    const prepared = ctx.prepared ?? (await prepareTargets());
    for (const w of prepared.writers) {
      if (w.writer) await w.writer.finish();
      else {
        await convertImage({
          source: join(dir, st.disks[w.index]!.work),
          target: w.path,
          sourceFormat: 'raw',
          targetFormat: format,
          options: createOptions,
        });
      }
    }
    const t1 = now();
    const { staging, targetDisks, written } = prepared;
    const files = [...targetDisks.map((d) => d.fileName), ...written];
    const report = baseReport(ctx, name, target.firmware, mapped.notes, format, extension);
    report.files = [...files, 'report.json'];
    writeFileSync(join(staging.dir, 'report.json'), `${JSON.stringify(report, null, 2)}\n`);
    commitStaging(staging, [...files, 'report.json']);
    const t2 = now();
    let startedAt = t2;
    if (!req.noStart) {
      report.started = await startTarget(req, staging.outDir, name, written, say);
      startedAt = now();
    }
    const stopAt = st.stopAt ?? t0;
    const finalRound = st.rounds.find((r) => r.final);
    const rate = st.rate ?? 0;
    const allocated = st.rounds.filter((r) => r.round === 0).reduce((s, r) => s + r.bytes, 0);
    report.cutover = {
      reason: ctx.cutoverReason ?? 'source stopped by the operator (--final)',
      predictedSeconds: ctx.predictedFinal ?? 0,
      stoppedBy: st.stoppedBy ?? 'operator',
      stopSeconds: ctx.stopSeconds ?? 0,
      finalCopySeconds: finalRound?.seconds ?? 0,
      finalBytes: finalRound?.bytes ?? 0,
      convertSeconds: (t1 - t0) / 1000,
      descriptorSeconds: prepared.descriptorSeconds,
      commitSeconds: (t2 - t1) / 1000,
      prebuildSeconds: prepared.prebuildSeconds,
      incremental: prepared.writers.every((w) => w.writer !== undefined),
      startSeconds: (startedAt - t2) / 1000,
      downtimeSeconds: (startedAt - stopAt) / 1000,
      coldCopySeconds: rate > 0 ? allocated / rate : 0,
      coldDowntimeSeconds: 0,
    };
    const c = report.cutover;
    c.coldDowntimeSeconds =
      c.stopSeconds +
      c.coldCopySeconds +
      c.prebuildSeconds +
      c.convertSeconds +
      c.descriptorSeconds +
      c.commitSeconds +
      c.startSeconds;
    say(`cutover: downtime ${c.downtimeSeconds.toFixed(2)} s (a cold migration's ~${c.coldDowntimeSeconds.toFixed(2)} s)`);

    // Verify: the stopped source (read again) against the working copies the target was made from.
    for (const d of st.disks) {
      const rd = report.disks[d.index]!;
      const src = await openSourceForVerify(ctx, d);
      try {
        const work = WorkFile.open(join(dir, d.work), d.virtualSize);
        try {
          const { sha256 } = await contentDigest(src);
          rd.sourceSha256 = sha256;
          rd.workSha256 = workDigest(work);
          rd.verified = rd.sourceSha256 === rd.workSha256;
        } finally {
          work.close();
        }
      } finally {
        await src.close();
        await ctx.closeExport?.();
      }
    }
    report.seconds = (now() - started) / 1000;
    const bad = report.disks.filter((x) => !x.verified);
    if (bad.length > 0) report.warnings.push(`verification FAILED for disk(s) ${bad.map((x) => x.index).join(', ')}`);
    const finalPath = join(staging.outDir, 'report.json');
    writeFileSync(`${finalPath}.tmp`, `${JSON.stringify(report, null, 2)}\n`);
    renameSync(`${finalPath}.tmp`, finalPath);
    if (bad.length > 0) {
      throw new VmferryError(
        `verification failed: the working copy differs from the stopped source for disk(s) ${bad.map((x) => x.index).join(', ')}; the source QEMU is left as it is (${st.stoppedBy})`,
        req.outDir,
      );
    }
    // The state goes first: a run killed after this point has nothing left to continue.
    rmSync(dir, { recursive: true, force: true });
    if (qmp) await finishSource(ctx);
    return report;
  } catch (err) {
    for (const w of ctx.prepared?.writers ?? []) await w.writer?.abort().catch(() => {});
    if (stagingOpened) abortStaging(stagingOpened);
    throw err;
  } finally {
    await qmp?.close();
    try {
      if (existsSync(lock) && Number(readFileSync(lock, 'utf8')) === process.pid) rmSync(lock, { force: true });
    } catch {
      // the folder may be gone already
    }
  }
}

interface Ctx {
  req: WarmMigrateRequest;
  dir: string;
  state: WarmState;
  save: () => void;
  say: (line: string) => void;
  maxDowntime: number;
  maxRounds: number;
  qmp?: QmpClient;
  cutoverReason?: string;
  predictedFinal?: number;
  stopSeconds?: number;
  closeExport?: () => Promise<void>;
  prepare?: () => Promise<void>;
  prepared?: Prepared;
}

interface Prepared {
  staging: Staging;
  targetDisks: TargetDisk[];
  written: string[];
  writers: { index: number; path: string; writer?: DiskWriter }[];
  prebuildSeconds: number;
  descriptorSeconds: number;
}

function baseReport(
  ctx: Ctx,
  name: string,
  firmware: Firmware,
  mappings: TranslationNote[],
  format: string,
  extension: string,
): WarmReport {
  const st = ctx.state;
  const r0 = st.rounds.filter((r) => r.round === 0);
  const round0Bytes = r0.reduce((s, r) => s + r.bytes, 0);
  const d0 = st.rounds.find((r) => r.round === 1)?.dirtyRate ?? 0;
  let model: WarmReport['model'];
  if (st.rate && round0Bytes > 0) {
    const m = precopy(round0Bytes, d0, st.rate, 1, { maxDowntime: ctx.maxDowntime, maxRounds: ctx.maxRounds + 1 });
    model = { ...m, volume: round0Bytes, rate: st.rate, dirtyRate: d0 };
    if (ctx.req.sourceQmp)
      model.note += `; measured rounds are whole ${GRANULARITY / 1024} KiB bitmap granules, so a round the model puts below one granule per written spot still moves at least that`;
  }
  return {
    tool: 'vmferry',
    mode: 'warm',
    tracking: ctx.req.sourceQmp ? 'qemu-dirty-bitmap' : 'digest',
    source: ctx.req.source,
    sourceQmp: ctx.req.sourceQmp,
    target: ctx.req.target,
    outDir: resolve(ctx.req.outDir),
    name,
    firmware,
    mappings,
    warnings: [...st.warnings],
    disks: st.disks.map((d) => ({
      index: d.index,
      source: d.source,
      device: d.device,
      virtualSize: d.virtualSize,
      target: `${name}-disk${d.index}.${extension}`,
      targetFormat: format,
    })),
    rounds: st.rounds,
    model,
    resumes: st.resumes,
    files: [],
    seconds: 0,
  };
}

// ---------------------------------------------------------------------------------------------
// QEMU with dirty bitmaps

function bitmapName(): string {
  return `vmferry-warm-${randomBytes(4).toString('hex')}`;
}

async function blockInfo(qmp: QmpClient) {
  return qmp.execute('query-block');
}

async function bitmapsOf(qmp: QmpClient, device: string): Promise<Map<string, { count: number; recording?: boolean }>> {
  const info = (await blockInfo(qmp)).find((b) => b.device === device || b.inserted?.['node-name'] === device);
  const out = new Map<string, { count: number; recording?: boolean }>();
  for (const bm of info?.inserted?.['dirty-bitmaps'] ?? [])
    if (bm.name) out.set(bm.name, { count: bm.count, recording: bm.recording });
  return out;
}

async function ensureNbdServer(ctx: Ctx): Promise<string> {
  const qmp = ctx.qmp!;
  const st = ctx.state;
  let sock = st.nbdSocket;
  if (!sock) {
    sock = join(ctx.dir, 'nbd.sock');
    if (sock.length > 100) sock = join(mkdtempSync(join(tmpdir(), 'vmferry-nbd-')), 'nbd.sock');
    st.nbdSocket = sock;
  }
  const start = () => qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: sock } } });
  try {
    await start();
  } catch (err) {
    if (!(err instanceof QmpError) || !/already running/i.test(err.message)) throw err;
    if (!st.nbdStarted) {
      throw new UsageError(
        'QEMU already runs an NBD server that vmferry did not start; stop it (nbd-server-stop) or migrate while it is not needed',
        ctx.req.sourceQmp!,
      );
    }
    await qmp.execute('nbd-server-stop');
    mkdirSync(dirname(sock), { recursive: true });
    await start();
  }
  st.nbdStarted = true;
  ctx.save();
  // Exports left by a killed run.
  const exports = (await qmp.execute('query-block-exports')) as { id: string }[];
  for (const e of exports)
    if (e.id.startsWith('vmferry-warm-')) await qmp.execute('block-export-del', { id: e.id, mode: 'hard' });
  return sock;
}

async function waitExportGone(qmp: QmpClient, id: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const exports = (await qmp.execute('query-block-exports')) as { id: string }[];
    if (!exports.some((e) => e.id === id)) return;
    await sleep(10);
  }
}

/** Exports one disk read-only over QEMU's NBD server, with `bitmap` when given; returns a reader. */
async function exportDisk(
  ctx: Ctx,
  d: DiskState,
  bitmap?: string,
): Promise<{ reader: NbdDiskReader; close: () => Promise<void> }> {
  const qmp = ctx.qmp!;
  const id = `vmferry-warm-${d.index}-${randomBytes(3).toString('hex')}`;
  await qmp.execute('block-export-add', {
    type: 'nbd',
    id,
    'node-name': d.node!,
    name: id,
    writable: false,
    ...(bitmap ? { bitmaps: [bitmap] } : {}),
  });
  const uri = `nbd+unix:///${id}?socket=${ctx.state.nbdSocket}`;
  let reader: NbdDiskReader;
  try {
    reader = await NbdDiskReader.open(uri, { dirtyBitmap: bitmap });
  } catch (err) {
    await qmp.execute('block-export-del', { id, mode: 'hard' }).catch(() => {});
    throw err;
  }
  let closed = false;
  return {
    reader,
    close: async () => {
      if (closed) return;
      closed = true;
      await reader.close();
      await qmp
        .execute('block-export-del', { id })
        .catch(() => qmp.execute('block-export-del', { id, mode: 'hard' }).catch(() => {}));
      await waitExportGone(qmp, id);
    },
  };
}

async function trackedPrecopy(ctx: Ctx): Promise<void> {
  const qmp = ctx.qmp!;
  const st = ctx.state;
  const status = await qmp.execute('query-status');
  ctx.say(`source: ${status.status}`);
  const blocks = await blockInfo(qmp);
  // Match every disk of the model to a QEMU block device by the file it has open.
  for (const d of st.disks) {
    const want = real(d.source);
    const b = blocks.find((x) => x.inserted && [x.inserted.file, x.inserted.image?.filename].some((f) => f && real(f) === want));
    if (!b?.inserted) {
      const have = blocks.filter((x) => x.inserted).map((x) => `${x.device || x.qdev}: ${x.inserted!.file}`);
      throw new UsageError(
        `the running VM has no block device on ${d.source} (it has ${have.join('; ') || 'none'})`,
        ctx.req.sourceQmp!,
      );
    }
    d.device = b.device || b.qdev;
    d.node = b.inserted['node-name'];
    if (!d.node) throw new UsageError(`block device ${d.device} has no node name`, ctx.req.sourceQmp!);
    d.virtualSize = b.inserted.image?.['virtual-size'] ?? d.virtualSize;
  }
  if (st.phase === 'precopy' && !status.running) {
    throw new UsageError(`the source VM is ${status.status}, not running; a warm migration needs it running`, ctx.req.sourceQmp!);
  }
  await ensureNbdServer(ctx);

  // Bitmaps: create, or check that the ones a killed run made still record.
  for (const d of st.disks) {
    const have = await bitmapsOf(qmp, d.node!);
    if (d.swap) {
      // Killed around a transaction: it ran if the next bitmap exists.
      if (have.has(d.swap.next)) {
        d.frozen = d.swap.old;
        d.bitmap = d.swap.next;
      }
      d.swap = undefined;
    }
    if (d.frozen && !have.has(d.frozen)) d.frozen = undefined;
    if (d.bitmap && !have.has(d.bitmap)) {
      st.warnings.push(
        `disk${d.index}: QEMU lost the dirty bitmap ${d.bitmap} (restarted?); copying the disk again from round 0`,
      );
      d.bitmap = undefined;
      d.frozen = undefined;
      d.round0Done = 0;
      d.round0Complete = false;
    }
    if (!d.bitmap) {
      if (st.phase !== 'precopy')
        throw new VmferryError('the source is stopped and its dirty bitmap is gone; start over', ctx.dir);
      d.bitmap = bitmapName();
      d.bitmapSince = now();
      await qmp.execute('block-dirty-bitmap-add', { node: d.node, name: d.bitmap, granularity: GRANULARITY, persistent: false });
      ctx.say(`disk${d.index}: dirty bitmap ${d.bitmap} on ${d.device}`);
    }
  }
  ctx.save();

  // Round 0: everything allocated.
  if (st.disks.some((d) => !d.round0Complete)) {
    const resumed = st.disks.some((d) => d.round0Done > 0);
    let bytes = 0;
    let ranges = 0;
    const t0 = now();
    for (const d of st.disks) {
      if (d.round0Complete) continue;
      const work = WorkFile.open(join(ctx.dir, d.work), d.virtualSize);
      const ex = await exportDisk(ctx, d);
      try {
        let lastSave = now();
        const extents = async function* () {
          for await (const e of ex.reader.extents(d.round0Done)) if (e.kind === 'data') yield e;
        };
        const s = await copyRanges(ex.reader, work, extents(), {
          skipZeroes: true,
          rateLimit: ctx.req.rateLimit,
          onWritten: (end) => {
            if (now() - lastSave >= 500) {
              work.sync();
              d.round0Done = end;
              ctx.save();
              lastSave = now();
              ctx.say(`round 0: disk${d.index} at ${fmtBytes(end)} of ${fmtBytes(d.virtualSize)}`);
            }
          },
        });
        work.sync();
        d.round0Done = d.virtualSize;
        d.round0Complete = true;
        ctx.save();
        bytes += s.bytes;
        ranges += s.ranges;
      } finally {
        work.close();
        await ex.close();
      }
    }
    const seconds = (now() - t0) / 1000;
    // Combine with a part done by a killed run, so round 0 is reported once.
    const prev = st.rounds.find((r) => r.round === 0);
    if (prev) {
      prev.bytes += bytes;
      prev.ranges += ranges;
      prev.blocks = Math.ceil(prev.bytes / GRANULARITY);
      prev.seconds += seconds;
      prev.rate = prev.bytes / Math.max(prev.seconds, 1e-6);
      prev.resumed = true;
    } else {
      st.rounds.push({
        round: 0,
        blocks: Math.ceil(bytes / GRANULARITY),
        blockSize: GRANULARITY,
        ranges,
        bytes,
        seconds,
        rate: bytes / Math.max(seconds, 1e-6),
        resumed,
      });
    }
    const r0 = st.rounds.find((r) => r.round === 0)!;
    st.rate = ctx.req.rateLimit ? Math.min(r0.rate, ctx.req.rateLimit) : r0.rate;
    ctx.save();
    ctx.say(`round 0: ${fmtBytes(bytes)} in ${seconds.toFixed(2)} s`);
  } else if (!st.rounds.some((r) => r.round === 0)) {
    st.rounds.push({ round: 0, blocks: 0, blockSize: GRANULARITY, ranges: 0, bytes: 0, seconds: 0, rate: 0 });
  }

  // A frozen bitmap a killed run did not finish copying.
  if (st.disks.some((d) => d.frozen)) await copyFrozen(ctx, st.rounds.length, true);

  // Rounds 1..n while the source runs.
  if (st.phase === 'precopy') {
    for (;;) {
      const dirty = await dirtyBytesNow(ctx);
      const rate = roundRate(st);
      const predicted = dirty / rate;
      const preRounds = st.rounds.filter((r) => r.round > 0 && !r.final);
      const last = preRounds[preRounds.length - 1];
      const prior = preRounds[preRounds.length - 2];
      if (predicted <= ctx.maxDowntime) {
        ctx.cutoverReason = `${fmtBytes(dirty)} dirty: predicted stop-and-copy ${predicted.toFixed(3)} s <= --max-downtime ${ctx.maxDowntime} s`;
      } else if (preRounds.length >= ctx.maxRounds) {
        ctx.cutoverReason = `--max-rounds ${ctx.maxRounds} reached with ${fmtBytes(dirty)} dirty (predicted stop-and-copy ${predicted.toFixed(3)} s)`;
      } else if (last && prior && last.bytes >= prior.bytes && dirty >= last.bytes) {
        ctx.cutoverReason = `rounds stopped shrinking (${fmtBytes(prior.bytes)}, ${fmtBytes(last.bytes)}, now ${fmtBytes(dirty)} dirty): the guest dirties about as fast as the copy runs`;
      }
      if (ctx.cutoverReason) {
        ctx.predictedFinal = predicted;
        break;
      }
      await swapBitmaps(ctx);
      await copyFrozen(ctx, st.rounds.length, false);
    }
    await ctx.prepare?.();
    if (ctx.prepared) syncFolder(ctx.prepared.staging.dir);
    await stopSource(ctx);
  } else {
    ctx.cutoverReason = 'continuing a cutover a killed run began (the source was already stopped)';
    ctx.predictedFinal = 0;
  }

  // Final round: the source is stopped; its bitmap holds everything since the last swap.
  for (const d of st.disks) {
    if (!d.frozen && d.bitmap) {
      await qmp.execute('block-dirty-bitmap-disable', { node: d.node, name: d.bitmap });
      d.frozen = d.bitmap;
      d.frozenSeconds = (now() - (d.bitmapSince ?? now())) / 1000;
      d.bitmap = undefined;
      ctx.save();
    }
  }
  await copyFrozen(ctx, st.rounds.length, false, true);
}

function roundRate(st: WarmState): number {
  const recent = [...st.rounds].reverse().find((r) => r.bytes >= 1024 * 1024 && r.rate > 0);
  return Math.max(recent?.rate ?? st.rate ?? 0, st.rate ?? 0, 1);
}

async function dirtyBytesNow(ctx: Ctx): Promise<number> {
  let total = 0;
  for (const d of ctx.state.disks) total += (await bitmapsOf(ctx.qmp!, d.node!)).get(d.bitmap!)?.count ?? 0;
  return total;
}

async function swapBitmaps(ctx: Ctx): Promise<void> {
  const st = ctx.state;
  const actions: unknown[] = [];
  for (const d of st.disks) {
    const next = bitmapName();
    d.swap = { next, old: d.bitmap! };
    actions.push(
      { type: 'block-dirty-bitmap-add', data: { node: d.node, name: next, granularity: GRANULARITY, persistent: false } },
      { type: 'block-dirty-bitmap-disable', data: { node: d.node, name: d.bitmap } },
    );
  }
  ctx.save();
  await ctx.qmp!.execute('transaction', { actions });
  const t = now();
  for (const d of st.disks) {
    d.frozen = d.swap!.old;
    d.frozenSeconds = (t - (d.bitmapSince ?? t)) / 1000;
    d.bitmap = d.swap!.next;
    d.bitmapSince = t;
    d.swap = undefined;
  }
  ctx.save();
}

/** Copies the blocks every disk's frozen bitmap marks, then removes those bitmaps. */
async function copyFrozen(ctx: Ctx, round: number, resumed: boolean, final = false): Promise<void> {
  const st = ctx.state;
  const qmp = ctx.qmp!;
  const t0 = now();
  let bytes = 0;
  let ranges = 0;
  let dirtySeconds = 0;
  let dirtyBytes = 0;
  for (const d of st.disks) {
    if (!d.frozen) continue;
    const count = (await bitmapsOf(qmp, d.node!)).get(d.frozen)?.count ?? 0;
    dirtyBytes += count;
    dirtySeconds = Math.max(dirtySeconds, d.frozenSeconds ?? 0);
    const work = WorkFile.open(join(ctx.dir, d.work), d.virtualSize);
    const ex = await exportDisk(ctx, d, d.frozen);
    try {
      const list: Range[] = [];
      for await (const r of ex.reader.dirtyExtents()) list.push(r);
      const target = final ? ctx.prepared?.writers.find((w) => w.index === d.index)?.writer : undefined;
      const s = await copyRanges(ex.reader, work, list, {
        rateLimit: ctx.req.rateLimit,
        also: target ? (offset, data) => target.write(offset, data) : undefined,
      });
      work.sync();
      bytes += s.bytes;
      ranges += s.ranges;
    } finally {
      work.close();
      await ex.close();
    }
    await qmp.execute('block-dirty-bitmap-remove', { node: d.node, name: d.frozen });
    d.frozen = undefined;
    ctx.save();
  }
  const seconds = (now() - t0) / 1000;
  const r0 = st.rounds.find((r) => r.round === 0);
  const d0 = st.rounds.find((r) => r.round === 1)?.dirtyRate ?? (dirtySeconds > 0 ? dirtyBytes / dirtySeconds : 0);
  const rate = st.rate ?? 1;
  const predictedBytes = r0 && r0.bytes > 0 ? r0.bytes * (d0 / rate) ** round : undefined;
  st.rounds.push({
    round,
    blocks: Math.ceil(bytes / GRANULARITY),
    blockSize: GRANULARITY,
    ranges,
    bytes,
    seconds,
    rate: bytes / Math.max(seconds, 1e-6),
    dirtyRate: dirtySeconds > 0 ? dirtyBytes / dirtySeconds : undefined,
    predictedBytes,
    resumed: resumed || undefined,
    final: final || undefined,
  });
  ctx.save();
  ctx.say(`round ${round}${final ? ' (final)' : ''}: ${ranges} dirty runs, ${fmtBytes(bytes)} in ${seconds.toFixed(3)} s`);
}

async function stopSource(ctx: Ctx): Promise<void> {
  const qmp = ctx.qmp!;
  const st = ctx.state;
  const t0 = now();
  st.stopAt = t0;
  if (ctx.req.pause) {
    await qmp.execute('stop');
    st.stoppedBy = 'pause';
  } else {
    // Keep QEMU alive after the guest powers off: its NBD server must serve the last blocks.
    await qmp.execute('set-action', { shutdown: 'pause' });
    qmp.drainEvents();
    await qmp.execute('system_powerdown');
    ctx.say('source: ACPI power-down sent, waiting for the guest to shut down');
    try {
      await qmp.waitEvent('SHUTDOWN', { timeoutMs: (ctx.req.shutdownTimeout ?? 120) * 1000 });
      st.stoppedBy = 'shutdown';
    } catch {
      st.warnings.push(
        `the guest did not shut down within ${ctx.req.shutdownTimeout ?? 120} s of the ACPI power-down; it was paused instead`,
      );
      await qmp.execute('stop');
      st.stoppedBy = 'pause (shutdown timed out)';
    }
    // The VM stops (shutdown action pause): wait until QEMU says so.
    for (let i = 0; i < 500; i++) {
      if (!(await qmp.execute('query-status')).running) break;
      await sleep(10);
    }
  }
  st.phase = 'stopped';
  ctx.stopSeconds = (now() - t0) / 1000;
  ctx.save();
  ctx.say(`source stopped (${st.stoppedBy}) in ${ctx.stopSeconds.toFixed(2)} s`);
}

async function openSourceForVerify(ctx: Ctx, d: DiskState): Promise<DiskReader> {
  if (!ctx.qmp) return openImage(d.source, { allowExternalFiles: ctx.req.allowExternalFiles });
  const ex = await exportDisk(ctx, d);
  ctx.closeExport = ex.close;
  return ex.reader;
}

/** After a verified cutover: QEMU's NBD server goes; a shut-down source QEMU is told to quit. */
async function finishSource(ctx: Ctx): Promise<void> {
  const qmp = ctx.qmp!;
  await qmp.execute('nbd-server-stop').catch(() => {});
  if (ctx.state.stoppedBy === 'shutdown') await qmp.execute('quit').catch(() => {});
}

// ---------------------------------------------------------------------------------------------
// Digest fallback

async function digestPrecopy(ctx: Ctx): Promise<boolean> {
  const st = ctx.state;
  for (const d of st.disks) {
    const r = await openImage(d.source, { allowExternalFiles: ctx.req.allowExternalFiles });
    d.virtualSize = r.virtualSize;
    await r.close();
  }
  const pass = async (final: boolean) => {
    const t0 = now();
    let bytes = 0;
    let ranges = 0;
    let compared = 0;
    for (const d of st.disks) {
      const src = await openImage(d.source, { allowExternalFiles: ctx.req.allowExternalFiles });
      const work = WorkFile.open(join(ctx.dir, d.work), d.virtualSize);
      try {
        const s = await syncByDigest(src, work, { rateLimit: ctx.req.rateLimit });
        bytes += s.bytes;
        ranges += s.changedChunks;
        compared += s.comparedBytes;
      } finally {
        work.close();
        await src.close();
      }
    }
    const seconds = (now() - t0) / 1000;
    const round = st.rounds.length;
    st.rounds.push({
      round,
      blocks: ranges,
      blockSize: DIGEST_CHUNK,
      ranges,
      bytes,
      seconds,
      rate: compared / Math.max(seconds, 1e-6),
      comparedBytes: compared,
      final: final || undefined,
    });
    st.rate = compared / Math.max(seconds, 1e-6);
    ctx.save();
    ctx.say(
      `digest pass ${round}${final ? ' (final)' : ''}: ${ranges} chunk(s) differed, ${fmtBytes(bytes)} copied, ${seconds.toFixed(2)} s`,
    );
    return { bytes, seconds };
  };
  if (ctx.req.final) {
    st.phase = 'stopped';
    st.stopAt = now();
    st.stoppedBy = 'operator';
    ctx.save();
    await pass(true);
    ctx.cutoverReason = 'the operator stopped the source and asked for the final pass (--final)';
    return true;
  }
  // While the source runs, passes until one changes little (or max rounds).
  for (let i = 0; i <= ctx.maxRounds; i++) {
    const p = await pass(false);
    if (i > 0 && p.bytes / (st.rate ?? 1) <= ctx.maxDowntime) break;
  }
  return false;
}

// ---------------------------------------------------------------------------------------------
// Target start

async function startTarget(
  req: WarmMigrateRequest,
  outDir: string,
  name: string,
  written: string[],
  say: (l: string) => void,
): Promise<WarmReport['started']> {
  if (req.target !== 'qemu') {
    say(`target ${req.target}: not started by vmferry; the descriptor is in ${outDir}`);
    return { command: `(start ${written.join(', ')} with the ${req.target} tools)` };
  }
  const script = written.find((f) => f.endsWith('.sh'));
  if (!script) throw new VmferryError('the qemu target wrote no launch script', outDir);
  const serialLog = join(outDir, `${name}.serial.log`);
  let qmpSock = join(outDir, `${name}.qmp`);
  if (qmpSock.length > 100) qmpSock = join(mkdtempSync(join(tmpdir(), 'vmferry-qmp-')), 'target.qmp');
  const args = [
    join(outDir, script),
    '-display',
    'none',
    '-serial',
    `file:${serialLog}`,
    '-qmp',
    `unix:${qmpSock},server=on,wait=off`,
  ];
  const child: ChildProcess = spawn('sh', args, { detached: true, stdio: 'ignore', cwd: outDir });
  child.unref();
  let exited: number | null | undefined;
  child.once('exit', (code) => {
    exited = code;
  });
  // Running means QEMU answers on its QMP socket that the VM runs.
  for (let i = 0; i < 600; i++) {
    if (exited !== undefined) throw new VmferryError(`the target VM exited (code ${exited}) as it started`, join(outDir, script));
    if (existsSync(qmpSock)) {
      try {
        const q = await QmpClient.connect(qmpSock, { timeoutMs: 2000 });
        const s = await q.execute('query-status');
        await q.close();
        if (s.running) break;
      } catch {
        // not ready yet
      }
    }
    await sleep(50);
  }
  say(`target started: ${args.join(' ')}`);
  return { command: `sh ${args.join(' ')}`, pid: child.pid, serialLog, qmp: qmpSock };
}

/** Flushes every file of a folder to stable storage (the target disks built before the stop). */
function syncFolder(folder: string): void {
  for (const f of readdirSync(folder)) {
    let fd: number | undefined;
    try {
      fd = openSync(join(folder, f), 'r');
      fsyncSync(fd);
    } catch {
      // best effort: finish() syncs again
    } finally {
      if (fd !== undefined) closeSync(fd);
    }
  }
}

/** Rewrites the staging folder's path to the final folder's in a small text descriptor. */
function relocate(file: string, from: string, to: string): void {
  let size: number;
  try {
    const s = statSync(file);
    if (!s.isFile()) return;
    size = s.size;
  } catch {
    return;
  }
  if (size > 16 * 1024 * 1024) return;
  const mode = statSync(file).mode;
  const data = readFileSync(file);
  if (data.includes(0)) return;
  const text = data.toString('utf8');
  if (!text.includes(from)) return;
  writeFileSync(`${file}.tmp`, text.split(from).join(to), { mode });
  renameSync(`${file}.tmp`, file);
}
