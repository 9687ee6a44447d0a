/**
 * The VHDX log (metadata journal): when a header names a log GUID, the active log sequence is
 * replayed IN MEMORY as an overlay over the file's bytes. The source file is never written.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../disk/errors.js';
import type { ByteSource } from '../../disk/source.js';
import { decodeLogEntryHeader, LOG_SECTOR, type LogEntryHeader, logEntryChecksumOk, type VhdxHeader } from './layout.js';

/** One replayed write: `data` (4 KiB) or zeros over `length` bytes at `offset` of the file. */
export interface LogPatch {
  offset: number;
  length: number;
  data: Buffer | null;
}

/** A source whose reads see the replayed log writes on top of the file (later patches win). */
export class OverlaySource implements ByteSource {
  readonly name: string;
  constructor(
    private readonly inner: ByteSource,
    private readonly patches: LogPatch[],
    readonly size: number,
  ) {
    this.name = inner.name;
  }

  async read(position: number, length: number, into?: Buffer): Promise<Buffer> {
    const buf = await this.inner.read(position, length, into);
    const end = position + length;
    for (const p of this.patches) {
      const s = Math.max(p.offset, position);
      const e = Math.min(p.offset + p.length, end);
      if (e <= s) continue;
      if (p.data) p.data.copy(buf, s - position, s - p.offset, e - p.offset);
      else buf.fill(0, s - position, e - position);
    }
    return buf;
  }

  async close(): Promise<void> {
    await this.inner.close();
  }
}

interface ParsedEntry {
  pos: number;
  header: LogEntryHeader;
  bytes: Buffer;
}

/**
 * Finds the active log sequence (the valid one with the highest sequence number whose last
 * entry's tail points at its first entry) and turns its descriptors into patches.
 * Returns the patches and the file size the log says the file must have.
 */
export async function replayLog(
  source: ByteSource,
  header: VhdxHeader,
  budget: number,
): Promise<{ patches: LogPatch[]; size: number; entries: number }> {
  const file = source.name;
  const length = header.logLength;
  if (length > budget) {
    throw new UnsupportedFeatureError(
      `the log to replay is ${length} bytes, more than the metadata memory budget (${budget} bytes)`,
      file,
    );
  }
  const log = await source.read(header.logOffset, length);
  const sectors = length / LOG_SECTOR;
  // Reads `n` bytes of the circular log starting at `pos`.
  const circular = (pos: number, n: number): Buffer => {
    if (pos + n <= length) return log.subarray(pos, pos + n);
    const out = Buffer.allocUnsafe(n);
    const first = length - pos;
    log.copy(out, 0, pos, length);
    log.copy(out, first, 0, n - first);
    return out;
  };
  const entryAt = new Map<number, ParsedEntry | null>();
  const parse = (pos: number): ParsedEntry | null => {
    if (entryAt.has(pos)) return entryAt.get(pos)!;
    let result: ParsedEntry | null = null;
    const h = decodeLogEntryHeader(log.subarray(pos, pos + LOG_SECTOR), length);
    if (h && h.logGuid === header.logGuid) {
      const bytes = circular(pos, h.entryLength);
      if (logEntryChecksumOk(bytes)) result = { pos, header: h, bytes };
    }
    entryAt.set(pos, result);
    return result;
  };

  let best: ParsedEntry[] | null = null;
  for (let s = 0; s < sectors; s++) {
    const first = parse(s * LOG_SECTOR);
    if (!first) continue;
    const chain = [first];
    let used = first.header.entryLength;
    let candidate: ParsedEntry[] | null = first.header.tail === first.pos ? [first] : null;
    for (;;) {
      const last = chain[chain.length - 1]!;
      const nextPos = (last.pos + last.header.entryLength) % length;
      const next = parse(nextPos);
      if (!next || next.header.sequence !== last.header.sequence + 1n || used + next.header.entryLength > length) break;
      chain.push(next);
      used += next.header.entryLength;
      if (next.header.tail === first.pos) candidate = [...chain];
    }
    if (!candidate) continue;
    const lastSeq = candidate[candidate.length - 1]!.header.sequence;
    if (!best || lastSeq > best[best.length - 1]!.header.sequence) best = candidate;
  }

  const patches: LogPatch[] = [];
  let size = source.size;
  if (!best) return { patches, size, entries: 0 };
  for (const entry of best) {
    const { header: h, bytes } = entry;
    const bad = (why: string) => new CorruptImageError(`log entry ${h.sequence} at log offset ${entry.pos} ${why}`, file);
    const descArea = Math.ceil((64 + h.descriptorCount * 32) / LOG_SECTOR) * LOG_SECTOR;
    let dataIndex = 0;
    for (let i = 0; i < h.descriptorCount; i++) {
      const d = bytes.subarray(64 + i * 32, 96 + i * 32);
      const sig = d.toString('latin1', 0, 4);
      const fileOffset = Number(d.readBigUInt64LE(16));
      if (d.readBigUInt64LE(24) !== h.sequence) throw bad(`descriptor ${i} belongs to another sequence`);
      if (!Number.isSafeInteger(fileOffset) || fileOffset % LOG_SECTOR !== 0)
        throw bad(`descriptor ${i} has an unaligned file offset`);
      if (sig === 'zero') {
        const zeroLength = Number(d.readBigUInt64LE(8));
        if (
          !Number.isSafeInteger(zeroLength) ||
          zeroLength % LOG_SECTOR !== 0 ||
          !Number.isSafeInteger(fileOffset + zeroLength)
        ) {
          throw bad(`zero descriptor ${i} has a bad length`);
        }
        patches.push({ offset: fileOffset, length: zeroLength, data: null });
        size = Math.max(size, fileOffset + zeroLength);
      } else if (sig === 'desc') {
        const at = descArea + dataIndex * LOG_SECTOR;
        if (at + LOG_SECTOR > h.entryLength) throw bad(`has more data descriptors than data sectors`);
        const sector = bytes.subarray(at, at + LOG_SECTOR);
        if (sector.toString('latin1', 0, 4) !== 'data') throw bad(`data sector ${dataIndex} has no 'data' signature`);
        const seq = (BigInt(sector.readUInt32LE(4)) << 32n) | BigInt(sector.readUInt32LE(4092));
        if (seq !== h.sequence) throw bad(`data sector ${dataIndex} belongs to another sequence`);
        const data = Buffer.alloc(LOG_SECTOR);
        d.copy(data, 0, 8, 16); // leading 8 bytes
        sector.copy(data, 8, 8, 4092);
        d.copy(data, 4092, 4, 8); // trailing 4 bytes
        patches.push({ offset: fileOffset, length: LOG_SECTOR, data });
        size = Math.max(size, fileOffset + LOG_SECTOR);
        dataIndex++;
      } else {
        throw bad(`descriptor ${i} has an unknown signature '${sig}'`);
      }
    }
    const flushed = h.flushedFileOffset;
    if (flushed <= BigInt(Number.MAX_SAFE_INTEGER)) size = Math.max(size, Number(flushed));
  }
  return { patches, size, entries: best.length };
}
