import assert from 'node:assert/strict';
import { mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { MissingFileError, UnsafeReferenceError } from '../../src/disk/errors.js';
import { resolveReference } from '../../src/disk/refs.js';
import { tmpDir } from '../helpers/index.js';

function setup() {
  const dir = tmpDir();
  const image = join(dir, 'img', 'top.qcow2');
  mkdirSync(join(dir, 'img', 'sub'), { recursive: true });
  writeFileSync(image, 'x');
  writeFileSync(join(dir, 'img', 'base.raw'), 'x');
  writeFileSync(join(dir, 'img', 'sub', 'deep.raw'), 'x');
  writeFileSync(join(dir, 'outside.raw'), 'x');
  return { dir, image };
}

test('names inside the image folder resolve, subfolders included', () => {
  const { dir, image } = setup();
  assert.equal(resolveReference(image, 'base.raw', 'backing file', {}), join(dir, 'img', 'base.raw'));
  assert.equal(resolveReference(image, 'sub/deep.raw', 'backing file', {}), join(dir, 'img', 'sub', 'deep.raw'));
});

test('absolute paths, .. and Windows absolute paths are refused without --allow-external-files', () => {
  const { image } = setup();
  for (const ref of ['/etc/passwd', '../outside.raw', 'sub/../../outside.raw', 'C:\\Windows\\x.vhd', '\\\\server\\share\\x']) {
    assert.throws(() => resolveReference(image, ref, 'backing file', {}), UnsafeReferenceError, ref);
  }
});

test('with --allow-external-files an absolute path resolves, but never a device node or directory', () => {
  const { dir, image } = setup();
  assert.equal(
    resolveReference(image, join(dir, 'outside.raw'), 'backing file', { allowExternalFiles: true }),
    join(dir, 'outside.raw'),
  );
  assert.equal(resolveReference(image, '../outside.raw', 'backing file', { allowExternalFiles: true }), join(dir, 'outside.raw'));
  assert.throws(() => resolveReference(image, '/dev/zero', 'backing file', { allowExternalFiles: true }), /not a regular file/);
  assert.throws(() => resolveReference(image, '/etc', 'backing file', { allowExternalFiles: true }), /directory/);
});

test('URLs and json: specifications are always refused', () => {
  const { image } = setup();
  for (const ref of [
    'json:{"file.filename":"/etc/passwd"}',
    'nbd://127.0.0.1/x',
    'http://example.invalid/x',
    'file:/etc/passwd',
  ]) {
    assert.throws(() => resolveReference(image, ref, 'backing file', { allowExternalFiles: true }), UnsafeReferenceError, ref);
  }
});

test('a symlink inside the folder that leads out is refused', () => {
  const { dir, image } = setup();
  symlinkSync(join(dir, 'outside.raw'), join(dir, 'img', 'link.raw'));
  symlinkSync('/etc/passwd', join(dir, 'img', 'passwd'));
  assert.throws(() => resolveReference(image, 'link.raw', 'backing file', {}), /symbolic link/);
  assert.throws(() => resolveReference(image, 'passwd', 'backing file', {}), /symbolic link/);
});

test('a missing reference names what was looked for', () => {
  const { image } = setup();
  assert.throws(
    () => resolveReference(image, 'nope.qcow2', 'backing file', {}),
    (err: unknown) => {
      assert.ok(err instanceof MissingFileError);
      assert.match(err.describe(), /top\.qcow2: backing file 'nope\.qcow2' not found/);
      return true;
    },
  );
});
