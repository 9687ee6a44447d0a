import { UsageError } from '../disk/errors.js';
import { type MigrateProgress, migrateVm } from '../migrate/migrate.js';
import { isRemoteOut } from '../migrate/remote.js';
import { humanSummary } from '../migrate/report.js';
import { parseRate } from '../plan/estimate.js';
import { WIRE_CODECS, type WireCodec } from '../transfer/protocol.js';
import { readToken } from '../transfer/security.js';
import { targetWriters } from '../vm/registry.js';
import {
  checkMigrateOptions,
  mergeOptionStrings,
  openingOptions,
  outputMode,
  outputOption,
  parse,
  positionals,
  printJson,
  stdout,
} from './common.js';
import { readOptionsFrom, vmSourceOptions } from './inspect.js';
import { warmMigrateCommand } from './migrate-warm.js';
import { progressReporter } from './progress.js';

export const usage = `vmferry migrate SOURCE --to ${targetWriters.map((w) => w.profile.target).join('|')} --out DIR|https://HOST:PORT/PREFIX [--token-file F] [--fingerprint SHA256] [-c zstd|zlib|none] [--streams N] [--rate BYTES/s] [-p] [--disk-bus BUS] [--nic-model MODEL] [--disk-format FMT] [-o OPTIONS] [--force-firmware bios|uefi] [--allow-external-files] [--firmware bios|uefi] [--cpus N] [--memory SIZE] [--name NAME] [--output=human|json]`;

export async function migrateCommand(args: string[]): Promise<number> {
  if (args.includes('--warm')) return warmMigrateCommand(args);
  const { values, positionals: pos } = parse(
    args,
    {
      ...openingOptions,
      ...outputOption,
      ...vmSourceOptions,
      to: { type: 'string' },
      out: { type: 'string' },
      progress: { type: 'boolean', short: 'p' },
      'disk-bus': { type: 'string' },
      'nic-model': { type: 'string' },
      'disk-format': { type: 'string' },
      options: { type: 'string', short: 'o', multiple: true },
      'force-firmware': { type: 'string' },
      'token-file': { type: 'string' },
      fingerprint: { type: 'string' },
      compress: { type: 'string', short: 'c' },
      streams: { type: 'string' },
      rate: { type: 'string' },
    },
    usage,
  );
  const [source] = positionals(pos, 1, usage, ['SOURCE']);
  checkMigrateOptions(values, usage);
  const force = values['force-firmware'];
  let remote: { token: string; fingerprint?: string; codec: WireCodec; streams?: number; rate?: number } | undefined;
  if (isRemoteOut(values.out)) {
    const codec = (values.compress ?? 'zstd') as WireCodec;
    if (!WIRE_CODECS.includes(codec))
      throw new UsageError(`-c must be one of ${WIRE_CODECS.join(', ')}, not '${values.compress}'`);
    const token = values['token-file'] ? readToken(values['token-file']) : process.env.VMFERRY_TOKEN?.trim();
    if (!token) throw new UsageError('--out is a URL: give the agent token with --token-file F or VMFERRY_TOKEN');
    const streams = values.streams === undefined ? undefined : Number(values.streams);
    if (streams !== undefined && (!Number.isInteger(streams) || streams < 1 || streams > 64))
      throw new UsageError('--streams must be 1 to 64');
    remote = { token, fingerprint: values.fingerprint, codec, streams, rate: values.rate ? parseRate(values.rate) : undefined };
  } else if (values['token-file'] || values.fingerprint || values.compress || values.streams || values.rate) {
    throw new UsageError('--token-file, --fingerprint, -c, --streams and --rate apply only to --out https://HOST:PORT/PREFIX');
  }
  const mode = outputMode(values.output);
  let bar: ReturnType<typeof progressReporter> | undefined;
  let barKey = '';
  const onProgress = (p: MigrateProgress) => {
    const key = `${p.stage} disk${p.disk}`;
    if (key !== barKey) {
      bar?.stop();
      barKey = key;
      bar = progressReporter(values.progress === true, `${p.stage} disk${p.disk + 1}/${p.disks}`);
    }
    bar?.update({ done: p.done, total: p.total });
  };
  const report = await migrateVm({
    ...readOptionsFrom(values),
    source: source!,
    target: values.to,
    outDir: values.out,
    remote,
    diskBus: values['disk-bus'],
    nicModel: values['nic-model'],
    diskFormat: values['disk-format'],
    diskOptions: mergeOptionStrings(values.options),
    forceFirmware: force,
    onProgress,
    onStage: (s) => {
      // A stage ends the previous one's bar before anything else is printed.
      bar?.stop();
      bar = undefined;
      barKey = '';
      if (values.progress && s !== 'convert' && s !== 'verify' && s !== 'send') process.stderr.write(`migrate: ${s}\n`);
    },
  });
  bar?.stop();
  if (mode === 'json') printJson(report);
  else stdout().write(humanSummary(report));
  return 0;
}
