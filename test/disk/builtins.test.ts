/** randomBytes: the kernel's random bytes without node:crypto (new images' random ids). */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { randomBytes } from '../../src/disk/builtins.js';

test('randomBytes gives n bytes, different on every draw', () => {
  for (const n of [1, 16, 4096]) assert.equal(randomBytes(n).length, n);
  const draws = new Set(Array.from({ length: 64 }, () => randomBytes(16).toString('hex')));
  assert.equal(draws.size, 64, 'no two 128-bit draws are equal');
  // Every byte value turns up across 64 KiB of draws (a stuck or zero-filled source would not).
  const seen = new Set(randomBytes(65536));
  assert.equal(seen.size, 256);
});
