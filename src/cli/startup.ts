/**
 * What bin/vmferry does before it loads the CLI (Node's modules the commands need, the JIT
 * setting, then the code cache) and once the command has returned (finishCli). V8 keys cached code
 * by its flags, so they are set first, and the same way on every run.
 */
import 'node:os';
import * as util from 'node:util';
import { nativeHelper, setV8FlagsUntilWorkers, v8FlagsRestored } from '../disk/native.js';
import { useCodeCache } from './code-cache.js';

/**
 * Twice V8's default interrupt budget (67584): a function is handed to the optimizing compiler after
 * running twice as long. A conversion of a few tenths of a second otherwise spends 30 to 60 ms of
 * the second core, which its copies need, compiling per-piece loops (copyDisk, the raw reader's
 * extents) for the few milliseconds they still run: huge raw -> vdi took 0.185 s, 0.154 s with
 * this (9 alternating runs; qemu-img 0.153 s). Long runs still have their hot loops compiled, a
 * little later. Worker threads start under V8's defaults again (compress-pool.ts).
 */
export const JIT_FLAGS = '--interrupt-budget=135168';
/** V8's default, put back before worker threads start (setV8FlagsUntilWorkers). */
const DEFAULT_FLAGS = '--interrupt-budget=67584';

/**
 * Loads, while V8's flags are still its own, the modules of Node's that the commands load after
 * prepareCli: node:os (imported above; the copy sizes its pools by it) and parseArgs. V8 refuses
 * Node's code cache for its own modules under other flags, as it does ours: compiled afresh, they
 * took 1.1 ms of every convert, against 0.45 ms from the cache.
 */
function loadBuiltinsFirst(): void {
  // A getter that loads its module on first use; the test keeps the bundler from dropping the read.
  if (typeof util.parseArgs !== 'function') throw new Error('this Node has no util.parseArgs (Node 20 is needed)');
}

/**
 * Without the native helper there is neither: V8's flags are out of N-API's reach, and the cache's
 * checksum uses it. `moduleClass`: the class of Node's CommonJS modules (bin/vmferry passes its
 * `module.constructor`; see useCodeCache).
 */
export function prepareCli(bundleDir: string, moduleClass: unknown): void {
  loadBuiltinsFirst();
  if (!setV8FlagsUntilWorkers(JIT_FLAGS, DEFAULT_FLAGS)) return;
  useCodeCache(bundleDir, moduleClass, () => !v8FlagsRestored());
}

/**
 * Sets the exit code, and with the native helper ends the process once the 'exit' event's
 * listeners have run (the code cache's among them), without Node's teardown after them: that
 * took 3 to 4 ms of a 0.12 s convert (os raw -> qcow2, alternating runs). Called when main has
 * returned, so the listener comes after every other. A node started with options of its own
 * (--cpu-prof, NODE_OPTIONS, NODE_V8_COVERAGE...) exits as usual: profiles and coverage are
 * written in that teardown.
 */
export function finishCli(code: number): void {
  process.exitCode = code;
  const native = nativeHelper();
  const plainNode = process.execArgv.length === 0 && !process.env.NODE_OPTIONS && !process.env.NODE_V8_COVERAGE;
  if (native && plainNode) process.on('exit', (exitCode) => native.exitNow(exitCode));
}
