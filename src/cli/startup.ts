/**
 * What bin/vmferry does before it loads the CLI: the JIT setting, then the code cache. V8 keys
 * cached code by its flags, so they are set first, and the same way on every run.
 */
import { setV8FlagsUntilWorkers, v8FlagsRestored } from '../disk/native.js';
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

/** Without the native helper there is neither: V8's flags are out of N-API's reach, and the cache's checksum uses it. */
export function prepareCli(bundleDir: string): void {
  if (!setV8FlagsUntilWorkers(JIT_FLAGS, DEFAULT_FLAGS)) return;
  useCodeCache(bundleDir, () => !v8FlagsRestored());
}
