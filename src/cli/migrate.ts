import { UsageError } from '../disk/errors.js';
import { type MigrateProgress, migrateVm } from '../migrate/migrate.js';
import { humanSummary } from '../migrate/report.js';
import { targetWriters } from '../vm/registry.js';
import { mergeOptionStrings, openingOptions, outputMode, outputOption, parse, positionals, printJson } from './common.js';
import { readOptionsFrom, vmSourceOptions } from './inspect.js';
import { warmMigrateCommand } from './migrate-warm.js';
import { progressReporter } from './progress.js';

export const usage = `vmferry migrate SOURCE --to ${targetWriters.map((w) => w.profile.target).join('|')} --out DIR [-p] [--disk-bus BUS] [--nic-model MODEL] [--disk-format FMT] [-o OPTIONS] [--force-firmware bios|uefi] [--allow-external-files] [--firmware bios|uefi] [--cpus N] [--memory SIZE] [--name NAME] [--output=human|json]`;

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
    },
    usage,
  );
  const [source] = positionals(pos, 1, usage, ['SOURCE']);
  if (!values.to) throw new UsageError(`--to is required; usage: ${usage}`);
  if (!values.out) throw new UsageError(`--out is required; usage: ${usage}`);
  const force = values['force-firmware'];
  if (force !== undefined && force !== 'bios' && force !== 'uefi') {
    throw new UsageError(`--force-firmware must be bios or uefi, not '${force}'`);
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
      if (values.progress && s !== 'convert' && s !== 'verify') process.stderr.write(`migrate: ${s}\n`);
    },
  });
  bar?.stop();
  if (mode === 'json') printJson(report);
  else process.stdout.write(humanSummary(report));
  return 0;
}
