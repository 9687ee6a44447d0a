import { openImage } from '../disk/registry.js';
import type { DiskReader } from '../disk/types.js';
import { compareImages } from '../ops/compare.js';
import { openingOptions, parse, positionals, stdout } from './common.js';

export const usage = 'vmferry compare [-f FMT] [-F FMT] [-s] [-q] [--allow-external-files] A B';

/** Exit 0 identical, 1 different, 2 error — qemu-img compare's codes (main maps errors to 2). */
export async function compareCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    {
      ...openingOptions,
      'first-format': { type: 'string', short: 'f' },
      'second-format': { type: 'string', short: 'F' },
      strict: { type: 'boolean', short: 's' },
      quiet: { type: 'boolean', short: 'q' },
      progress: { type: 'boolean', short: 'p' },
    },
    usage,
  );
  const [a, b] = positionals(pos, 2, usage, ['A', 'B']);
  const common = { allowExternalFiles: values['allow-external-files'], ignoreParentId: values['ignore-parent-id'] };
  const readers: DiskReader[] = [];
  try {
    readers.push(await openImage(a!, { ...common, format: values['first-format'] }));
    readers.push(await openImage(b!, { ...common, format: values['second-format'] }));
    const result = await compareImages(readers[0]!, readers[1]!, values.strict === true);
    if (!values.quiet) stdout().write(`${result.message}\n`);
    return result.identical ? 0 : 1;
  } finally {
    for (const r of readers) await r.close();
  }
}
