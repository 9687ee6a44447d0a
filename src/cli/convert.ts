import { UsageError } from '../disk/errors.js';
import { parseSize } from '../disk/options.js';
import { CACHE_MODES, type CacheMode, setOutputCacheMode } from '../disk/sink.js';
import { convertImage } from '../ops/convert.js';
import {
  conversionOptions,
  humanSize,
  mergeOptionStrings,
  openingOptions,
  outputMode,
  outputOption,
  parse,
  positionals,
  printJson,
} from './common.js';
import { progressReporter } from './progress.js';

export const usage =
  'vmferry convert [-f FMT] [-O FMT] [-o OPTIONS] [-c] [-p] [-t CACHE] [-B BACKING [-F BACKING_FMT]] [--snapshot NAME|ID] [--allow-external-files] SRC DST';

export async function convertCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    {
      ...openingOptions,
      ...outputOption,
      ...conversionOptions,
      compress: { type: 'boolean', short: 'c' },
      progress: { type: 'boolean', short: 'p' },
      backing: { type: 'string', short: 'B' },
      'backing-format': { type: 'string', short: 'F' },
      snapshot: { type: 'string', short: 'l' },
      quiet: { type: 'boolean', short: 'q' },
      cache: { type: 'string', short: 't' },
      'source-cache': { type: 'string', short: 'T' },
    },
    usage,
  );
  const [src, dst] = positionals(pos, 2, usage, ['SRC', 'DST']);
  const mode = outputMode(values.output);
  // qemu-img convert writes its output with cache=unsafe unless told otherwise: no flush at the end.
  setOutputCacheMode(cacheMode(values.cache ?? 'unsafe', '-t'));
  // Reads always go through the page cache; -T is checked and accepted for qemu-img compatibility.
  if (values['source-cache'] !== undefined) cacheMode(values['source-cache'], '-T');
  const progress = progressReporter(values.progress === true, 'convert');
  const snapshot = values.snapshot?.replace(/^snapshot\.(name|id)=/, '');
  const result = await convertImage({
    source: src!,
    target: dst!,
    sourceFormat: values.format,
    targetFormat: values['target-format'],
    options: mergeOptionStrings(values.options),
    compress: values.compress,
    targetBacking: values.backing,
    targetBackingFormat: values['backing-format'],
    snapshot,
    allowExternalFiles: values['allow-external-files'],
    ignoreParentId: values['ignore-parent-id'],
    maxMetadataMemory: values['max-metadata-memory'] ? parseSize(values['max-metadata-memory']) : undefined,
    onProgress: progress.update,
  });
  progress.stop();
  if (mode === 'json') printJson(result);
  else if (values.progress) {
    process.stderr.write(
      `converted ${result.sourceFormat} -> ${result.targetFormat}: ${humanSize(result.dataBytes)} of data in ${result.seconds.toFixed(2)} s\n`,
    );
  }
  return 0;
}

function cacheMode(value: string, flag: string): CacheMode {
  if ((CACHE_MODES as readonly string[]).includes(value)) return value as CacheMode;
  throw new UsageError(`${flag}: invalid cache mode '${value}' (use ${CACHE_MODES.join(', ')})`);
}
