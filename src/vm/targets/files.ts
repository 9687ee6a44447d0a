/** Writing a target's descriptor files: all appear together (temp names, then renames) or none do. */
import { chmodSync } from 'node:fs';
import { join } from 'node:path';
import { ioError, UsageError } from '../../disk/errors.js';
import { AtomicFileSink, commitAll } from '../../disk/sink.js';
import type { TargetDisk } from '../dialect.js';
import type { VmModel } from '../model.js';

export interface OutputFile {
  name: string;
  content: string | Buffer;
  /** Executable scripts get 0755. */
  executable?: boolean;
}

export async function writeOutputs(outDir: string, files: OutputFile[]): Promise<string[]> {
  const sinks: AtomicFileSink[] = [];
  try {
    for (const f of files) {
      const sink = new AtomicFileSink(join(outDir, f.name));
      sinks.push(sink);
      await sink.write(Buffer.isBuffer(f.content) ? f.content : Buffer.from(f.content, 'utf8'), 0);
      if (f.executable) {
        try {
          chmodSync(sink.tempPath, 0o755);
        } catch (err) {
          throw ioError(err, sink.name);
        }
      }
    }
    await commitAll(sinks);
  } catch (err) {
    for (const s of sinks) await s.abort();
    throw err;
  }
  return files.map((f) => f.name);
}

/** The converted disk for model.disks[i]; a missing one is the caller's mistake. */
export function diskFor(disks: TargetDisk[], index: number, outDir: string): TargetDisk {
  const d = disks.find((x) => x.index === index);
  if (!d) throw new UsageError(`no converted disk was given for disk ${index}`, outDir);
  return d;
}

/** The model's disks in boot order (lowest bootOrder first, then source order), with their index. */
export function disksInBootOrder(model: VmModel): { index: number; disk: VmModel['disks'][number] }[] {
  return model.disks
    .map((disk, index) => ({ index, disk }))
    .sort((a, b) => (a.disk.bootOrder ?? 1e9) - (b.disk.bootOrder ?? 1e9) || a.index - b.index);
}

/** Single-quotes a string for POSIX sh. */
export function shQuote(s: string): string {
  return /^[A-Za-z0-9_./:=,@%+-]+$/.test(s) ? s : `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Single-quotes a string for PowerShell. */
export function psQuote(s: string): string {
  return `'${s.replace(/'/g, "''")}'`;
}

/** MiB, rounded up. */
export function mib(bytes: number): number {
  return Math.ceil(bytes / (1024 * 1024));
}
