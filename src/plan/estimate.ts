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
import { GRAIN, packPayload, type WireCodec } from '../transfer/protocol.js';

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

export interface Estimate {
  virtualSize: number;
  /** Guest bytes in data extents (backing chain included). */
  allocatedBytes: number;
  /** What the sender reads: data extents widened to 1 MiB blocks. */
  readBytes: number;
  codec: WireCodec;
  samples: number;
  sampledBytes: number;
  /** Wire bytes per allocated byte (zero grains dropped, then compressed), 95% interval. */
  ratio: Interval;
  wireBytes: Interval;
  /** Chunks the sender will send. */
  requests: number;
  /** Sender-side processing speed measured on the sample (digest, zero scan, compression), bytes/s. */
  cpuBytesPerSecond: number;
  bandwidth?: number;
  rtt: number;
  seconds?: Interval;
  limitedBy?: 'network' | 'cpu';
  /** The final read-back and digest on the agent (reading is counted at hashing speed twice). */
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

/** Two-sided 95% Student t quantile for `df` degrees of freedom (normal beyond 30). */
function t95(df: number): number {
  const table = [
    12.71, 4.3, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.2, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11, 2.1, 2.09, 2.09,
  ];
  if (df <= 0) return Number.POSITIVE_INFINITY;
  if (df <= table.length) return table[df - 1]!;
  return df < 30 ? 2.05 : 1.96;
}

/** Bytes a sender would put on the wire for one block: non-zero grains, compressed. */
function wireSize(block: Buffer, codec: WireCodec, level?: number): number {
  const parts: Buffer[] = [];
  for (let s = 0; s < block.length; s += GRAIN) {
    const e = Math.min(block.length, s + GRAIN);
    if (!isZero(block, s, e)) parts.push(block.subarray(s, e));
  }
  const data = Buffer.concat(parts);
  if (data.length === 0) return 0;
  const packed = packPayload(codec, data, level);
  return Math.min(packed.length, data.length);
}

export async function estimateTransfer(reader: DiskReader, o: EstimateOptions = {}): Promise<Estimate> {
  const codec = o.codec ?? 'zstd';
  const rtt = o.rtt ?? 0;
  const streams = o.streams ?? 4;
  // The extent map, as the sender walks it.
  const pieces: { start: number; end: number }[] = [];
  let readBytes = 0;
  for await (const p of blockPieces(reader, DIGEST_BLOCK, CHUNK)) {
    if (p.kind !== 'data') continue;
    pieces.push({ start: p.start, end: p.end });
    readBytes += p.end - p.start;
  }
  let allocatedBytes = 0;
  const { flatExtents } = await import('../disk/chain.js');
  for await (const e of flatExtents(reader)) if (e.kind === 'data') allocatedBytes += e.length;

  // A stratified sample of 1 MiB blocks spread evenly over the data.
  const totalBlocks = pieces.reduce((n, p) => n + Math.ceil((p.end - p.start) / DIGEST_BLOCK), 0);
  const n = Math.min(totalBlocks, Math.max(1, o.samples ?? 48));
  const ratios: number[] = [];
  let sampledRaw = 0;
  let sampledWire = 0;
  let cpuSeconds = 0;
  let hashSeconds = 0;
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
    const block = await reader.read(start, len);
    const t0 = performance.now();
    // The sender hashes each block twice (content digest, chunk digest) and compresses it.
    createHash('sha256').update(block).digest();
    const t1 = performance.now();
    createHash('sha256').update(block).digest();
    hashSeconds += (performance.now() - t1) / 1000;
    const w = wireSize(block, codec, o.level);
    cpuSeconds += (performance.now() - t0) / 1000;
    ratios.push(w / len);
    sampledRaw += len;
    sampledWire += w;
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
  const requests = Math.ceil(readBytes / CHUNK) + 2;
  const cpuBytesPerSecond = cpuSeconds > 0 ? sampledRaw / cpuSeconds : Number.POSITIVE_INFINITY;
  const est: Estimate = {
    virtualSize: reader.virtualSize,
    allocatedBytes,
    readBytes,
    codec,
    samples: n,
    sampledBytes: sampledRaw,
    ratio,
    wireBytes,
    requests,
    cpuBytesPerSecond,
    rtt,
  };
  if (o.bandwidth) {
    const bw = o.bandwidth;
    const cpu = readBytes / cpuBytesPerSecond;
    // Requests overlap over the streams: latency costs one round trip per `streams` chunks, plus begin and finish.
    const latency = (Math.ceil(requests / streams) + 2) * rtt;
    // At the end the agent reads the finished image back and hashes it before answering.
    const verify = hashSeconds > 0 ? readBytes * (hashSeconds / sampledRaw) * 2 : 0;
    const time = (wire: number) => Math.max(wire / bw + latency, cpu) + verify;
    est.bandwidth = bw;
    est.seconds = { mean: time(wireBytes.mean), low: time(wireBytes.low), high: time(wireBytes.high) };
    est.limitedBy = wireBytes.mean / bw + latency >= cpu ? 'network' : 'cpu';
    est.verifySeconds = verify;
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
