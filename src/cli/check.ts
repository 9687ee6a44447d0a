import { UsageError } from '../disk/errors.js';
import { checkExitCode, checkImage } from '../ops/check.js';
import { openingOptions, outputMode, outputOption, parse, positionals, printJson, stdout } from './common.js';

export const usage = 'vmferry check [-f FMT] [-r leaks|all] [--output=human|json] IMAGE';

/** Exit 0 clean, 1 check not completed, 2 corruptions, 3 leaks only, 63 no checks for the format. */
export async function checkCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    {
      ...openingOptions,
      ...outputOption,
      format: { type: 'string', short: 'f' },
      repair: { type: 'string', short: 'r' },
      quiet: { type: 'boolean', short: 'q' },
    },
    usage,
  );
  const [path] = positionals(pos, 1, usage, ['IMAGE']);
  const mode = outputMode(values.output);
  const repair = values.repair;
  if (repair !== undefined && repair !== 'leaks' && repair !== 'all')
    throw new UsageError(`-r must be leaks or all, not '${repair}'`);
  const result = await checkImage({
    path: path!,
    format: values.format,
    repair,
    allowExternalFiles: values['allow-external-files'],
  });
  if (!result) {
    process.stderr.write(`vmferry: ${path}: This image format does not support checks\n`);
    return 63;
  }
  if (mode === 'json') {
    printJson({
      ...(result.imageEndOffset !== undefined ? { 'image-end-offset': result.imageEndOffset } : {}),
      ...(result.totalClusters !== undefined ? { 'total-clusters': result.totalClusters } : {}),
      'check-errors': result.checkErrors,
      ...(result.allocatedClusters !== undefined ? { 'allocated-clusters': result.allocatedClusters } : {}),
      filename: result.filename,
      format: result.format,
      ...(result.fragmentedClusters !== undefined ? { 'fragmented-clusters': result.fragmentedClusters } : {}),
      ...(result.compressedClusters !== undefined ? { 'compressed-clusters': result.compressedClusters } : {}),
      ...(result.corruptions ? { corruptions: result.corruptions } : {}),
      ...(result.leaks ? { leaks: result.leaks } : {}),
    });
  } else if (!values.quiet) {
    const out: string[] = [...result.messages];
    if (result.corruptions === 0 && result.leaks === 0 && result.checkErrors === 0)
      out.push('No errors were found on the image.');
    else {
      if (result.corruptions)
        out.push(
          `\n${result.corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.`,
        );
      if (result.leaks)
        out.push(
          `\n${result.leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.`,
        );
    }
    if (result.totalClusters && result.allocatedClusters !== undefined) {
      const pct = (n: number | undefined) => (((n ?? 0) * 100) / (result.allocatedClusters || 1)).toFixed(2);
      out.push(
        `${result.allocatedClusters}/${result.totalClusters} = ${((result.allocatedClusters * 100) / result.totalClusters).toFixed(2)}% allocated, ${pct(result.fragmentedClusters)}% fragmented, ${pct(result.compressedClusters)}% compressed clusters`,
      );
    }
    if (result.imageEndOffset !== undefined) out.push(`Image end offset: ${result.imageEndOffset}`);
    stdout().write(`${out.join('\n')}\n`);
  }
  return checkExitCode(result);
}
