import { appendFileSync } from 'node:fs';
import { abortAllTempsSync } from '../disk/sink.js';
import { describeRun } from './code-cache.js';
import { errorLine, stdout } from './common.js';

type Command = (args: string[]) => Promise<number>;

/**
 * A command's module, loaded only when that command runs: start-up then pays for one command
 * (and the formats it needs), not for the VM plane, the network and every other command.
 */
interface CommandModule {
  run: Command;
  usage: string;
}

/** Loads the formats (they register on import) and then the command's module. */
async function load(mod: Promise<Record<string, unknown>>, run: string): Promise<CommandModule> {
  await import('../formats/index.js');
  await import('../transfer/nbd/register.js');
  const m = await mod;
  return { run: m[run] as Command, usage: m.usage as string };
}

const commands: Record<string, { load: () => Promise<CommandModule>; summary: string; errorCode?: number }> = {
  info: {
    load: () => load(import('./info.js'), 'infoCommand'),
    summary: 'show an image: format, sizes, backing chain, snapshots',
  },
  convert: { load: () => load(import('./convert.js'), 'convertCommand'), summary: 'convert an image to another format' },
  compare: {
    load: () => load(import('./compare.js'), 'compareCommand'),
    summary: 'compare the content of two images (exit 0 same, 1 different, 2 error)',
    errorCode: 2,
  },
  check: {
    load: () => load(import('./check.js'), 'checkCommand'),
    summary: 'check an image for corruption (exit 0, 2 corrupt, 3 leaks, 63 unsupported)',
  },
  map: { load: () => load(import('./map.js'), 'mapCommand'), summary: 'print the extent map of an image' },
  measure: {
    load: () => load(import('./measure.js'), 'measureCommand'),
    summary: 'compute the size a conversion would need',
  },
  create: { load: () => load(import('./create.js'), 'createCommand'), summary: 'create a new empty image' },
  inspect: {
    load: () => load(import('./inspect.js'), 'inspectCommand'),
    summary: 'show a VM (any descriptor or disk): model, disks, partition tables',
  },
  migrate: {
    load: () => load(import('./migrate.js'), 'migrateCommand'),
    summary: 'move a VM to another platform: disks, descriptor, verification, report',
  },
  serve: {
    load: () => load(import('./serve.js'), 'serveCommand'),
    summary: 'receive disks over the network (TLS agent writing any format)',
  },
  send: {
    load: () => load(import('./send.js'), 'sendCommand'),
    summary: 'send a disk to a vmferry serve agent (resumable, compressed)',
  },
  estimate: {
    load: () => load(import('./estimate.js'), 'estimateCommand'),
    summary: 'predict transfer time, compression and warm-migration rounds',
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

/**
 * What a run does, for the code cache: the command, its flags and its -o option lists (what is
 * written, not where); the names of the files it reads and writes are left out.
 */
function runKind(name: string, args: string[]): string {
  const kind = [name];
  for (const [i, arg] of args.entries()) if (arg.startsWith('-') || args[i - 1] === '-o') kind.push(arg);
  return kind.join(' ');
}

/** Runs one command; returns the exit code. Errors become one line on stderr. */
export async function main(argv: string[]): Promise<number> {
  const [name, ...args] = argv;
  if (!name || name === '--help' || name === '-h' || name === 'help') {
    stdout().write(help());
    return name ? 0 : 1;
  }
  if (name === '--version' || name === '-V') {
    stdout().write('vmferry 0.1.0\n');
    return 0;
  }
  const command = commands[name];
  if (!command) {
    process.stderr.write(`vmferry: unknown command '${name}'; run 'vmferry --help' for the list\n`);
    return 1;
  }
  let loaded: CommandModule;
  try {
    loaded = await command.load();
  } catch (err) {
    process.stderr.write(`${errorLine(err)}\n`);
    return command.errorCode ?? 1;
  }
  if (args.includes('--help') || args.includes('-h')) {
    stdout().write(`usage: ${loaded.usage}\n`);
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
  describeRun(runKind(name, args));
  const debug = args.includes('--debug');
  try {
    return await loaded.run(args);
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
