/**
 * The native helper's setV8Flags, tried in a child process (V8's flags are the whole process's): a
 * flag it sets changes what V8 accepts, as on node's command line. --allow-natives-syntax is used
 * because its effect is visible at once: `%` calls compile only with it.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { pathToFileURL } from 'node:url';
import { repoRoot, run } from '../helpers/index.js';

/** Runs `body` in a child process with the native module imported, and returns what it printed. */
function inChild(body: string): unknown {
  const native = pathToFileURL(join(repoRoot, 'dist/src/disk/native.js')).href;
  const script = `
    import { nativeHelper, restoreV8Flags, setV8FlagsUntilWorkers } from ${JSON.stringify(native)};
    const natives = () => { try { return eval('%HasFastProperties({})'); } catch (e) { return e.name; } };
    ${body}
  `;
  const r = run(process.execPath, ['--input-type=module', '-e', script]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

test('setV8Flags sets a V8 flag for the running process', () => {
  const seen = inChild(`
    const before = natives();
    nativeHelper().setV8Flags('--allow-natives-syntax');
    process.stdout.write(JSON.stringify([before, natives()]));
  `);
  assert.deepEqual(seen, ['SyntaxError', true]);
});

test('flags set until workers start are undone by restoreV8Flags, once', () => {
  const seen = inChild(`
    const set = setV8FlagsUntilWorkers('--allow-natives-syntax', '--no-allow-natives-syntax');
    const during = natives();
    restoreV8Flags();
    const after = natives();
    nativeHelper().setV8Flags('--allow-natives-syntax');
    restoreV8Flags();
    process.stdout.write(JSON.stringify([set, during, after, natives()]));
  `);
  assert.deepEqual(seen, [true, true, 'SyntaxError', true]);
});
