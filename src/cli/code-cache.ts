/**
 * A V8 code cache for the bundled CLI's chunks (dist/cli/*.cjs), kept beside them in dist/cli/.v8-cache
 * as Python keeps __pycache__ beside its sources. A command whose chunks were compiled once before
 * skips compiling them again (about 10 ms of a 0.07 s small convert). Node 20 has no compile cache
 * of its own (module.enableCompileCache came in Node 22).
 *
 * Each cache file holds the chunk's size and modification time, so a chunk edited in place is
 * compiled afresh, and a CRC-32C of V8's data, which V8 itself does not verify in release builds.
 * The CRC comes from the native helper (a checksum in JS, interpreted at start-up, cost 1 to 5 ms);
 * without the helper, and in an install folder the user cannot write to, the CLI runs uncached.
 */
import { mkdirSync, readFileSync, realpathSync, renameSync, statSync, writeFileSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { Script } from 'node:vm';
import { nativeHelper } from '../disk/native.js';

/** The parts of Node's CommonJS module this file uses; `_compile` and `_cache` are not in Node's typings. */
interface LoadedModule {
  exports: unknown;
  filename: string;
  paths: string[];
  loaded: boolean;
  require(id: string): unknown;
  _compile(content: string, filename: string): unknown;
}
interface ModuleClass {
  new (id: string, parent: LoadedModule): LoadedModule;
  _cache: Record<string, LoadedModule | undefined>;
  prototype: { _compile: Compile };
  wrap(script: string): string;
}
type Compile = (this: LoadedModule, content: string, filename: string) => unknown;
type Wrapper = (
  exports: unknown,
  require: (id: string) => unknown,
  module: LoadedModule,
  filename: string,
  dirname: string,
) => unknown;

const MAGIC = 0x31434656; // "VFC1"
const HEADER = 24; // magic, checksum (u32 each); chunk size, chunk mtime in ms (f64 each)

function checksum(data: Uint8Array): number {
  const native = nativeHelper();
  if (!native) throw new Error('the code cache needs the native helper');
  return native.crc32c(data, 0);
}

/**
 * V8's data from a cache file, or undefined when it is missing, damaged or for another version of
 * the chunk. Read and checked in the native helper, in one call: fs.readFileSync's first use made
 * Node compile its code for it (0.6 ms of every start).
 */
export function readCacheFile(path: string, chunkSize: number, chunkMtimeMs: number): Buffer | undefined {
  const native = nativeHelper();
  if (!native) throw new Error('the code cache needs the native helper');
  return native.readCodeCache(path, chunkSize, chunkMtimeMs) ?? undefined;
}

/** Writes a cache file whole or not at all (temp file, then rename), so readers never see half of one. */
export function writeCacheFile(path: string, data: Buffer, chunkSize: number, chunkMtimeMs: number): void {
  const header = Buffer.alloc(HEADER);
  header.writeUInt32LE(MAGIC, 0);
  header.writeUInt32LE(checksum(data), 4);
  header.writeDoubleLE(chunkSize, 8);
  header.writeDoubleLE(chunkMtimeMs, 16);
  mkdirSync(dirname(path), { recursive: true });
  const temp = `${path}.${process.pid}.tmp`;
  writeFileSync(temp, Buffer.concat([header, data]));
  renameSync(temp, path);
}

/** Set by describeRun. */
let runKind: string | undefined;

/**
 * Names what this run does (a command and its options, not its file names). The cache of a chunk is
 * otherwise written by the first run that loads it, with the functions that run compiled: once
 * `vmferry --help` or a test had made it, every convert compiled the rest of its code again (os raw
 * -> qcow2: 2.5 ms of 0.073 s). A run of a kind not seen before rewrites the caches of the chunks it
 * loaded, once; a file in .v8-cache/runs marks the kinds seen.
 */
export function describeRun(kind: string): void {
  runKind = kind;
}

/**
 * Compiles the CommonJS files of `bundlePath` with the code cache from then on. `moduleClass` is the
 * class of Node's CommonJS modules (`module.constructor` in a CommonJS caller): taken from the
 * caller rather than imported from node:module, whose loading (its ES module loader and source maps
 * with it) took 0.7 ms of every start. At exit, the cache is
 * written for every chunk that had none (or a stale one), after the run, so that it holds the
 * functions the run compiled, not only the top level; and for every chunk the run loaded when it is
 * of a kind not seen before (describeRun). V8 refuses a cache made under other flags than
 * its own: nothing is written once `flagsUnchanged` says the run's V8 flags changed (a cache made
 * after setting them back and forth was refused too).
 */
export function useCodeCache(bundlePath: string, moduleClass: unknown, flagsUnchanged: () => boolean = () => true): void {
  if (!nativeHelper()) return;
  // Node names a module by its real path: so must the checks below, and the chunk cache.
  const bundleDir = realpathSync(bundlePath);
  const cacheDir = join(bundleDir, '.v8-cache');
  const NodeModule = moduleClass as ModuleClass;
  const proto = NodeModule.prototype;
  const compile = proto._compile;
  const loaded: { script: Script; path: string; size: number; mtimeMs: number; cached: boolean }[] = [];
  // A chunk requiring a sibling ('./name.cjs', as rollup writes it) gets it straight from its file.
  // Node's require would first resolve the name, find its real path and look up the package scope:
  // about 0.25 ms a chunk, when a convert loaded 14 (a 1 MiB convert: 67.5 ms, 63.2 ms with this
  // and node:os and parseArgs loaded early, startup.ts; hyperfine, 40 runs). Node's own module
  // cache is used, so a chunk is one module however it was first required.
  const requireFrom = (parent: LoadedModule, id: string): unknown => {
    if (!id.startsWith('./') || !id.endsWith('.cjs') || id.includes('/', 2)) return parent.require(id);
    const filename = join(bundleDir, id.slice(2));
    const known = NodeModule._cache[filename];
    if (known) return known.exports;
    const module = new NodeModule(filename, parent);
    module.filename = filename;
    module.paths = parent.paths;
    // Cached before it runs, as Node does, so that chunks requiring each other get its exports so far.
    NodeModule._cache[filename] = module;
    let ran = false;
    try {
      module._compile(readFileSync(filename, 'utf8'), filename);
      ran = true;
    } finally {
      if (!ran) delete NodeModule._cache[filename];
    }
    module.loaded = true;
    return module.exports;
  };
  proto._compile = function (this: LoadedModule, content: string, filename: string) {
    if (dirname(filename) !== bundleDir) return compile.call(this, content, filename);
    const { size, mtimeMs } = statSync(filename);
    const path = join(cacheDir, `${basename(filename)}.v8`);
    const cachedData = readCacheFile(path, size, mtimeMs);
    const script = new Script(NodeModule.wrap(content), { filename, cachedData });
    loaded.push({ script, path, size, mtimeMs, cached: cachedData !== undefined && !script.cachedDataRejected });
    const wrapper = script.runInThisContext() as Wrapper;
    return wrapper.call(this.exports, this.exports, (id) => requireFrom(this, id), this, filename, bundleDir);
  };
  process.once('exit', () => {
    if (!flagsUnchanged()) return;
    // A kind of run not seen before renews every chunk it loaded: V8's data then holds what this run
    // compiled as well as what the cache held.
    const kind = runKind === undefined ? undefined : `${runKind}\n${loaded.map((c) => basename(c.path)).join(' ')}`;
    const marker = kind === undefined ? undefined : join(cacheDir, 'runs', (checksum(Buffer.from(kind)) >>> 0).toString(16));
    const renew = marker !== undefined && statSync(marker, { throwIfNoEntry: false }) === undefined;
    try {
      for (const { script, path, size, mtimeMs, cached } of loaded) {
        if (!cached || renew) writeCacheFile(path, script.createCachedData(), size, mtimeMs);
      }
      if (renew) {
        mkdirSync(dirname(marker), { recursive: true });
        writeFileSync(marker, kind!);
      }
    } catch {
      // a read-only install: run without a cache
    }
  });
}
