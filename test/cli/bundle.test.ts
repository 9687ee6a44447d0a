/**
 * bin/vmferry runs the CLI bundled into CommonJS chunks (dist/cli, rollup.config.mjs). strace shows which
 * files a run opens, so these tests see what the bundle really loads: its own chunks, and what its
 * modules find from their files in dist/src (the native helper, the compression worker).
 */
import assert from 'node:assert/strict';
import {
  closeSync,
  ftruncateSync,
  openSync,
  readdirSync,
  readFileSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { sparseRawImage } from '../helpers/images.js';
import { qemuImg, run, tmpDir, underStrace, vmferryBin } from '../helpers/index.js';

/** The files `vmferry ARGS` opened, as strace saw them. */
function filesOpenedBy(dir: string, args: string[]): string[] {
  const { calls } = underStrace(dir, 'openat', [vmferryBin, ...args]);
  return calls.flatMap((l) => /openat\([^"]*"([^"]+)"/.exec(l)?.[1] ?? []);
}

test('bin/vmferry loads the bundled CLI, not the ES modules', () => {
  const opened = filesOpenedBy(tmpDir('vmferry-bundle-'), ['--version']);
  assert.ok(
    opened.some((f) => f.endsWith('/dist/cli/main.cjs')),
    opened.join('\n'),
  );
  assert.deepEqual(
    opened.filter((f) => f.includes('/dist/src/')),
    [],
  );
});

test('the bundled CLI finds the native helper and the compression worker from its modules’ own files', () => {
  const dir = tmpDir('vmferry-bundle-');
  const src = sparseRawImage(32 * 1024 * 1024);
  const out = join(dir, 'out.qcow2');
  const opened = filesOpenedBy(dir, ['convert', '-O', 'qcow2', '-c', src, out]);
  assert.ok(
    opened.some((f) => f.endsWith('/native/build/Release/vmferry_native.node')),
    'native helper not loaded',
  );
  assert.ok(
    opened.some((f) => f.endsWith('/dist/src/convert/compress-worker.js')),
    'compression worker not started',
  );
  qemuImg('compare', '-q', '-f', 'raw', '-F', 'qcow2', src, out);
});

test('a convert that prints nothing loads neither stdout (Node would load its stream modules for it) nor node:module', () => {
  const dir = tmpDir('vmferry-bundle-');
  const preload = join(dir, 'modules.cjs');
  const list = join(dir, 'modules.txt');
  writeFileSync(
    preload,
    `process.on('exit', () => require('node:fs').writeFileSync(${JSON.stringify(list)}, process.moduleLoadList.join('\\n')));`,
  );
  const src = sparseRawImage(32 * 1024 * 1024);
  const r = run(process.execPath, ['--require', preload, vmferryBin, 'convert', '-O', 'qcow2', src, join(dir, 'out.qcow2')]);
  assert.equal(r.code, 0, r.stderr);
  const loaded = readFileSync(list, 'utf8').split('\n');
  assert.ok(loaded.includes('NativeModule fs'), 'the module list was not written');
  assert.deepEqual(
    loaded.filter((m) => m === 'NativeModule stream' || m === 'NativeModule internal/fs/sync_write_stream'),
    [],
  );
  // node:module brings Node's ES module loader and source maps (0.7 ms): the bundle needs neither.
  assert.deepEqual(
    loaded.filter((m) => m === 'NativeModule module' || m === 'NativeModule internal/modules/esm/loader'),
    [],
  );
});

/** The exit and exit_group calls of `node NODE_ARGS bin/vmferry ARGS`, as strace -f saw them. */
function exitCallsOf(dir: string, nodeArgs: string[], args: string[]): string[] {
  const { calls } = underStrace(dir, 'exit,exit_group', [...nodeArgs, vmferryBin, ...args], { unreturned: true });
  return calls.filter((l) => /\bexit(_group)?\(/.test(l));
}

test('the CLI ends without Node’s teardown, and with it when node runs with options of its own (--cpu-prof)', () => {
  const dir = tmpDir('vmferry-exit-');
  const src = sparseRawImage(8 * 1024 * 1024);
  // Node's teardown stops its platform threads (each calls exit); ending at once leaves them to exit_group.
  const plain = exitCallsOf(dir, [], ['info', src]);
  assert.equal(plain.filter((l) => /\bexit\(/.test(l)).length, 0, plain.join('\n'));
  assert.equal(plain.filter((l) => /\bexit_group\(0\)/.test(l)).length, 1, plain.join('\n'));
  const profiles = join(dir, 'profiles');
  const profiled = exitCallsOf(dir, ['--cpu-prof', '--cpu-prof-dir', profiles], ['info', src]);
  assert.ok(profiled.filter((l) => /\bexit\(/.test(l)).length >= 1, profiled.join('\n'));
  assert.equal(readdirSync(profiles).filter((f) => f.endsWith('.cpuprofile')).length, 1);
});

test('ending at once keeps the exit code and all of stdout, through a pipe read late', () => {
  const dir = tmpDir('vmferry-exit-');
  // 20,000 data extents: a map of about 1.7 MiB, far more than a pipe holds.
  const image = join(dir, 'fragmented.raw');
  const fd = openSync(image, 'w');
  ftruncateSync(fd, 20000 * 131072);
  for (let i = 0; i < 20000; i++) writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, i * 131072);
  closeSync(fd);
  const inFile = join(dir, 'map.txt');
  const throughPipe = join(dir, 'map-piped.txt');
  const direct = run(process.execPath, [vmferryBin, 'map', image]);
  assert.equal(direct.code, 0, direct.stderr);
  writeFileSync(inFile, direct.stdout);
  const piped = run('bash', [
    '-c',
    `"$0" "$1" map "$2" | { sleep 0.5; cat > "$3"; }; exit "\${PIPESTATUS[0]}"`,
    process.execPath,
    vmferryBin,
    image,
    throughPipe,
  ]);
  assert.equal(piped.code, 0, piped.stderr);
  assert.ok(statSync(inFile).size > 1024 * 1024, `map printed ${statSync(inFile).size} bytes`);
  assert.equal(readFileSync(throughPipe, 'utf8'), readFileSync(inFile, 'utf8'));
  // A failing command keeps its documented code (compare: 1 when the images differ).
  const empty = join(dir, 'empty.raw');
  writeFileSync(empty, '');
  truncateSync(empty, 20000 * 131072);
  assert.equal(run(process.execPath, [vmferryBin, 'compare', image, empty]).code, 1);
});
