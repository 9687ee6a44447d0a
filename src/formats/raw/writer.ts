import { UsageError } from '../../disk/errors.js';
import { checkKnownOptions } from '../../disk/options.js';
import { AtomicFileSink, type ByteSink, openSink } from '../../disk/sink.js';
import type { CreateOptions, DiskWriter } from '../../disk/types.js';

export const RAW_CREATE_OPTIONS = ['preallocation'] as const;

/** What checkpoint() returns: the temp file and how much of it is valid. */
interface RawCheckpoint {
  tempPath: string;
  length: number;
}

/** Writes a raw image; zero ranges stay holes (never written), so the result is sparse. */
export class RawWriter implements DiskWriter {
  readonly clusterSize = 4096;
  readonly sequentialOnly: boolean;
  /** End of the furthest byte written so far. */
  private end = 0;
  private constructor(
    private readonly sink: ByteSink,
    readonly virtualSize: number,
    private readonly preallocateFull: boolean,
  ) {
    this.sequentialOnly = sink.sequential;
  }

  static async create(path: string, virtualSize: number, options: CreateOptions): Promise<RawWriter> {
    checkKnownOptions('raw', options.options, RAW_CREATE_OPTIONS);
    const prealloc = options.options.preallocation ?? 'off';
    if (prealloc !== 'off' && prealloc !== 'full') {
      throw new UsageError(`Invalid preallocation mode '${prealloc}' for raw (use off or full)`);
    }
    return new RawWriter(openSink(path), virtualSize, prealloc === 'full');
  }

  /** Continues a file checkpointed by checkpoint(); anything written after it is cut off. */
  static async resume(path: string, virtualSize: number, options: CreateOptions, state: unknown): Promise<RawWriter> {
    checkKnownOptions('raw', options.options, RAW_CREATE_OPTIONS);
    const s = state as Partial<RawCheckpoint> | null;
    if (!s || typeof s.tempPath !== 'string' || !Number.isSafeInteger(s.length) || s.length! < 0 || s.length! > virtualSize) {
      throw new UsageError('invalid raw checkpoint state', path);
    }
    const writer = new RawWriter(
      new AtomicFileSink(path, { tempPath: s.tempPath, length: s.length! }),
      virtualSize,
      options.options.preallocation === 'full',
    );
    writer.end = s.length!;
    return writer;
  }

  async checkpoint(): Promise<RawCheckpoint> {
    if (!(this.sink instanceof AtomicFileSink)) throw new UsageError('a pipe cannot be checkpointed', this.sink.name);
    await this.sink.sync();
    return { tempPath: this.sink.tempPath, length: this.end };
  }

  async write(offset: number, data: Buffer): Promise<void> {
    await this.sink.write(data, offset);
    this.end = Math.max(this.end, offset + data.length);
  }

  async zero(offset: number, length: number): Promise<void> {
    if (this.preallocateFull) await this.writeZeros(offset, length);
  }

  private async writeZeros(offset: number, length: number): Promise<void> {
    const block = Buffer.alloc(Math.min(length, 1 << 20));
    for (let pos = offset; pos < offset + length; pos += block.length) {
      await this.sink.write(block.subarray(0, Math.min(block.length, offset + length - pos)), pos);
    }
    this.end = Math.max(this.end, offset + length);
  }

  async finish(): Promise<void> {
    await this.sink.setLength(this.virtualSize);
    await this.sink.commit();
  }

  async abort(): Promise<void> {
    await this.sink.abort();
  }
}
