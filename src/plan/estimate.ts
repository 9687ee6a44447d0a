/**
 * How long will moving this disk take? Allocated size from the extent map, the wire ratio measured
 * on a spread sample of data blocks (compressed as `vmferry send` compresses them, zero grains
 * dropped), a confidence interval, the predicted transfer time, and the warm-migration pre-copy
 * model: round i sends V*(D/R)^i, converging only while D < R.
 */
import { createHash } from 'node:crypto';
import { UsageError } from '../disk/errors.js';
import type { DiskReader } from '../disk/types.js';
import { isZero } from '../disk/zero.js';
import { blockPieces, DIGEST_BLOCK } from '../transfer/digest.js';
import { GRAIN, packPayload, unpackPayload, type WireCodec } from '../transfer/protocol.js';

/**
 * The costs of a `vmferry send` besides the wire, each overridable (`vmferry estimate --model
 * key=value,...`). Rates are guest bytes per second. Those left out are measured on the sample
 * (the CPU terms) or take the defaults below, measured on the 2-core VM the benchmark runs on.
 */
export interface CostModel {
  /** Start of the send process (node, module loading, opening the source and its map), seconds. */
  startSeconds: number;
  /** CPU of one TLS 1.3 handshake (the pin check, then one per stream), seconds; each also costs a round trip. */
  tlsSeconds: number;
  /** Sender, one core: read, whole-content digest, zero-grain scan, chunk digest, compression. */
  senderBytesPerSecond: number;
  /** Agent, one core: decompression, chunk digest, zero scan per cluster, copy into place. */
  agentBytesPerSecond: number;
  /** Agent's final read-back of the written image and its content digest. */
  verifyBytesPerSecond: number;
  /** Agent's disk: fsync of what was written (checkpoints and finish block the agent while they run). */
  syncBytesPerSecond: number;
}

/**
 * Measured on the 2-core benchmark VM when idle: a send process's wall time minus its own clock
 * (node start, module loading, CLI parsing, exit) was 0.22-0.25 s (0.42-0.73 s at a load average of
 * ~7); `dd conv=fsync` of 256 MiB took 0.64-0.97 s, about 300 MB/s.
 */
export const DEFAULT_COSTS: Pick<CostModel, 'startSeconds' | 'tlsSeconds' | 'syncBytesPerSecond'> = {
  startSeconds: 0.25,
  tlsSeconds: 0.004,
  syncBytesPerSecond: 300e6,
};

/**
 * Share of a link's rate left for payload: a full-sized TCP segment (1448 bytes of data) travels in
 * a 1514-byte Ethernet frame (IP, TCP with timestamps, Ethernet headers); TLS records add ~0.2%.
 */
export const LINK_EFFICIENCY = 1448 / 1514;

/** The agent's default checkpoint spacing (serve --checkpoint-every): it fsyncs at each one. */
export const AGENT_CHECKPOINT_BYTES = 64 * 1024 * 1024;

export interface EstimateOptions {
  /** Bytes per second available on the wire. */
  bandwidth?: number;
  /** Round-trip time, seconds. */
  rtt?: number;
  codec?: WireCodec;
  level?: number;
  /** Data blocks (1 MiB) to sample. */
  samples?: number;
  /** Requests in flight (send --streams). */
  streams?: number;
  /** Overrides of the cost model's terms (measured or default otherwise). */
  model?: Partial<CostModel>;
  /** Guest bytes dirtied per second while the VM runs (warm migration). */
  dirtyRate?: number;
  /** Cutover when a round would take at most this long, seconds. */
  maxDowntime?: number;
  maxRounds?: number;
}

export interface Interval {
  mean: number;
  low: number;
  high: number;
}

export interface PrecopyRound {
  round: number;
  bytes: number;
  seconds: number;
}

export interface PrecopyEstimate {
  converges: boolean;
  /** D/R in guest bytes: below 1 the rounds shrink. */
  dirtyToRate: number;
  rounds: PrecopyRound[];
  /** Guest bytes over all rounds (the last is the stop-and-copy). */
  totalBytes: number;
  totalWireBytes: number;
  totalSeconds: number;
  /** The VM is paused for the last round. */
  downtimeSeconds: number;
  note: string;
}

/** What the time model needs to know about one transfer. */
export interface TransferShape {
  /** Guest bytes the sender reads (data blocks). */
  readBytes: number;
  /** Of those, bytes that are not zero grains: what the agent writes and syncs. */
  writtenBytes: number;
  /** Payload bytes on the wire. */
  wireBytes: number;
  /** Data chunks (requests besides begin and finish). */
  chunks: number;
  bandwidth: number;
  rtt: number;
  streams: number;
  /** The agent's checkpoint spacing, bytes (AGENT_CHECKPOINT_BYTES unless the agent was told otherwise). */
  checkpointBytes?: number;
}

/** The time model's terms, seconds. */
export interface TimeTerms {
  /** Process start, TLS handshakes (CPU and a round trip each), begin and finish round trips. */
  fixed: number;
  /** Payload bandwidth: min(B x LINK_EFFICIENCY, streams x chunk / (RTT + chunk / B)). */
  effectiveBandwidth: number;
  network: number;
  sender: number;
  agent: number;
  /** The chunk flow: the slowest of network, sender CPU and agent CPU (they overlap). */
  flow: number;
  limitedBy: 'network' | 'sender-cpu' | 'agent-cpu';
  /** The first chunk is prepared before anything is sent; the last is applied after it arrived. */
  fill: number;
  sync: number;
  verify: number;
  total: number;
}

/**
 * Closed form: total = fixed + max(network, sender, agent) + fill + sync + verify.
 * The sync term is the final flush only (see below); it is added, not overlapped, since nothing
 * else is left to do while it runs.
 */
export function transferTime(x: TransferShape, m: CostModel): TimeTerms {
  const handshakes = 1 + Math.min(x.streams, Math.max(1, x.chunks));
  const fixed = m.startSeconds + handshakes * (m.tlsSeconds + x.rtt) + 2 * x.rtt;
  const chunkWire = x.chunks > 0 ? x.wireBytes / x.chunks : 0;
  const window = chunkWire > 0 ? (x.streams * chunkWire) / (x.rtt + chunkWire / x.bandwidth) : x.bandwidth;
  const effectiveBandwidth = Math.min(x.bandwidth * LINK_EFFICIENCY, window);
  const network = x.wireBytes / effectiveBandwidth;
  const sender = x.readBytes / m.senderBytesPerSecond;
  const agent = x.readBytes / m.agentBytesPerSecond;
  const flow = Math.max(network, sender, agent);
  const limitedBy = flow === network ? 'network' : flow === sender ? 'sender-cpu' : 'agent-cpu';
  const chunkRaw = x.chunks > 0 ? x.readBytes / x.chunks : 0;
  const fill = chunkRaw / m.senderBytesPerSecond + chunkRaw / m.agentBytesPerSecond;
  // The agent fsyncs at every checkpoint while later chunks are still arriving (the streams' requests
  // in flight and the socket buffers absorb the pause); only the last flush, of what came after the
  // last checkpoint, stands between the last chunk and the end.
  const sync = Math.min(x.writtenBytes, x.checkpointBytes ?? AGENT_CHECKPOINT_BYTES) / m.syncBytesPerSecond;
  const verify = x.readBytes / m.verifyBytesPerSecond;
  return {
    fixed,
    effectiveBandwidth,
    network,
    sender,
    agent,
    flow,
    limitedBy,
    fill,
    sync,
    verify,
    total: fixed + flow + fill + sync + verify,
  };
}

export interface Estimate {
  virtualSize: number;
  /** Guest bytes in data extents (backing chain included). */
  allocatedBytes: number;
  /** What the sender reads: data extents widened to 1 MiB blocks. */
  readBytes: number;
  /** Of those, non-zero grains (what the agent writes). */
  writtenBytes: number;
  codec: WireCodec;
  samples: number;
  sampledBytes: number;
  /** Wire bytes per allocated byte (zero grains dropped, then compressed), 95% interval. */
  ratio: Interval;
  wireBytes: Interval;
  /** Requests the sender will make (chunks, begin, finish). */
  requests: number;
  /** Sender-side processing speed measured on the sample (same as model.senderBytesPerSecond). */
  cpuBytesPerSecond: number;
  /** The cost model used: measured on the sample, defaults, or given. */
  model: CostModel;
  bandwidth?: number;
  rtt: number;
  streams: number;
  seconds?: Interval;
  limitedBy?: TimeTerms['limitedBy'];
  /** The terms behind seconds.mean. */
  terms?: TimeTerms;
  /** The final read-back and digest on the agent. */
  verifySeconds?: number;
  precopy?: PrecopyEstimate;
}

const MiB = 1024 * 1024;
const CHUNK = 4 * MiB;

/** "12.5M" bytes/s (K/M/G binary), or bits per second with a bit suffix: "100Mbit", "1Gbps". */
export function parseRate(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b(?:ytes?)?|bit|bits|bps|b)?(?:\/s)?\s*$/i.exec(text);
  if (!m) throw new UsageError(`Invalid rate '${text}': use bytes/s like 50M, or bits/s like 100Mbit`);
  const n = Number(m[1]);
  const prefix = (m[2] ?? '').toLowerCase();
  const unit = (m[3] ?? '').toLowerCase();
  const isBits = unit === 'bit' || unit === 'bits' || unit === 'bps';
  const scale = isBits
    ? ({ '': 1, k: 1e3, m: 1e6, g: 1e9, t: 1e12 }[prefix] ?? 1) / 8
    : ({ '': 1, k: 1024, m: MiB, g: 1024 * MiB, t: 1024 * 1024 * MiB }[prefix] ?? 1);
  const v = n * scale;
  if (!(v > 0) || !Number.isFinite(v)) throw new UsageError(`Invalid rate '${text}'`);
  return v;
}

const MODEL_KEYS: Record<string, keyof CostModel> = {
  start: 'startSeconds',
  tls: 'tlsSeconds',
  sender: 'senderBytesPerSecond',
  agent: 'agentBytesPerSecond',
  verify: 'verifyBytesPerSecond',
  sync: 'syncBytesPerSecond',
};

/** `start=0.3,tls=0.01,sender=200M,agent=300M,verify=1G,sync=150M` (seconds, or rates as for --bandwidth). */
export function parseModel(text: string): Partial<CostModel> {
  const out: Partial<CostModel> = {};
  for (const part of text.split(',').filter((p) => p.trim() !== '')) {
    const [k, v] = part.split('=').map((x) => x.trim());
    const key = MODEL_KEYS[k ?? ''];
    if (!key || v === undefined || v === '')
      throw new UsageError(`--model: '${part}' is not one of ${Object.keys(MODEL_KEYS).join(', ')} = value`);
    if (key === 'startSeconds' || key === 'tlsSeconds') {
      const n = Number(v);
      if (!Number.isFinite(n) || n < 0) throw new UsageError(`--model ${k} must be seconds, not '${v}'`);
      out[key] = n;
    } else out[key] = parseRate(v);
  }
  return out;
}

/** Two-sided 95% Student t quantile for `df` degrees of freedom (normal beyond 30). */
function t95(df: number): number {
  const table = [
    12.71, 4.3, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.2, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11, 2.1, 2.09, 2.09,
  ];
  if (df <= 0) return Number.POSITIVE_INFINITY;
  if (df <= table.length) return table[df - 1]!;
  return df < 30 ? 2.05 : 1.96;
}

/** The sender's work on one block, as makeChunks does it; returns the wire bytes and the non-zero bytes. */
function senderWork(block: Buffer, codec: WireCodec, level?: number): { packed: Buffer; data: Buffer } {
  // Whole-content digest of the block (ContentDigest.addData).
  if (!isZero(block)) createHash('sha256').update(block).digest();
  const parts: Buffer[] = [];
  for (let s = 0; s < block.length; s += GRAIN) {
    const e = Math.min(block.length, s + GRAIN);
    if (!isZero(block, s, e)) parts.push(block.subarray(s, e));
  }
  const data = parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  // The chunk digest, then compression (sent uncompressed when that is not smaller).
  createHash('sha256').update(data).digest();
  const packed = data.length ? packPayload(codec, data, level) : data;
  return { packed: packed.length < data.length ? packed : data, data };
}

/** The shortest of `times` runs of `work`, in seconds, and what the last run returned. */
function fastestOf<T>(times: number, work: () => T): [number, T] {
  let best = Number.POSITIVE_INFINITY;
  let result!: T;
  for (let i = 0; i < times; i++) {
    const t0 = performance.now();
    result = work();
    best = Math.min(best, performance.now() - t0);
  }
  return [best / 1000, result];
}

/** The agent's work on one block: decompress, chunk digest, zero scan per unit, copy into place. */
function agentWork(packed: Buffer, data: Buffer, codec: WireCodec, scratch: Buffer): void {
  const out = packed.length < data.length ? unpackPayload(codec, packed, data.length) : packed;
  createHash('sha256').update(out).digest();
  out.copy(scratch, 0, 0, Math.min(out.length, scratch.length));
  for (let u = 0; u < scratch.length; u += 65536) isZero(scratch, u, Math.min(scratch.length, u + 65536));
}

export async function estimateTransfer(reader: DiskReader, o: EstimateOptions = {}): Promise<Estimate> {
  const codec = o.codec ?? 'zstd';
  const rtt = o.rtt ?? 0;
  const streams = o.streams ?? 4;
  // The extent map, as the sender walks it.
  const pieces: { start: number; end: number }[] = [];
  let readBytes = 0;
  let chunks = 0;
  for await (const p of blockPieces(reader, DIGEST_BLOCK, CHUNK)) {
    if (p.kind !== 'data') continue;
    pieces.push({ start: p.start, end: p.end });
    readBytes += p.end - p.start;
  }
  // The sender packs data pieces into chunks of up to 4 MiB of data.
  chunks = Math.ceil(readBytes / CHUNK);
  let allocatedBytes = 0;
  const { flatExtents } = await import('../disk/chain.js');
  for await (const e of flatExtents(reader)) if (e.kind === 'data') allocatedBytes += e.length;

  // A stratified sample of 1 MiB blocks spread evenly over the data.
  const totalBlocks = pieces.reduce((n, p) => n + Math.ceil((p.end - p.start) / DIGEST_BLOCK), 0);
  const n = Math.min(totalBlocks, Math.max(1, o.samples ?? 48));
  const ratios: number[] = [];
  let sampledRaw = 0;
  let sampledWire = 0;
  let sampledData = 0;
  let senderSeconds = 0;
  let agentSeconds = 0;
  let verifySeconds = 0;
  const scratch = Buffer.alloc(DIGEST_BLOCK);
  let pi = 0;
  let blocksBefore = 0;
  for (let i = 0; i < n; i++) {
    const k = Math.floor(((i + 0.5) * totalBlocks) / n);
    while (pi < pieces.length && blocksBefore + Math.ceil((pieces[pi]!.end - pieces[pi]!.start) / DIGEST_BLOCK) <= k) {
      blocksBefore += Math.ceil((pieces[pi]!.end - pieces[pi]!.start) / DIGEST_BLOCK);
      pi++;
    }
    const piece = pieces[pi]!;
    const start = piece.start + (k - blocksBefore) * DIGEST_BLOCK;
    const len = Math.min(DIGEST_BLOCK, piece.end - start);
    const t0 = performance.now();
    const block = await reader.read(start, len);
    const readSeconds = (performance.now() - t0) / 1000;
    // Each step timed twice, the faster kept: one timing on a shared machine also catches whatever
    // else ran at that moment (the same sample's sender rate moved by 20% between two invocations).
    const [sent, { packed, data }] = fastestOf(2, () => senderWork(block, codec, o.level));
    senderSeconds += readSeconds + sent;
    agentSeconds += fastestOf(2, () => agentWork(packed, data, codec, scratch))[0];
    verifySeconds += fastestOf(2, () => {
      // The read-back: the written block copied out of the page cache, scanned and hashed.
      block.copy(scratch, 0, 0, len);
      if (!isZero(scratch, 0, len)) createHash('sha256').update(scratch.subarray(0, len)).digest();
    })[0];
    ratios.push(packed.length / len);
    sampledRaw += len;
    sampledWire += packed.length;
    sampledData += data.length;
  }
  const mean = sampledRaw > 0 ? sampledWire / sampledRaw : 0;
  let half = 0;
  if (n > 1) {
    const variance = ratios.reduce((s, r) => s + (r - mean) ** 2, 0) / (n - 1);
    const fpc = totalBlocks > 1 ? Math.sqrt(Math.max(0, (totalBlocks - n) / (totalBlocks - 1))) : 0;
    half = t95(n - 1) * Math.sqrt(variance / n) * fpc;
  }
  const ratio: Interval = { mean, low: Math.max(0, mean - half), high: Math.min(1, mean + half) };
  const wireBytes: Interval = { mean: readBytes * ratio.mean, low: readBytes * ratio.low, high: readBytes * ratio.high };
  const writtenBytes = sampledRaw > 0 ? readBytes * (sampledData / sampledRaw) : 0;
  const rate = (seconds: number) => (seconds > 0 ? sampledRaw / seconds : Number.POSITIVE_INFINITY);
  const model: CostModel = {
    ...DEFAULT_COSTS,
    senderBytesPerSecond: rate(senderSeconds),
    agentBytesPerSecond: rate(agentSeconds),
    verifyBytesPerSecond: rate(verifySeconds),
    ...o.model,
  };
  const est: Estimate = {
    virtualSize: reader.virtualSize,
    allocatedBytes,
    readBytes,
    writtenBytes,
    codec,
    samples: n,
    sampledBytes: sampledRaw,
    ratio,
    wireBytes,
    requests: chunks + 2,
    cpuBytesPerSecond: model.senderBytesPerSecond,
    model,
    rtt,
    streams,
  };
  if (o.bandwidth) {
    const bw = o.bandwidth;
    const shape = { readBytes, writtenBytes, chunks, bandwidth: bw, rtt, streams };
    const at = (wire: number) => transferTime({ ...shape, wireBytes: wire }, model);
    const terms = at(wireBytes.mean);
    est.bandwidth = bw;
    est.seconds = { mean: terms.total, low: at(wireBytes.low).total, high: at(wireBytes.high).total };
    est.limitedBy = terms.limitedBy;
    est.terms = terms;
    est.verifySeconds = terms.verify;
    if (o.dirtyRate !== undefined)
      est.precopy = precopy(allocatedBytes, o.dirtyRate, bw / Math.max(ratio.mean, 1e-6), ratio.mean, o);
  } else if (o.dirtyRate !== undefined) {
    throw new UsageError('--dirty-rate needs --bandwidth');
  }
  return est;
}

/**
 * Pre-copy: round 0 copies the whole volume V; each later round copies what the guest dirtied
 * meanwhile, V*(D/R)^i. The VM pauses for the last round once it fits in maxDowntime; when
 * D >= R the rounds never shrink and the model says so.
 */
export function precopy(
  volume: number,
  dirtyRate: number,
  rate: number,
  wireRatio: number,
  o: EstimateOptions = {},
): PrecopyEstimate {
  const maxDowntime = o.maxDowntime ?? 0.3;
  const maxRounds = o.maxRounds ?? 30;
  const q = dirtyRate / rate;
  const rounds: PrecopyRound[] = [];
  let bytes = volume;
  for (let i = 0; i < maxRounds; i++) {
    rounds.push({ round: i, bytes, seconds: bytes / rate });
    if (i > 0 && bytes / rate <= maxDowntime) break;
    if (q >= 1 && i >= 1) break;
    bytes = volume * q ** (i + 1);
  }
  const converges = q < 1;
  const last = rounds[rounds.length - 1]!;
  const totalBytes = rounds.reduce((s, r) => s + r.bytes, 0);
  const note = converges
    ? last.seconds <= maxDowntime
      ? `converges: ${rounds.length - 1} pre-copy round(s), then a ${last.seconds.toFixed(3)} s stop-and-copy`
      : `converges too slowly: after ${maxRounds} rounds the stop-and-copy still takes ${last.seconds.toFixed(3)} s`
    : `does not converge: the guest dirties ${dirtyRate.toFixed(0)} B/s, faster than the link moves it (${rate.toFixed(0)} B/s of guest data); each round is at least as large as the last, so cut over cold or throttle the guest`;
  return {
    converges,
    dirtyToRate: q,
    rounds,
    totalBytes,
    totalWireBytes: totalBytes * wireRatio,
    totalSeconds: rounds.reduce((s, r) => s + r.seconds, 0),
    downtimeSeconds: last.seconds,
    note,
  };
}
