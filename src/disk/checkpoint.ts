/**
 * What every resumable writer's checkpoint shares: the temp file, its length at the checkpoint, a
 * digest of its last stable bytes (ties the state to this very file), and a seal over the whole
 * state (a state edited by hand or damaged on disk is refused instead of producing a broken image).
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { basename, dirname } from 'node:path';
import { nodeCrypto } from './builtins.js';
import { ioError, UsageError } from './errors.js';
import { AtomicFileSink, type ByteSink } from './sink.js';

/** Bytes before the checkpointed length that are digested. */
const SAMPLE = 4096;

export interface FileMark {
  tempPath: string;
  /** File length at the checkpoint; a resume cuts everything after it. */
  length: number;
  /** SHA-256 of [max(floor, length - SAMPLE), length). */
  sample: string;
}

function sampleDigest(fd: number, from: number, to: number): string {
  const buf = Buffer.alloc(Math.max(0, to - from));
  let got = 0;
  while (got < buf.length) {
    const n = readSync(fd, buf, got, buf.length - got, from + got);
    if (n === 0) break;
    got += n;
  }
  return nodeCrypto().createHash('sha256').update(buf.subarray(0, got)).digest('hex');
}

/**
 * Flushes `sink` and records where its file stands. `floor`: the sample never reaches below it,
 * because the writer may still rewrite what lies there (metadata written at finish); above it,
 * with ascending writes, nothing before the length changes after the checkpoint.
 */
export async function markFile(sink: ByteSink, floor: number, what: string): Promise<FileMark> {
  if (!(sink instanceof AtomicFileSink)) throw new UsageError(`this ${what} output cannot be checkpointed (a pipe)`, sink.name);
  await sink.sync();
  let fd: number | undefined;
  try {
    const length = fstatSync(sink.descriptor).size;
    fd = openSync(sink.tempPath, 'r');
    return { tempPath: sink.tempPath, length, sample: sampleDigest(fd, Math.max(floor, length - SAMPLE), length) };
  } catch (err) {
    throw ioError(err, sink.name);
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

function canonical(state: Record<string, unknown>): string {
  const { seal: _seal, ...rest } = state;
  return nodeCrypto().createHash('sha256').update(JSON.stringify(rest)).digest('hex');
}

/** The state with its seal added (JSON round trips keep key order, so the seal survives them). */
export function seal<T extends object>(state: T): T & { seal: string } {
  return { ...state, seal: canonical(state as Record<string, unknown>) };
}

/** The state as an object whose seal holds, or a UsageError naming `path`. */
export function unseal(state: unknown, what: string, path: string): Record<string, unknown> {
  if (typeof state !== 'object' || state === null || Array.isArray(state)) {
    throw new UsageError(`invalid ${what} checkpoint state`, path);
  }
  const s = state as Record<string, unknown>;
  if (typeof s.seal !== 'string' || s.seal !== canonical(s)) {
    throw new UsageError(`the ${what} checkpoint state was altered or damaged (its seal does not match)`, path);
  }
  return s;
}

/**
 * Checks, reading only, that the state names the output's own temp file, that the file is at
 * least as long as recorded, and that its sampled bytes are unchanged.
 */
export function verifyMarked(
  path: string,
  s: Record<string, unknown>,
  floor: number,
  what: string,
): { tempPath: string; length: number } {
  const { tempPath, length, sample } = s;
  if (typeof tempPath !== 'string' || !Number.isSafeInteger(length) || (length as number) < 0 || typeof sample !== 'string') {
    throw new UsageError(`invalid ${what} checkpoint state`, path);
  }
  // Only a temp file of this very output may be adopted (a state must not rename arbitrary files).
  if (dirname(tempPath) !== dirname(path) || !basename(tempPath).startsWith(`.${basename(path)}.vmferry-tmp-`)) {
    throw new UsageError(`the ${what} checkpoint names a file that is not this output's temp file`, path);
  }
  const len = length as number;
  let fd: number | undefined;
  let size: number;
  let digest: string;
  try {
    fd = openSync(tempPath, 'r');
    size = fstatSync(fd).size;
    digest = sampleDigest(fd, Math.max(floor, len - SAMPLE), Math.min(len, size));
  } catch (err) {
    throw new UsageError(`the checkpointed ${what} temp file cannot be opened (${ioError(err, tempPath).message})`, path);
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
  if (size < len) {
    throw new UsageError(`the checkpointed ${what} file is ${size} bytes, shorter than the ${len} recorded`, path);
  }
  if (digest !== sample) throw new UsageError(`the checkpointed ${what} file's content does not match its state`, path);
  return { tempPath, length: len };
}

/** verifyMarked, then takes the temp file over and cuts it back to the checkpointed length. */
export function adoptMarked(path: string, s: Record<string, unknown>, floor: number, what: string): AtomicFileSink {
  return new AtomicFileSink(path, verifyMarked(path, s, floor, what));
}
