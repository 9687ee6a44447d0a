/** `vmferry migrate --warm`: parsing and printing for warm migration (src/migrate/warm). */
import { UsageError } from '../disk/errors.js';
import { type WarmReport, warmMigrate } from '../migrate/warm/warm.js';
import { parseRate } from '../plan/estimate.js';
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

export const warmUsage = `vmferry migrate --warm [--source-qmp SOCKET] SOURCE --to ${targetWriters.map((w) => w.profile.target).join('|')} --out DIR [--max-downtime SECONDS] [--max-rounds N] [--pause] [--shutdown-timeout SECONDS] [--rate-limit RATE] [--no-start] [--final] [-p] [--disk-bus BUS] [--nic-model MODEL] [--disk-format FMT] [-o OPTIONS] [--firmware bios|uefi] [--cpus N] [--memory SIZE] [--name NAME] [--output=human|json]`;

function num(v: string | undefined, what: string): number | undefined {
  if (v === undefined) return undefined;
  const n = Number(v);
  if (!Number.isFinite(n) || n < 0) throw new UsageError(`${what} must be a non-negative number, not '${v}'`);
  return n;
}

export function warmSummary(r: WarmReport): string {
  const lines: string[] = [];
  const mib = (n: number) => `${(n / 1024 / 1024).toFixed(2)} MiB`;
  lines.push(`Warm migration of ${r.source} to ${r.target} (${r.tracking})`);
  for (const x of r.rounds) {
    const predicted = x.predictedBytes !== undefined ? `, model ${mib(x.predictedBytes)}` : '';
    const dirty = x.dirtyRate !== undefined ? `, dirty rate ${mib(x.dirtyRate)}/s` : '';
    lines.push(
      `  round ${x.round}${x.final ? ' (final, source stopped)' : ''}${x.resumed ? ' (resumed)' : ''}: ${x.blocks} blocks of ${x.blockSize / 1024} KiB in ${x.ranges} runs, ${mib(x.bytes)} in ${x.seconds.toFixed(3)} s${dirty}${predicted}`,
    );
  }
  if (r.model) lines.push(`  model: ${r.model.note}`);
  if (r.cutover) {
    const c = r.cutover;
    lines.push(`  cutover: ${c.reason}`);
    lines.push(
      `  downtime ${c.downtimeSeconds.toFixed(3)} s (stop ${c.stopSeconds.toFixed(3)}, final copy ${c.finalCopySeconds.toFixed(3)}, ${c.incremental ? 'finish target disks' : 'convert'} ${c.convertSeconds.toFixed(3)}, commit ${c.commitSeconds.toFixed(3)}, start ${c.startSeconds.toFixed(3)}); a cold migration would stop the VM ~${c.coldDowntimeSeconds.toFixed(3)} s (copy ${c.coldCopySeconds.toFixed(3)} s)`,
    );
  }
  for (const d of r.disks) {
    if (d.verified !== undefined)
      lines.push(`  disk${d.index}: ${d.target} ${d.verified ? 'verified' : 'VERIFICATION FAILED'} sha256 ${d.workSha256}`);
  }
  if (r.started) lines.push(`  started: ${r.started.command}`);
  if (r.pending) lines.push(`  ${r.pending}`);
  for (const w of r.warnings) lines.push(`  warning: ${w}`);
  return `${lines.join('\n')}\n`;
}

export async function warmMigrateCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    {
      ...openingOptions,
      ...outputOption,
      ...vmSourceOptions,
      warm: { type: 'boolean' },
      'source-qmp': { type: 'string' },
      to: { type: 'string' },
      out: { type: 'string' },
      progress: { type: 'boolean', short: 'p' },
      'disk-bus': { type: 'string' },
      'nic-model': { type: 'string' },
      'disk-format': { type: 'string' },
      options: { type: 'string', short: 'o', multiple: true },
      'force-firmware': { type: 'string' },
      'max-downtime': { type: 'string' },
      'max-rounds': { type: 'string' },
      pause: { type: 'boolean' },
      'shutdown-timeout': { type: 'string' },
      'rate-limit': { type: 'string' },
      'no-start': { type: 'boolean' },
      final: { type: 'boolean' },
    },
    warmUsage,
  );
  const [source] = positionals(pos, 1, warmUsage, ['SOURCE']);
  checkMigrateOptions(values, warmUsage);
  const force = values['force-firmware'];
  if (values.final && values['source-qmp']) {
    throw new UsageError('--final is for sources without --source-qmp; with QMP vmferry stops the source itself');
  }
  const maxRounds = num(values['max-rounds'], '--max-rounds');
  if (maxRounds !== undefined && !Number.isInteger(maxRounds)) throw new UsageError('--max-rounds must be a whole number');
  const mode = outputMode(values.output);
  const report = await warmMigrate({
    ...readOptionsFrom(values),
    source: source!,
    sourceQmp: values['source-qmp'],
    target: values.to,
    outDir: values.out,
    diskBus: values['disk-bus'],
    nicModel: values['nic-model'],
    diskFormat: values['disk-format'],
    diskOptions: mergeOptionStrings(values.options),
    forceFirmware: force,
    maxDowntime: num(values['max-downtime'], '--max-downtime'),
    maxRounds,
    pause: values.pause,
    shutdownTimeout: num(values['shutdown-timeout'], '--shutdown-timeout'),
    rateLimit: values['rate-limit'] ? parseRate(values['rate-limit']) : undefined,
    noStart: values['no-start'],
    final: values.final,
    onEvent: (line) => {
      if (values.progress) process.stderr.write(`migrate --warm: ${line}\n`);
    },
  });
  if (mode === 'json') printJson(report);
  else stdout().write(warmSummary(report));
  return report.pending ? 0 : 0;
}
