import { UsageError } from '../disk/errors.js';
import { parseRate } from '../plan/estimate.js';
import { sendImage } from '../transfer/client.js';
import { WIRE_CODECS, type WireCodec } from '../transfer/protocol.js';
import { readToken } from '../transfer/security.js';
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
  stdout,
} from './common.js';
import { progressReporter } from './progress.js';

export const usage =
  'vmferry send [-f FMT] [-O FMT] [-o OPTIONS] [-c zstd|zlib|none] [--rate BYTES/s] [--streams N] [-p] [--token-file F] [--fingerprint SHA256] [--overwrite] SRC https://HOST:PORT/NAME';

export async function sendCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    {
      ...openingOptions,
      ...outputOption,
      ...conversionOptions,
      compress: { type: 'string', short: 'c' },
      level: { type: 'string' },
      rate: { type: 'string' },
      streams: { type: 'string' },
      progress: { type: 'boolean', short: 'p' },
      'token-file': { type: 'string' },
      fingerprint: { type: 'string' },
      overwrite: { type: 'boolean' },
    },
    usage,
  );
  const [src, url] = positionals(pos, 2, usage, ['SRC', 'URL']);
  const mode = outputMode(values.output);
  const codec = (values.compress ?? 'zstd') as WireCodec;
  if (!WIRE_CODECS.includes(codec)) throw new UsageError(`-c must be one of ${WIRE_CODECS.join(', ')}, not '${values.compress}'`);
  const token = values['token-file'] ? readToken(values['token-file']) : process.env.VMFERRY_TOKEN?.trim();
  if (!token) throw new UsageError('no token: give --token-file F or set VMFERRY_TOKEN');
  const streams = values.streams === undefined ? undefined : Number(values.streams);
  if (streams !== undefined && (!Number.isInteger(streams) || streams < 1 || streams > 64))
    throw new UsageError('--streams must be 1 to 64');
  const level = values.level === undefined ? undefined : Number(values.level);
  if (level !== undefined && !Number.isInteger(level)) throw new UsageError('--level must be an integer');
  const progress = progressReporter(values.progress === true, 'send');
  const result = await sendImage(src!, {
    url: url!,
    token,
    sourceFormat: values.format,
    targetFormat: values['target-format'],
    options: mergeOptionStrings(values.options),
    codec,
    level,
    rate: values.rate ? parseRate(values.rate) : undefined,
    streams,
    fingerprint: values.fingerprint,
    overwrite: values.overwrite,
    open: { allowExternalFiles: values['allow-external-files'], ignoreParentId: values['ignore-parent-id'] },
    onProgress: progress.update,
    log: (line) => process.stderr.write(`vmferry send: ${line}\n`),
  });
  progress.stop();
  if (mode === 'json') printJson(result);
  else {
    stdout().write(
      `sent ${result.name}: ${humanSize(result.dataBytes)} of data as ${humanSize(result.wireBytes)} on the wire` +
        `${result.resumedAt ? ` (resumed at ${humanSize(result.resumedAt)})` : ''}` +
        `${result.resentChunks ? `, ${result.resentChunks} chunks re-sent` : ''} in ${result.seconds.toFixed(2)} s; content digest ${result.digest} matches\n`,
    );
  }
  return 0;
}
