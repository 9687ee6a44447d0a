/**
 * Replays every input the fuzzer ever saved (test/fuzz-regressions/<format>/<sha1>.bin, all
 * formats) through the fuzzer's own worker: info, check, map and a read through the library, in a
 * child process under the 10-second CPU watchdog and the 512 MiB RSS ceiling. Each must end in
 * success or a clean VmferryError: no crash, hang, memory blow-up or file opened outside its folder.
 */
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { savedInputs } from '../../scripts/fuzz.js';
import { repoRoot, tmpDir } from '../helpers/index.js';

const fuzzScript = join(repoRoot, 'dist/scripts/fuzz.js');

interface Replayed {
  id: string;
  outcome: string;
  ops: string[];
  detail?: string;
}

function replay(dir: string): Replayed[] {
  const r = spawnSync(process.execPath, [fuzzScript, '--replay', dir, '--json'], { encoding: 'utf8', maxBuffer: 64 << 20 });
  const last = r.stdout.trim().split('\n').pop() ?? '';
  assert.ok(last.startsWith('['), `fuzz --replay printed no result (exit ${r.status}): ${r.stderr}`);
  return JSON.parse(last) as Replayed[];
}

test('every saved fuzz input ends in success or a clean VmferryError', () => {
  const inputs = savedInputs();
  const results = replay(join(repoRoot, 'test/fuzz-regressions'));
  assert.equal(results.length, inputs.length, 'every saved input was replayed');
  const bad = results.filter((r) => r.outcome !== 'ok' && r.outcome !== 'error');
  assert.deepEqual(
    bad.map((r) => `${r.id}: ${r.outcome} ${r.detail?.split('\n')[0] ?? ''}`),
    [],
  );
});

test('the replay harness itself tells a clean error from a crash (a control input)', () => {
  // A truncated qcow2 header and an unreadable VHD footer are clean errors; a raw file reads fine.
  const dir = tmpDir('vmferry-replay-control-');
  mkdirSync(join(dir, 'qcow2'));
  mkdirSync(join(dir, 'raw'));
  const truncated = Buffer.from('514649fb00000003000000000000000000000000000000100000000000100000', 'hex');
  writeFileSync(join(dir, 'qcow2', `${'a'.repeat(40)}.bin`), truncated);
  writeFileSync(join(dir, 'raw', `${'b'.repeat(40)}.bin`), Buffer.alloc(4096, 1));
  const results = replay(dir);
  assert.equal(results.length, 2);
  const byId = new Map(results.map((r) => [r.id, r]));
  const q = byId.get(`qcow2/${'a'.repeat(40)}`)!;
  assert.equal(q.outcome, 'error', JSON.stringify(q));
  assert.ok(
    q.ops.every((o) => /: (CorruptImageError|UnsupportedFeatureError|FormatMismatchError)/.test(o)),
    q.ops.join('\n'),
  );
  assert.equal(byId.get(`raw/${'b'.repeat(40)}`)!.outcome, 'ok');
});
