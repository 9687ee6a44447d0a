/** The disk plane's vocabulary: every format, file and network source speaks these interfaces. */

/** unallocated = not stored in this layer: falls through to a backing file, or reads as zero. */
export type ExtentKind = 'data' | 'zero' | 'unallocated';

export interface Extent {
  offset: number;
  length: number;
  kind: ExtentKind;
}

export interface SnapshotInfo {
  id: string;
  name: string;
  vmStateSize: number;
  dateSec: number;
  dateNsec: number;
  vmClockNsec: number;
  icount?: number;
}

/** What `info` shows beyond virtual size; field meanings follow qemu-img info. */
export interface FormatDetails {
  clusterSize?: number;
  /** The reference exactly as stored in the image. */
  backingFilename?: string;
  /** Where that reference resolved to (absolute path). */
  fullBackingFilename?: string;
  backingFormat?: string;
  dirtyFlag?: boolean;
  encrypted?: boolean;
  snapshots?: SnapshotInfo[];
  /** qemu-img's "format-specific" object: { type, data }. */
  formatSpecific?: { type: string; data: Record<string, unknown> };
  /** Files the image is made of besides the one opened (extents, data files). */
  extraFiles?: string[];
}

export interface DiskReader {
  readonly format: string;
  /** The path the user named. */
  readonly filename: string;
  /** Guest-visible size in bytes. */
  readonly virtualSize: number;
  /** The image this one falls through to, when it has one. */
  readonly backing?: DiskReader;
  readonly details: FormatDetails;
  /**
   * This layer's allocation, ascending, merged, covering [from, to) exactly.
   * 'unallocated' ranges read from `backing` (or as zeros when there is none).
   */
  extents(from?: number, to?: number): AsyncIterable<Extent>;
  /** Guest-visible content, backing chain merged in; reads past the end are an error. */
  read(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  /**
   * Optional: read() without decoding compressed units, so the caller can decode them on worker
   * threads. Fills `into` (length bytes) except the ranges of the returned units (ascending).
   * `memory(bytes)`, when given, supplies the memory packed bytes are read into (the caller's to
   * reuse once it is done with the units); otherwise the reader allocates its own.
   */
  readPacked?(offset: number, length: number, into: Buffer, memory?: (bytes: number) => Buffer): Promise<PackedUnit[]>;
  close(): Promise<void>;
}

/** inflate: zlib stream (VMDK grains); inflate-raw: raw deflate (qcow2); zstd: one zstd frame (qcow2). */
export type PackedCodec = 'inflate' | 'inflate-raw' | 'zstd';

/** A compressed unit of guest data as stored, handed over undecoded by DiskReader.readPacked. */
export interface PackedUnit {
  /** Guest bytes [offset, offset + length) come from this unit's decoded bytes [skip, skip + length). */
  offset: number;
  length: number;
  skip: number;
  codec: PackedCodec;
  packed: Buffer;
  /** Decoded size of the unit: more output is an error for inflate and cut off for zstd. */
  size: number;
  /** Shortest decoded output accepted; from there up to `size` it reads as zeros. */
  minSize: number;
  /** `packed` lies in memory nothing else uses: the caller may move it to another thread. */
  movable?: boolean;
  /** The error to raise when the unit fails to decode (the codec's message) or decodes too short. */
  corrupt(problem: { reason: string } | { decoded: number }): Error;
}

/** A compression codec the copy pipeline can run on worker threads for a writer. */
export interface CodecSpec {
  /** deflate-raw: qcow2's zlib clusters; zlib: VMDK grains; zstd: qcow2's zstd clusters. */
  codec: 'deflate-raw' | 'zlib' | 'zstd';
  /**
   * A unit that looks incompressible (compress-worker.ts) comes back empty, meaning "store it raw",
   * instead of as a zstd frame, which is never empty: for writers that store a unit raw when its
   * packed form does not shrink below it, as qcow2 does; a zstd frame of such data is a little
   * larger than the data, so only the time spent on it changes.
   */
  passIncompressible?: boolean;
  level?: number;
  windowBits?: number;
  memLevel?: number;
}

/** One unit the pipeline compressed for a writer. */
export interface CompressedUnit {
  /** Guest offset of the unit (a multiple of the writer's clusterSize). */
  offset: number;
  /** The unit's bytes as read (for writers that store a unit raw when it does not shrink). */
  raw: Buffer;
  /** `raw` compressed with the writer's codec; empty for a unit passed on as incompressible. */
  packed: Buffer;
}

export interface DiskWriter {
  /** Only ascending writes are possible (streamOptimized VMDK, pipes). */
  readonly sequentialOnly: boolean;
  /** Allocation granularity: the pipeline detects zeros per unit of this size. */
  readonly clusterSize: number;
  readonly virtualSize: number;
  /** `data` belongs to the caller again once the promise resolves: copy what you keep. */
  write(offset: number, data: Buffer): Promise<void>;
  /**
   * Set by writers that compress: the pipeline then compresses every non-zero unit of
   * `clusterSize` bytes on worker threads and calls writeCompressed, in ascending order, instead of write.
   */
  readonly compression?: CodecSpec;
  /** Units compressed with `compression`; the buffers belong to the caller again once the promise resolves. */
  writeCompressed?(units: CompressedUnit[]): Promise<void>;
  /** The range reads as zero (on a new image without backing this is usually free). */
  zero(offset: number, length: number): Promise<void>;
  /** Metadata, footers, fsync, then rename into place. */
  finish(): Promise<void>;
  /** Removes everything written so far. Safe to call more than once. */
  abort(): Promise<void>;
  /**
   * Optional resume support: flushes everything written so far to stable storage and returns a
   * JSON-serialisable state from which FormatDriver.resume can reopen the half-written output
   * and continue after the last write (used by resumable network transfers).
   */
  checkpoint?(): Promise<unknown>;
}

/** Options that govern how an image and the files it names are opened. */
export interface OpenOptions {
  /** Let references leave the image's folder (never to a device node or FIFO). */
  allowExternalFiles?: boolean;
  /** Override the image's own backing reference (qemu-img -B on read). */
  backingFile?: string;
  backingFormat?: string;
  /** Open a qcow2 internal snapshot (by id or name) instead of the active layer. */
  snapshot?: string;
  /** Budget for cached metadata tables, bytes. */
  maxMetadataMemory?: number;
  /** Ignore a VMDK CID/parentCID mismatch. */
  ignoreParentId?: boolean;
  /** Do not open backing files (info on a single layer). */
  noBacking?: boolean;
  /** Opens a child image (backing file, parent); provided by the registry to avoid import cycles. */
  openChild?: (path: string, format: string | undefined, options: OpenOptions) => Promise<DiskReader>;
  /** How deep the chain already is, to stop loops. */
  depth?: number;
}

export const DEFAULT_MAX_METADATA_MEMORY = 64 * 1024 * 1024;
export const MAX_CHAIN_DEPTH = 64;

export interface CreateOptions {
  /** -o key=value pairs, keys as qemu-img names them. */
  options: Record<string, string>;
  /** -c: compress data clusters where the format can. */
  compress?: boolean;
  /** For the pipeline's choice of order; writers may ignore. */
  sourceAllocatedBytes?: number;
}

export interface CheckResult {
  format: string;
  filename: string;
  checkErrors: number;
  corruptions: number;
  leaks: number;
  corruptionsFixed?: number;
  leaksFixed?: number;
  imageEndOffset?: number;
  totalClusters?: number;
  allocatedClusters?: number;
  fragmentedClusters?: number;
  compressedClusters?: number;
  /** One line per problem found, for the human output. */
  messages: string[];
}

export interface MeasureResult {
  required: number;
  fullyAllocated: number;
  bitmaps?: number;
}

export interface FormatDriver {
  /** The name qemu-img uses (raw, qcow2, vmdk, vpc, vhdx, vdi). */
  readonly name: string;
  /** Other names accepted with -f/-O (e.g. vhd for vpc). */
  readonly aliases?: readonly string[];
  /**
   * Confidence 0..100 that the content is this format. `head` is the first 64 KiB (or less),
   * `tail` the last 64 KiB; `size` the file size.
   */
  probe(head: Buffer, tail: Buffer, size: number): number;
  open(path: string, options: OpenOptions): Promise<DiskReader>;
  create?(path: string, virtualSize: number, options: CreateOptions): Promise<DiskWriter>;
  /** Options create() understands, for help text and for refusing unknown ones. */
  readonly createOptions?: readonly string[];
  check?(path: string, options: OpenOptions & { repair?: 'leaks' | 'all' }): Promise<CheckResult>;
  /** Size a conversion of `source` would need in this format. */
  measure?(source: DiskReader, virtualSize: number, options: CreateOptions): Promise<MeasureResult>;
  /**
   * Reopens an output left half-written (its temp file) from a writer's checkpoint() state,
   * truncating it to the checkpointed length; writing continues after the checkpointed offset.
   */
  resume?(path: string, virtualSize: number, options: CreateOptions, state: unknown): Promise<DiskWriter>;
}
