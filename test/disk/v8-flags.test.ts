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

test('setV8Flags sets a V8 flag for the running process', () => {
  const native = pathToFileURL(join(repoRoot, 'dist/src/disk/native.js')).href;
  const script = `
    import { nativeHelper } from ${JSON.stringify(native)};
    const natives = () => { try { return eval('%HasFastProperties({})'); } catch (e) { return e.name; } };
    const before = natives();
    nativeHelper().setV8Flags('--allow-natives-syntax');
    process.stdout.write(JSON.stringify([before, natives()]));
  `;
  const r = run(process.execPath, ['--input-type=module', '-e', script]);
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), ['SyntaxError', true]);
});
