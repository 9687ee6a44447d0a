import { UsageError } from '../disk/errors.js';
import { parseSize } from '../disk/options.js';
import { openImage } from '../disk/registry.js';
import { measureImage } from '../ops/measure.js';
import {
  conversionOptions,
  mergeOptionStrings,
  openingOptions,
  outputMode,
  outputOption,
  parse,
  printJson,
  stdout,
} from './common.js';

export const usage = 'vmferry measure -O FMT [-o OPTIONS] [-f FMT] [--size SIZE | SRC] [--output=human|json]';

export async function measureCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    {
      ...openingOptions,
      ...outputOption,
      ...conversionOptions,
      size: { type: 'string' },
    },
    usage,
  );
  const mode = outputMode(values.output);
  const target = values['target-format'] ?? 'raw';
  if ((pos.length === 0) === (values.size === undefined))
    throw new UsageError(`Either --size N or one filename must be specified; usage: ${usage}`);
  if (pos.length > 1) throw new UsageError(`Unexpected argument '${pos[1]}'; usage: ${usage}`);
  const source = pos[0]
    ? await openImage(pos[0], { format: values.format, allowExternalFiles: values['allow-external-files'] })
    : null;
  try {
    const size = source ? source.virtualSize : parseSize(values.size!);
    const r = await measureImage(target, mergeOptionStrings(values.options), source, size);
    if (mode === 'json')
      printJson({
        ...(r.bitmaps !== undefined ? { bitmaps: r.bitmaps } : {}),
        required: r.required,
        'fully-allocated': r.fullyAllocated,
      });
    else stdout().write(`required size: ${r.required}\nfully allocated size: ${r.fullyAllocated}\n`);
  } finally {
    await source?.close();
  }
  return 0;
}
