import { parseSize } from '../disk/options.js';
import { type ImageInfo, imageInfo, imageInfoChain } from '../ops/info.js';
import { humanSize, openingOptions, outputMode, outputOption, parse, positionals, printJson, stdout } from './common.js';

export const usage = 'vmferry info [-f FMT] [--backing-chain] [--output=human|json] [--allow-external-files] IMAGE';

export async function infoCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    { ...openingOptions, ...outputOption, format: { type: 'string', short: 'f' }, 'backing-chain': { type: 'boolean' } },
    usage,
  );
  const [path] = positionals(pos, 1, usage, ['IMAGE']);
  const mode = outputMode(values.output);
  const opts = {
    format: values.format,
    allowExternalFiles: values['allow-external-files'],
    maxMetadataMemory: values['max-metadata-memory'] ? parseSize(values['max-metadata-memory']) : undefined,
  };
  if (values['backing-chain']) {
    const chain = await imageInfoChain(path!, opts);
    if (mode === 'json') printJson(chain);
    else stdout().write(chain.map(humanInfo).join('\n'));
  } else {
    const info = await imageInfo(path!, opts);
    if (mode === 'json') printJson(info);
    else stdout().write(humanInfo(info));
  }
  return 0;
}

function date(sec: number): string {
  const d = new Date(sec * 1000);
  const p = (n: number) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

function clock(sec: number, nsec: number): string {
  const p = (n: number, w = 2) => String(n).padStart(w, '0');
  return `${p(Math.floor(sec / 3600), 4)}:${p(Math.floor(sec / 60) % 60)}:${p(sec % 60)}.${p(Math.floor(nsec / 1e6), 3)}`;
}

function specific(value: unknown, indent: string): string {
  if (Array.isArray(value)) {
    return value.map((v) => `${indent}[${value.indexOf(v)}]:\n${specific(v, `${indent}    `)}`).join('');
  }
  if (value && typeof value === 'object') {
    return Object.entries(value as Record<string, unknown>)
      .map(([k, v]) =>
        v && typeof v === 'object'
          ? `${indent}${k.replace(/-/g, ' ')}:\n${specific(v, `${indent}    `)}`
          : `${indent}${k.replace(/-/g, ' ')}: ${v}\n`,
      )
      .join('');
  }
  return `${indent}${String(value)}\n`;
}

/** qemu-img info's human layout. */
export function humanInfo(info: ImageInfo): string {
  const lines = [
    `image: ${info.filename}`,
    `file format: ${info.format}`,
    `virtual size: ${humanSize(info['virtual-size'])} (${info['virtual-size']} bytes)`,
    `disk size: ${humanSize(info['actual-size'])}`,
  ];
  if (info['cluster-size'] !== undefined) lines.push(`cluster_size: ${info['cluster-size']}`);
  if (info['backing-filename'] !== undefined) {
    const full = info['full-backing-filename'];
    lines.push(
      `backing file: ${info['backing-filename']}${full && full !== info['backing-filename'] ? ` (actual path: ${full})` : ''}`,
    );
    if (info['backing-filename-format']) lines.push(`backing file format: ${info['backing-filename-format']}`);
  }
  if (info['dirty-flag']) lines.push('dirty flag: yes');
  if (info.snapshots?.length) {
    lines.push('Snapshot list:');
    lines.push('ID        TAG               VM SIZE                DATE        VM CLOCK     ICOUNT');
    for (const s of info.snapshots) {
      lines.push(
        `${s.id.padEnd(10)}${s.name.padEnd(18)}${humanSize(s['vm-state-size']).padStart(7)} ${date(s['date-sec'])} ${clock(s['vm-clock-sec'], s['vm-clock-nsec'])} ${String(s.icount ?? '').padStart(10)}`,
      );
    }
  }
  if (info.files) lines.push(`files: ${info.files.join(', ')}`);
  let out = `${lines.join('\n')}\n`;
  if (info['format-specific']) {
    out += `Format specific information:\n${specific(info['format-specific'].data, '    ')}`;
  }
  return out;
}
