import { UsageError } from '../disk/errors.js';
import { parseSize } from '../disk/options.js';
import { createImage } from '../ops/create.js';
import { humanSize, mergeOptionStrings, parse, stdout } from './common.js';

export const usage = 'vmferry create -f FMT [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] FILE [SIZE]';

export async function createCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    {
      format: { type: 'string', short: 'f', default: 'raw' },
      options: { type: 'string', short: 'o', multiple: true },
      backing: { type: 'string', short: 'b' },
      'backing-format': { type: 'string', short: 'F' },
      quiet: { type: 'boolean', short: 'q' },
      'allow-external-files': { type: 'boolean' },
      debug: { type: 'boolean' },
    },
    usage,
  );
  if (pos.length < 1 || pos.length > 2) throw new UsageError(`Expecting FILE and optionally SIZE; usage: ${usage}`);
  const options = mergeOptionStrings(values.options);
  if (values.backing) options.backing_file = values.backing;
  if (values['backing-format']) options.backing_fmt = values['backing-format'];
  const size = pos[1] !== undefined ? parseSize(pos[1]) : undefined;
  const r = await createImage({
    path: pos[0]!,
    format: values.format!,
    size,
    options,
    allowExternalFiles: values['allow-external-files'],
  });
  if (!values.quiet) {
    const opts = Object.entries(options)
      .map(([k, v]) => ` ${k}=${v}`)
      .join('');
    stdout().write(`Formatting '${pos[0]}', fmt=${values.format} size=${r.size} (${humanSize(r.size)})${opts}\n`);
  }
  return 0;
}
