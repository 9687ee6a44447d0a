import { openImage } from '../disk/registry.js';
import { type MapEntry, mapImage } from '../ops/map.js';
import { openingOptions, outputMode, outputOption, parse, positionals, stdout } from './common.js';

export const usage = 'vmferry map [-f FMT] [--output=human|json] IMAGE';

export async function mapCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    { ...openingOptions, ...outputOption, format: { type: 'string', short: 'f' } },
    usage,
  );
  const [path] = positionals(pos, 1, usage, ['IMAGE']);
  const mode = outputMode(values.output);
  const reader = await openImage(path!, { format: values.format, allowExternalFiles: values['allow-external-files'] });
  try {
    const hex = (n: number) => `0x${n.toString(16)}`;
    if (mode === 'json') {
      // Streamed row by row: a huge image's map never sits in memory whole.
      stdout().write('[');
      let first = true;
      for await (const e of mapImage(reader)) {
        stdout().write(
          `${first ? '' : ','}\n${JSON.stringify(e satisfies MapEntry)
            .replace(/,"/g, ', "')
            .replace(/":/g, '": ')}`,
        );
        first = false;
      }
      stdout().write('\n]\n');
    } else {
      stdout().write(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Kind'.padEnd(10)}Depth\n`);
      for await (const e of mapImage(reader)) {
        if (!e.present) continue;
        stdout().write(
          `${hex(e.start).padEnd(16)}${hex(e.length).padEnd(16)}${(e.data ? 'data' : 'zero').padEnd(10)}${e.depth}\n`,
        );
      }
    }
  } finally {
    await reader.close();
  }
  return 0;
}
