/**
 * The bundled CLI's code cache (src/cli/code-cache.ts), tried on a small bundle of its own in a temp
 * folder: strace shows which cache files a run reads and writes, and the program's output shows that
 * the code that ran is the code on disk.
 */
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, readFileSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { readCacheFile, writeCacheFile } from '../../src/cli/code-cache.js';
import { repoRoot, run, tmpDir, underStrace } from '../helpers/index.js';

/** A two-chunk bundle and a launcher that loads it the way bin/vmferry loads dist/cli. */
function smallBundle(): { dir: string; launcher: string } {
  const dir = tmpDir('vmferry-codecache-');
  const bundle = join(dir, 'bundle');
  writeFileSync(join(dir, 'package.json'), '{ "type": "commonjs" }');
  mkdirSync(bundle);
  writeFileSync(join(bundle, 'main.cjs'), "exports.say = () => 'main+' + require('./part.cjs').word();\n");
  writeFileSync(join(bundle, 'part.cjs'), "exports.word = () => 'one';\n");
  const launcher = join(dir, 'launch.cjs');
  writeFileSync(
    launcher,
    `require(${JSON.stringify(join(repoRoot, 'dist/cli/code-cache.cjs'))}).useCodeCache(${JSON.stringify(bundle)}, module.constructor);\n` +
      `process.stdout.write(require(${JSON.stringify(join(bundle, 'main.cjs'))}).say());\n`,
  );
  return { dir, launcher };
}

/** Runs the launcher under strace: its output, and the cache files it read and wrote. */
function launch(dir: string, launcher: string, args: string[] = []): { output: string; read: string[]; written: string[] } {
  const { stdout, calls: lines } = underStrace(dir, 'openat,rename', [launcher, ...args]);
  const name = (l: string) => /\.v8-cache\/([^".]+\.cjs)\.v8/.exec(l)?.[1];
  return {
    output: stdout,
    read: lines.filter((l) => l.includes('openat') && l.includes('O_RDONLY')).flatMap((l) => name(l) ?? []),
    written: lines.filter((l) => /rename\(.*\.tmp", ".*\.v8"\)/.test(l)).flatMap((l) => name(l.split('", "')[1]!) ?? []),
  };
}

test('the first run writes a cache for each chunk; the next reads them and writes none', () => {
  const { dir, launcher } = smallBundle();
  const first = launch(dir, launcher);
  assert.equal(first.output, 'main+one');
  assert.deepEqual(first.written.sort(), ['main.cjs', 'part.cjs']);
  const second = launch(dir, launcher);
  assert.equal(second.output, 'main+one');
  assert.deepEqual(second.read.sort(), ['main.cjs', 'part.cjs']);
  assert.deepEqual(second.written, [], 'V8 rejected a cache it had written, or it was not read');
});

test('a run of a kind not seen before renews the caches of the chunks it loaded, with what it compiled', () => {
  // Each kind of run calls a function of its own: the cache the first run wrote does not hold the other's.
  const dir = tmpDir('vmferry-codecache-');
  const bundle = join(dir, 'bundle');
  writeFileSync(join(dir, 'package.json'), '{ "type": "commonjs" }');
  mkdirSync(bundle);
  writeFileSync(
    join(bundle, 'main.cjs'),
    'exports.sum = () => [1, 2, 3].reduce((a, b) => a + b, 0);\n' +
      "exports.keys = () => Object.keys({ a: 1, b: 2, c: 3 }).map((k) => k.toUpperCase()).join('');\n",
  );
  const launcher = join(dir, 'launch.cjs');
  writeFileSync(
    launcher,
    `const cache = require(${JSON.stringify(join(repoRoot, 'dist/cli/code-cache.cjs'))});\n` +
      `cache.useCodeCache(${JSON.stringify(bundle)}, module.constructor);\n` +
      'cache.describeRun(process.argv[2]);\n' +
      `process.stdout.write(String(require(${JSON.stringify(join(bundle, 'main.cjs'))})[process.argv[2]]()));\n`,
  );
  const cacheFile = join(bundle, '.v8-cache/main.cjs.v8');
  const first = launch(dir, launcher, ['sum']);
  assert.equal(first.output, '6');
  assert.deepEqual(first.written, ['main.cjs']);
  const before = statSync(cacheFile).size;
  const other = launch(dir, launcher, ['keys']);
  assert.equal(other.output, 'ABC');
  assert.deepEqual(other.read, ['main.cjs']);
  assert.deepEqual(other.written, ['main.cjs'], 'a new kind of run did not renew the cache');
  assert.ok(statSync(cacheFile).size > before, 'the renewed cache holds no more than the first');
  for (const kind of ['keys', 'sum']) {
    const again = launch(dir, launcher, [kind]);
    assert.deepEqual(again.read, ['main.cjs']);
    assert.deepEqual(again.written, [], `a kind seen before (${kind}) rewrote the cache`);
  }
});

test('a chunk edited to the same length runs as edited, and its cache is renewed', () => {
  // V8 checks only a source's length against its cache: the size and time in our header must catch this.
  const { dir, launcher } = smallBundle();
  launch(dir, launcher);
  writeFileSync(join(dir, 'bundle/part.cjs'), "exports.word = () => 'two';\n");
  const edited = launch(dir, launcher);
  assert.equal(edited.output, 'main+two');
  assert.deepEqual(edited.written, ['part.cjs']);
});

test('a damaged cache file is ignored and rewritten', () => {
  const { dir, launcher } = smallBundle();
  launch(dir, launcher);
  const cache = join(dir, 'bundle/.v8-cache/main.cjs.v8');
  const bytes = readFileSync(cache);
  bytes[bytes.length - 7] ^= 0x40;
  writeFileSync(cache, bytes);
  const after = launch(dir, launcher);
  assert.equal(after.output, 'main+one');
  assert.deepEqual(after.written, ['main.cjs']);
});

test('cache files: what is written is read back; another size, time, a flipped bit or a cut file is refused', () => {
  const dir = tmpDir('vmferry-codecache-');
  const path = join(dir, 'sub/x.cjs.v8');
  const data = Buffer.from('some bytes V8 wrote, of no particular length');
  writeCacheFile(path, data, 1234, 1700000000123.5);
  assert.deepEqual(readCacheFile(path, 1234, 1700000000123.5), data);
  assert.equal(readCacheFile(path, 1235, 1700000000123.5), undefined);
  assert.equal(readCacheFile(path, 1234, 1700000000124.5), undefined);
  const whole = readFileSync(path);
  for (const at of [30, whole.length - 1]) {
    const flipped = Buffer.from(whole);
    flipped[at] ^= 1;
    writeFileSync(path, flipped);
    assert.equal(readCacheFile(path, 1234, 1700000000123.5), undefined, `bit flipped at ${at}`);
  }
  writeFileSync(path, whole.subarray(0, whole.length - 3));
  assert.equal(readCacheFile(path, 1234, 1700000000123.5), undefined);
  assert.equal(readCacheFile(join(dir, 'missing.v8'), 1234, 1), undefined);
});

test('the CLI keeps its cache beside the bundle', () => {
  const r = run(process.execPath, [join(repoRoot, 'bin/vmferry'), '--version']);
  assert.equal(r.code, 0, r.stderr);
  assert.ok(existsSync(join(repoRoot, 'dist/cli/.v8-cache/main.cjs.v8')));
});

/**
 * A bundle whose chunks require each other the way rollup writes it ('./name.cjs'), loaded by a
 * launcher that also requires one of them itself, the way bin/vmferry requires startup.cjs.
 */
function siblingBundle(files: Record<string, string>, launch: string): { dir: string; launcher: string } {
  const dir = tmpDir('vmferry-codecache-');
  const bundle = join(dir, 'bundle');
  writeFileSync(join(dir, 'package.json'), '{ "type": "commonjs" }');
  mkdirSync(bundle);
  for (const [name, text] of Object.entries(files)) writeFileSync(join(bundle, name), text);
  const launcher = join(dir, 'launch.cjs');
  writeFileSync(
    launcher,
    `const bundle = process.argv[2] ?? ${JSON.stringify(bundle)};\n` +
      `require(${JSON.stringify(join(repoRoot, 'dist/cli/code-cache.cjs'))}).useCodeCache(bundle, module.constructor);\n` +
      launch,
  );
  return { dir, launcher };
}

test('a chunk is one module, whether the launcher or a sibling chunk requires it first', () => {
  const { launcher } = siblingBundle(
    {
      'state.cjs': 'exports.count = 0;\nexports.bump = () => ++exports.count;\n',
      'a.cjs': "const s = require('./state.cjs');\nexports.run = () => s.bump();\n",
      'b.cjs': "const s = require('./state.cjs');\nconst { sep } = require('node:path');\nexports.run = () => s.bump() + sep;\n",
    },
    // Launcher first, then two chunks: one counter, bumped three times.
    "const { join } = require('node:path');\n" +
      "const state = require(join(bundle, 'state.cjs'));\n" +
      'state.bump();\n' +
      "process.stdout.write([require(join(bundle, 'a.cjs')).run(), require(join(bundle, 'b.cjs')).run(), state.count].join(' '));\n",
  );
  for (let i = 0; i < 2; i++) {
    const r = run(process.execPath, [launcher]);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, '2 3/ 3', `run ${i + 1}`);
  }
});

test('chunks that require each other in a cycle see each other as Node would show them', () => {
  const { launcher } = siblingBundle(
    {
      'main.cjs':
        "exports.early = 'main-early';\nconst other = require('./other.cjs');\nexports.late = 'main-late';\nexports.say = () => other.seen + ' ' + other.now();\n",
      'other.cjs':
        "const main = require('./main.cjs');\nexports.seen = String(main.early) + '/' + String(main.late);\nexports.now = () => main.late;\n",
    },
    "process.stdout.write(require(require('node:path').join(bundle, 'main.cjs')).say());\n",
  );
  // What Node's own require gives: the exports so far while main.cjs is still loading.
  const r = run(process.execPath, [launcher]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, 'main-early/undefined main-late');
});

test('a chunk that throws while loading is not kept: a second require runs it again', () => {
  const { launcher } = siblingBundle(
    {
      'flaky.cjs':
        "globalThis.tries = (globalThis.tries ?? 0) + 1;\nif (globalThis.tries === 1) throw new Error('first time');\nexports.ok = globalThis.tries;\n",
      'main.cjs': "exports.get = () => { try { return require('./flaky.cjs').ok; } catch (e) { return e.message; } };\n",
    },
    "const m = require(require('node:path').join(bundle, 'main.cjs'));\nprocess.stdout.write([m.get(), m.get(), m.get()].join(', '));\n",
  );
  const r = run(process.execPath, [launcher]);
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout, 'first time, 2, 2');
});

test('a bundle reached through a symbolic link is cached, and its chunks loaded once', () => {
  const { dir, launcher } = siblingBundle(
    {
      'state.cjs': 'exports.count = 0;\n',
      'main.cjs': "const s = require('./state.cjs');\nexports.say = () => ++s.count;\n",
    },
    "const { join } = require('node:path');\n" +
      "const n = require(join(bundle, 'main.cjs')).say();\n" +
      "process.stdout.write([n, require(join(bundle, 'state.cjs')).count].join(' '));\n",
  );
  const link = join(dir, 'linked');
  symlinkSync(join(dir, 'bundle'), link);
  const first = underStrace(dir, 'openat,rename', [launcher, link]);
  assert.equal(first.stdout, '1 1');
  const second = underStrace(dir, 'openat,rename', [launcher, link]);
  assert.equal(second.stdout, '1 1');
  const cacheReads = second.calls.filter((l) => l.includes('.v8-cache/') && l.includes('O_RDONLY') && !l.includes('ENOENT'));
  assert.equal(cacheReads.length, 2, second.calls.join('\n'));
});
