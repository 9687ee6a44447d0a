import { appendFileSync } from 'node:fs';
import '../formats/index.js';
import { abortAllTempsSync } from '../disk/sink.js';
import { checkCommand, usage as checkUsage } from './check.js';
import { errorLine } from './common.js';
import { compareCommand, usage as compareUsage } from './compare.js';
import { convertCommand, usage as convertUsage } from './convert.js';
import { createCommand, usage as createUsage } from './create.js';
import { infoCommand, usage as infoUsage } from './info.js';
import { inspectCommand, usage as inspectUsage } from './inspect.js';
import { mapCommand, usage as mapUsage } from './map.js';
import { measureCommand, usage as measureUsage } from './measure.js';
import { migrateCommand, usage as migrateUsage } from './migrate.js';

type Command = (args: string[]) => Promise<number>;

const commands: Record<string, { run: Command; usage: string; summary: string; errorCode?: number }> = {
  info: { run: infoCommand, usage: infoUsage, summary: 'show an image: format, sizes, backing chain, snapshots' },
  convert: { run: convertCommand, usage: convertUsage, summary: 'convert an image to another format' },
  compare: {
    run: compareCommand,
    usage: compareUsage,
    summary: 'compare the content of two images (exit 0 same, 1 different, 2 error)',
    errorCode: 2,
  },
  check: {
    run: checkCommand,
    usage: checkUsage,
    summary: 'check an image for corruption (exit 0, 2 corrupt, 3 leaks, 63 unsupported)',
  },
  map: { run: mapCommand, usage: mapUsage, summary: 'print the extent map of an image' },
  measure: { run: measureCommand, usage: measureUsage, summary: 'compute the size a conversion would need' },
  create: { run: createCommand, usage: createUsage, summary: 'create a new empty image' },
  inspect: {
    run: inspectCommand,
    usage: inspectUsage,
    summary: 'show a VM (any descriptor or disk): model, disks, partition tables',
  },
  migrate: {
    run: migrateCommand,
    usage: migrateUsage,
    summary: 'move a VM to another platform: disks, descriptor, verification, report',
  },
};

function help(): string {
  const rows = Object.entries(commands).map(([name, c]) => `  ${name.padEnd(10)}${c.summary}`);
  return `usage: vmferry COMMAND [options]\n\ncommands:\n${rows.join('\n')}\n\nRun 'vmferry COMMAND --help' for a command's options. Exit codes are listed in README.md.\n`;
}

const EXIT_INTERRUPTED = 130;

/**
 * VMFERRY_STATS=FILE: append one JSON line with this run's peak RSS and CPU time, for benchmarks
 * and the bounded-memory tests (measured by the kernel, not estimated).
 */
function writeRunStats(): void {
  const file = process.env.VMFERRY_STATS;
  if (!file) return;
  const u = process.resourceUsage();
  const line = {
    command: process.argv.slice(2),
    maxRssBytes: u.maxRSS * 1024,
    userCpuUs: u.userCPUTime,
    systemCpuUs: u.systemCPUTime,
  };
  appendFileSync(file, `${JSON.stringify(line)}\n`);
}

/** Runs one command; returns the exit code. Errors become one line on stderr. */
export async function main(argv: string[]): Promise<number> {
  // A reader that stops early (vmferry map | head) is not an error.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
    throw err;
  });
  const [name, ...args] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(help());
    return name ? 0 : 1;
  }
  if (name === '--version' || name === '-V') {
    process.stdout.write('vmferry 0.1.0\n');
    return 0;
  }
  const command = commands[name];
  if (!command) {
    process.stderr.write(`vmferry: unknown command '${name}'; run 'vmferry --help' for the list\n`);
    return 1;
  }
  if (args.includes('--help') || args.includes('-h')) {
    process.stdout.write(`usage: ${command.usage}\n`);
    return 0;
  }
  const onSignal = (signal: NodeJS.Signals) => {
    // Never leave a half-written output behind: temp files go, the target name stays untouched.
    abortAllTempsSync();
    process.stderr.write(`vmferry: interrupted by ${signal}\n`);
    process.exit(signal === 'SIGINT' ? EXIT_INTERRUPTED : 128 + 15);
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const debug = args.includes('--debug');
  try {
    return await command.run(args);
  } catch (err) {
    process.stderr.write(`${errorLine(err)}\n`);
    if (debug && err instanceof Error && err.stack) process.stderr.write(`${err.stack}\n`);
    return command.errorCode ?? 1;
  } finally {
    writeRunStats();
    process.removeListener('SIGINT', onSignal);
    process.removeListener('SIGTERM', onSignal);
  }
}
