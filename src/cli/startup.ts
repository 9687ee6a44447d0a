/**
 * What bin/vmferry does before it loads the CLI: the JIT setting, then the code cache. V8 keys
 * cached code by its flags, so they are set first, and the same way on every run.
 */
import { nativeHelper } from '../disk/native.js';
import { useCodeCache } from './code-cache.js';

/**
 * Twice V8's default interrupt budget (67584): a function is handed to the optimizing compiler after
 * running twice as long. A conversion of a few tenths of a second otherwise spends 30 to 60 ms of
 * the second core, which its copies need, compiling per-piece loops (copyDisk, the raw reader's
 * extents) for the few milliseconds they still run: huge raw -> vdi took 0.185 s, 0.154 s with
 * this (9 alternating runs; qemu-img 0.153 s). Long runs still have their hot loops compiled, a
 * little later: dense stream VMDK -> qcow2 was unchanged (1.13 s and 1.20 s, within run-to-run noise).
 */
export const JIT_FLAGS = '--interrupt-budget=135168';

/** Without the native helper there is neither: V8's flags are out of N-API's reach, and the cache's checksum uses it. */
export function prepareCli(bundleDir: string): void {
  nativeHelper()?.setV8Flags(JIT_FLAGS);
  useCodeCache(bundleDir);
}
