/**
 * The chunk protocol between `vmferry send` and `vmferry serve`, over HTTPS (or loopback HTTP):
 *
 *   POST /v1/NAME/begin    JSON BeginRequest  -> BeginResponse (a new session; where to resume)
 *   PUT  /v1/NAME/chunk    binary chunk       -> ChunkResponse (applied in offset order)
 *   POST /v1/NAME/finish   JSON FinishRequest -> FinishResponse (both content digests)
 *   PUT  /v1/NAME/file     whole small file   -> FileResponse (descriptors, reports; header
 *                          x-vmferry-sha256 = SHA-256 of the body, x-vmferry-overwrite: 1 to replace)
 *
 * NAME (URL-encoded as one path segment) is a file under the agent's ROOT, or PREFIX/FILE under
 * ROOT/PREFIX (one folder level, made on first use: the per-VM folder of `migrate --out URL`).
 *
 * Every request carries `Authorization: Bearer TOKEN`. A chunk body is
 * [u32 BE meta length][meta JSON][payload]; the payload is the data runs, concatenated and
 * compressed as a whole with `codec`. The digest is SHA-256 over the chunk's binding
 * (session, start, end, pieces) and its uncompressed data, so a damaged, replayed or
 * re-addressed chunk never matches.
 */
import { createHash } from 'node:crypto';
import { deflateRawSync, inflateRawSync } from 'node:zlib';
import { compress as zstdCompress, decompress as zstdDecompress } from 'zstd-napi';

export type WireCodec = 'zstd' | 'zlib' | 'none';
export const WIRE_CODECS: readonly WireCodec[] = ['zstd', 'zlib', 'none'];
export const PROTOCOL_VERSION = 1;

/** Zero detection granularity on the sender: all-zero grains of a data piece are described, not sent. */
export const GRAIN = 4096;

/** One piece of a chunk: a zero range, or data with its runs ("d" sent, "z" zeros) as [kind, length] pairs. */
export type ChunkPiece = { z: [number, number] } | { d: [number, number]; runs: ['d' | 'z', number][] };

export interface ChunkMeta {
  session: string;
  start: number;
  end: number;
  codec: WireCodec;
  /** Uncompressed length of the payload (sum of the "d" runs). */
  rawLength: number;
  pieces: ChunkPiece[];
  digest: string;
}

export interface BeginRequest {
  version: number;
  /** Target format (a driver name) and its -o options. */
  format: string;
  options: Record<string, string>;
  virtualSize: number;
  /** Identifies the source and the transfer's parameters: a resume only continues the same transfer. */
  sourceKey: string;
  /** The source as the sender names it, for the audit log. */
  source: string;
  /** Replace an existing file of that name. */
  overwrite?: boolean;
}

export interface BeginResponse {
  session: string;
  /** Guest offset from which the sender continues (0 = from the start). */
  resumeAt: number;
  /** Alignment the sender cuts pieces on (a multiple of 1 MiB and of the writer's cluster size). */
  align: number;
  /** Largest data range per chunk. */
  maxChunk: number;
  /** Why the agent restarted from zero, when it had something for this name. */
  note?: string;
}

export interface ChunkResponse {
  /** Guest offset applied so far. */
  applied: number;
}

export interface FinishRequest {
  session: string;
  digest: string;
  /** Also return the SHA-256 of the written file (an OVF manifest needs it); costs a read of the file. */
  fileSha256?: boolean;
}

export interface FinishResponse {
  digest: string;
  match: boolean;
  path: string;
  bytesReceived: number;
  /** Absolute folder on the agent holding the file (ROOT or ROOT/PREFIX): descriptors name disks there. */
  dir?: string;
  /** Bytes of the written (main) file. */
  fileSize?: number;
  /** SHA-256 of the written file, when asked for. */
  fileSha256?: string;
}

export interface FileResponse {
  path: string;
  /** Absolute folder on the agent holding the file. */
  dir: string;
  bytes: number;
  sha256: string;
}

export interface ErrorBody {
  error: string;
  /** The sender may re-send this request as it is (damaged in transit). */
  retry?: boolean;
}

export function chunkDigest(meta: Omit<ChunkMeta, 'digest' | 'codec' | 'rawLength'>, data: Buffer): string {
  const h = createHash('sha256');
  h.update(JSON.stringify([meta.session, meta.start, meta.end, meta.pieces]));
  h.update(data);
  return h.digest('hex');
}

/** Pure: data -> wire bytes. */
export function packPayload(codec: WireCodec, data: Buffer, level?: number): Buffer {
  if (data.length === 0) return data;
  if (codec === 'zstd') return zstdCompress(data, level === undefined ? undefined : { compressionLevel: level });
  if (codec === 'zlib') return deflateRawSync(data, { level: level ?? 1 });
  return data;
}

/** Inverse of packPayload; refuses output beyond `maxLength` (a decompression bomb). */
export function unpackPayload(codec: WireCodec, packed: Buffer, maxLength: number): Buffer {
  if (packed.length === 0) return packed;
  if (codec === 'zstd') {
    const declared = zstdContentSize(packed);
    if (declared === null || declared > maxLength)
      throw new Error('zstd frame without a content size within the declared length');
    const out = zstdDecompress(packed);
    if (out.length > maxLength) throw new Error('payload expands beyond its declared length');
    return out;
  }
  if (codec === 'zlib') return inflateRawSync(packed, { maxOutputLength: Math.max(1, maxLength) });
  return packed;
}

/** The content size a zstd frame header declares (null when absent or not a zstd frame). */
export function zstdContentSize(frame: Buffer): number | null {
  if (frame.length < 6 || frame.readUInt32LE(0) !== 0xfd2fb528) return null;
  const fhd = frame[4]!;
  const fcsFlag = fhd >> 6;
  const single = (fhd >> 5) & 1;
  const dictBytes = [0, 1, 2, 4][fhd & 3]!;
  const fcsBytes = [single ? 1 : 0, 2, 4, 8][fcsFlag]!;
  if (fcsBytes === 0) return null;
  const at = 5 + (single ? 0 : 1) + dictBytes;
  if (frame.length < at + fcsBytes) return null;
  if (fcsBytes === 1) return frame[at]!;
  if (fcsBytes === 2) return frame.readUInt16LE(at) + 256;
  if (fcsBytes === 4) return frame.readUInt32LE(at);
  return Number(frame.readBigUInt64LE(at));
}

export function encodeChunk(meta: ChunkMeta, payload: Buffer): Buffer[] {
  const m = Buffer.from(JSON.stringify(meta));
  const len = Buffer.alloc(4);
  len.writeUInt32BE(m.length);
  return [len, m, payload];
}

export const MAX_META_BYTES = 4 * 1024 * 1024;

export function decodeChunk(body: Buffer): { meta: ChunkMeta; payload: Buffer } {
  if (body.length < 4) throw new Error(`truncated chunk (${body.length} bytes)`);
  const n = body.readUInt32BE(0);
  if (n > MAX_META_BYTES || 4 + n > body.length)
    throw new Error(`truncated chunk (header of ${n} bytes, body of ${body.length})`);
  const meta = JSON.parse(body.subarray(4, 4 + n).toString('utf8')) as ChunkMeta;
  return { meta, payload: body.subarray(4 + n) };
}
