/**
 * bin/vmferry runs the CLI bundled into CommonJS chunks (dist/cli, rollup.config.mjs). strace shows which
 * files a run opens, so these tests see what the bundle really loads: its own chunks, and what its
 * modules find from their files in dist/src (the native helper, the compression worker).
 */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
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

test('a convert that prints nothing does not create stdout (Node would load its stream modules for it)', () => {
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
});
