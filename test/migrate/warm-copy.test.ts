/** The warm sync's working copy (src/migrate/warm/copy.ts). */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { pwriteSizes, repoRoot, tmpDir, underStrace } from '../helpers/index.js';

test('the working copy writes a 4 MiB chunk 256 KiB a write(2) at most, and holds it', () => {
  // One write(2) of a whole chunk took page-cache folios as large as itself, several times slower
  // to get on this project's VMs (sink.ts, WRITE_STEP).
  const dir = tmpDir();
  const path = join(dir, 'work.raw');
  const copy = join(repoRoot, 'dist/src/migrate/warm/copy.js');
  const script = `
    import { readFileSync } from 'node:fs';
    import { WorkFile } from ${JSON.stringify(copy)};
    const work = WorkFile.open(${JSON.stringify(path)}, 8 << 20);
    const chunk = Buffer.alloc(4 << 20, 0x3c);
    work.write(1 << 20, chunk);
    work.close();
    const got = readFileSync(${JSON.stringify(path)});
    process.stdout.write(String(got.length === 8 << 20 && got.subarray(1 << 20, 5 << 20).equals(chunk) && !got.subarray(0, 1 << 20).some((b) => b)));`;
  const { stdout, calls } = underStrace(dir, 'pwrite64', ['--input-type=module', '-e', script]);
  assert.equal(stdout, 'true', 'the file holds the chunk where it was written');
  const sizes = pwriteSizes(calls);
  assert.equal(
    sizes.reduce((a, b) => a + b, 0),
    4 << 20,
    `the writes add up to the chunk (${sizes.length} writes)`,
  );
  assert.ok(Math.max(...sizes) <= 256 * 1024, `largest write(2): ${Math.max(...sizes)} bytes`);
});
