import { type ParseArgsConfig, parseArgs } from 'node:util';
import { UsageError, VmferryError } from '../disk/errors.js';
import { parseOptionString } from '../disk/options.js';

export type OptionSpec = NonNullable<ParseArgsConfig['options']>;

/** Options every image-opening command takes. */
export const openingOptions = {
  'allow-external-files': { type: 'boolean' },
  'max-metadata-memory': { type: 'string' },
  'ignore-parent-id': { type: 'boolean' },
  debug: { type: 'boolean' },
} as const satisfies OptionSpec;

export const outputOption = { output: { type: 'string', default: 'human' } } as const satisfies OptionSpec;

/** -f, -O and -o, as every command that reads one format and writes another names them. */
export const conversionOptions = {
  format: { type: 'string', short: 'f' },
  'target-format': { type: 'string', short: 'O' },
  options: { type: 'string', short: 'o', multiple: true },
} as const satisfies OptionSpec;

/** The checks migrate and migrate --warm share: --to and --out given, --force-firmware well formed. */
export function checkMigrateOptions<T extends { to?: string; out?: string; 'force-firmware'?: string }>(
  values: T,
  usage: string,
): asserts values is T & { to: string; out: string; 'force-firmware'?: 'bios' | 'uefi' } {
  if (!values.to) throw new UsageError(`--to is required; usage: ${usage}`);
  if (!values.out) throw new UsageError(`--out is required; usage: ${usage}`);
  const force = values['force-firmware'];
  if (force !== undefined && force !== 'bios' && force !== 'uefi') {
    throw new UsageError(`--force-firmware must be bios or uefi, not '${force}'`);
  }
}

/** util.parseArgs with its errors turned into one-line usage errors. */
type Parsed<T extends OptionSpec> = ReturnType<
  typeof parseArgs<{ args: string[]; options: T; allowPositionals: true; strict: true }>
>;

export function parse<T extends OptionSpec>(args: string[], options: T, usage: string): Parsed<T> {
  try {
    return parseArgs({ args, options, allowPositionals: true, strict: true });
  } catch (err) {
    const message = (err as Error).message.replace(/\. To specify a positional argument.*$/s, '');
    throw new UsageError(`${message}; usage: ${usage}`);
  }
}

export function outputMode(value: string | undefined): 'human' | 'json' {
  if (value === undefined || value === 'human') return 'human';
  if (value === 'json') return 'json';
  throw new UsageError(`--output must be human or json, not '${value}'`);
}

/** Merges every -o given (later ones win), qemu-img style. */
export function mergeOptionStrings(values: string[] | undefined): Record<string, string> {
  const out: Record<string, string> = {};
  for (const v of values ?? []) parseOptionString(v, out);
  return out;
}

export function positionals(list: string[], count: number, usage: string, names: string[]): string[] {
  if (list.length < count) throw new UsageError(`Expecting ${names.slice(list.length).join(' and ')}; usage: ${usage}`);
  if (list.length > count) throw new UsageError(`Unexpected argument '${list[count]}'; usage: ${usage}`);
  return list;
}

let stdoutGuarded = false;

/**
 * process.stdout, for everything a command prints. Node creates the stream, and loads its stream
 * modules (about 4 ms), on first use, so a command that prints nothing (convert) never pays for it.
 */
export function stdout(): NodeJS.WriteStream {
  if (!stdoutGuarded) {
    stdoutGuarded = true;
    // A reader that stops early (vmferry map | head) is not an error.
    process.stdout.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EPIPE') process.exit(0);
      throw err;
    });
  }
  return process.stdout;
}

export function printJson(value: unknown): void {
  stdout().write(`${JSON.stringify(value, null, 4)}\n`);
}

/** The single line a user sees for an error. */
export function errorLine(err: unknown): string {
  if (err instanceof VmferryError) return `vmferry: ${err.describe()}`;
  const e = err as NodeJS.ErrnoException;
  return `vmferry: internal error: ${e?.message ?? String(err)} (run with --debug for details)`;
}

/** qemu-img's human sizes: "512 MiB", "9.77 MiB", "196 KiB". */
export function humanSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : Number(v.toPrecision(3))} ${units[i]}`;
}
