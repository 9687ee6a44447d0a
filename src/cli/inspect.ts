import { UsageError } from '../disk/errors.js';
import { parseSize } from '../disk/options.js';
import { type Inspection, inspectVm } from '../migrate/inspect.js';
import type { ReadVmOptions } from '../vm/dialect.js';
import { humanSize, openingOptions, outputMode, outputOption, parse, positionals, printJson, stdout } from './common.js';

export const usage =
  'vmferry inspect [--output=human|json] [--allow-external-files] [--firmware bios|uefi] [--cpus N] [--memory SIZE] [--name NAME] SOURCE';

/** Options for what a bare disk image cannot say; shared with migrate. */
export const vmSourceOptions = {
  firmware: { type: 'string' },
  cpus: { type: 'string' },
  memory: { type: 'string' },
  name: { type: 'string' },
} as const;

export function readOptionsFrom(values: {
  firmware?: string;
  cpus?: string;
  memory?: string;
  name?: string;
  'allow-external-files'?: boolean;
}): ReadVmOptions {
  const out: ReadVmOptions = { allowExternalFiles: values['allow-external-files'] };
  if (values.firmware !== undefined) {
    if (values.firmware !== 'bios' && values.firmware !== 'uefi')
      throw new UsageError(`--firmware must be bios or uefi, not '${values.firmware}'`);
    out.firmware = values.firmware;
  }
  if (values.cpus !== undefined) {
    const n = Number(values.cpus);
    if (!Number.isInteger(n) || n < 1 || n > 1024)
      throw new UsageError(`--cpus must be a whole number from 1 to 1024, not '${values.cpus}'`);
    out.cpus = n;
  }
  if (values.memory !== undefined) {
    // A bare number is MiB, as every hypervisor's memory setting.
    out.memory = /^\d+$/.test(values.memory) ? Number(values.memory) * 1024 * 1024 : parseSize(values.memory);
    if (!(out.memory > 0)) throw new UsageError(`--memory must be a size, not '${values.memory}'`);
  }
  if (values.name !== undefined) out.name = values.name;
  return out;
}

function formatInspection(r: Inspection): string {
  const m = r.model;
  const lines: string[] = [];
  lines.push(`name: ${m.name}`);
  lines.push(`source: ${r.reader}${m.sourceFile ? ` (${m.sourceFile})` : ''}`);
  if (m.uuid) lines.push(`uuid: ${m.uuid}`);
  lines.push(
    `firmware: ${m.firmware}${m.secureBoot ? ' with secure boot' : ''}${m.generation ? ` (Hyper-V Generation ${m.generation})` : ''}`,
  );
  lines.push(`cpus: ${m.cpus}${m.coresPerSocket ? ` (${m.coresPerSocket} cores per socket)` : ''}`);
  lines.push(`memory: ${humanSize(m.memory)}`);
  const g = m.guest;
  if (g.sourceId || g.description || g.family) {
    lines.push(
      `guest: ${[g.description, g.sourceId && `(${g.sourceId})`, g.family && `family ${g.family}`].filter(Boolean).join(' ')}`,
    );
  }
  for (const c of m.controllers) lines.push(`controller ${c.id}: ${c.bus}${c.model ? ` (${c.model})` : ''}`);
  m.disks.forEach((d, i) => {
    const look = r.disks.find((l) => l.index === i);
    const where = d.controller ? `${d.controller}:${d.unit ?? '?'}` : d.bus;
    lines.push(`disk${i}: ${where} ${d.path}`);
    if (look?.error) lines.push(`  cannot be opened: ${look.error}`);
    if (look?.format) {
      lines.push(
        `  ${look.format}, ${humanSize(look.virtualSize!)} virtual, ${humanSize(look.allocatedBytes!)} of data${look.chain && look.chain.length > 1 ? `, chain of ${look.chain.length}: ${look.chain.join(' -> ')}` : ''}`,
      );
    }
    for (const n of d.notes ?? []) lines.push(`  note: ${n}`);
    const t = look?.partitionTable;
    if (t) {
      lines.push(
        `  partition table: ${t.scheme === 'none' ? 'none' : `${t.scheme.toUpperCase()}${t.id ? ` ${t.id}` : ''}`}; looks ${t.bootHint === 'unknown' ? 'neither BIOS- nor UEFI-bootable' : t.bootHint === 'either' ? 'BIOS- and UEFI-bootable' : `${t.bootHint.toUpperCase()}-bootable`} (${t.bootReason})`,
      );
      for (const p of t.partitions) {
        const flags = [p.esp && 'ESP', p.biosBoot && 'BIOS boot', p.bootable && 'active'].filter(Boolean).join(', ');
        lines.push(
          `    ${String(p.number).padStart(2)}  start ${humanSize(p.start).padEnd(10)} size ${humanSize(p.size).padEnd(10)} ${p.typeName ?? p.type}${p.name ? ` "${p.name}"` : ''}${flags ? ` [${flags}]` : ''}`,
        );
      }
    }
  });
  m.cdroms.forEach((c, i) => {
    lines.push(`cdrom${i}: ${c.controller ? `${c.controller}:${c.unit ?? '?'}` : c.bus} ${c.path ?? '(empty)'}`);
  });
  m.nics.forEach((n, i) => {
    lines.push(
      `nic${i}: ${n.model}${n.sourceModel && n.sourceModel !== n.model ? ` (${n.sourceModel})` : ''}${n.mac ? ` mac ${n.mac}` : ''}${n.network ? ` network "${n.network}"` : ''}`,
    );
  });
  for (const s of m.snapshots) {
    lines.push(`snapshot ${s.id}: "${s.name}"${s.parent ? ` (parent ${s.parent})` : ''}${s.current ? ' [current]' : ''}`);
  }
  if (m.unmapped.length > 0) lines.push(`unmapped settings: ${m.unmapped.length} (see --output=json)`);
  for (const w of r.warnings) lines.push(`warning: ${w}`);
  return `${lines.join('\n')}\n`;
}

export async function inspectCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(args, { ...openingOptions, ...outputOption, ...vmSourceOptions }, usage);
  const [source] = positionals(pos, 1, usage, ['SOURCE']);
  const mode = outputMode(values.output);
  const result = await inspectVm(source!, readOptionsFrom(values));
  if (mode === 'json') printJson(result);
  else stdout().write(formatInspection(result));
  return 0;
}
