// The CLI as a few CommonJS chunks in dist/cli, built from tsc's ES modules in dist/src. Node 20 starts a
// command sooner from these: it skips its ES module loader and reads a handful of files instead of dozens
// (a small convert: 0.14 s from dist/src, 0.09 s from here). dist/src stays the library the tests import.
import { rmSync } from 'node:fs';
import { dirname, relative, resolve } from 'node:path';

const outDir = resolve('dist/cli');
// Chunk names carry their content's hash: clear the last build's, and their code cache, first.
rmSync(outDir, { recursive: true, force: true });

/** Each module keeps the URL (and folder) of its own file in dist/src, so what it finds from there (the native helper, the compression worker, npm packages) is found as before. */
const moduleUrls = {
  name: 'module-urls',
  resolveImportMeta(property, { chunkId, moduleId }) {
    const fromChunk = relative(dirname(resolve(outDir, chunkId)), moduleId);
    if (property === 'dirname') return `require('node:path').join(__dirname, ${JSON.stringify(dirname(fromChunk))})`;
    if (property !== 'url') return null;
    return `require('node:url').pathToFileURL(require('node:path').join(__dirname, ${JSON.stringify(fromChunk)})).href`;
  },
};

/**
 * In the bundle, a module's createRequire(import.meta.url) is the chunk's own require, which finds
 * the same packages from dist/cli; node:module itself is then never loaded (its ES module loader
 * and source maps come with it: 0.7 ms of every start).
 */
const chunkRequire = {
  name: 'chunk-require',
  transform(code) {
    return code.includes('createRequire(import.meta.url)') ? code.replaceAll('createRequire(import.meta.url)', 'require') : null;
  },
};

export default {
  input: { main: 'dist/src/cli/main.js', startup: 'dist/src/cli/startup.js', 'code-cache': 'dist/src/cli/code-cache.js' },
  // Node's built-in modules and the npm dependencies stay require() calls.
  external: (id) => !id.startsWith('.') && !id.startsWith('/'),
  plugins: [chunkRequire, moduleUrls],
  // node:module is imported for createRequire only, which chunkRequire takes out.
  treeshake: { moduleSideEffects: (id, external) => !(external && id === 'node:module') },
  output: {
    // What bin/vmferry loads before the code cache is in place, in one chunk: Node compiles it
    // uncached, and each file it requires costs about 0.25 ms more (a 1 MiB convert: 0.056 s, 0.054 s
    // in one chunk instead of three, 40 alternating runs).
    // Then the small modules every command loads go with main's own (it loaded them as six chunks
    // more), and the convert command with the copy pipeline it runs.
    manualChunks: (id) => {
      if (/\/(disk\/native|cli\/code-cache|cli\/startup)\.js$/.test(id)) return 'startup';
      if (/\/(disk\/(errors|source|sink|options|chain|zero|types|registry|zstd)|cli\/(common|main|progress)|transfer\/nbd\/register)\.js$/.test(id)) return 'core';
      if (/\/(convert\/pipeline|ops\/convert|cli\/convert)\.js$/.test(id)) return 'convert';
      return undefined;
    },
    dir: outDir,
    format: 'cjs',
    entryFileNames: '[name].cjs',
    chunkFileNames: '[name]-[hash].cjs',
    generatedCode: 'es2015',
  },
};
