import { UsageError } from '../../disk/errors.js';
import { checkKnownOptions } from '../../disk/options.js';
import { type ByteSink, openSink } from '../../disk/sink.js';
import type { CreateOptions, DiskWriter } from '../../disk/types.js';

export const RAW_CREATE_OPTIONS = ['preallocation'] as const;

/** Writes a raw image; zero ranges stay holes (never written), so the result is sparse. */
export class RawWriter implements DiskWriter {
  readonly clusterSize = 4096;
  readonly sequentialOnly: boolean;
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

  async write(offset: number, data: Buffer): Promise<void> {
    await this.sink.write(data, offset);
  }

  async zero(offset: number, length: number): Promise<void> {
    if (this.preallocateFull) await this.writeZeros(offset, length);
  }

  private async writeZeros(offset: number, length: number): Promise<void> {
    const block = Buffer.alloc(Math.min(length, 1 << 20));
    for (let pos = offset; pos < offset + length; pos += block.length) {
      await this.sink.write(block.subarray(0, Math.min(block.length, offset + length - pos)), pos);
    }
  }

  async finish(): Promise<void> {
    await this.sink.setLength(this.virtualSize);
    await this.sink.commit();
  }

  async abort(): Promise<void> {
    await this.sink.abort();
  }
}
