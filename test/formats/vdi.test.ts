/** VDI: corpus image, round trips against qemu-img (convert, compare, check), differencing chains, bad input. */
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, statSync, unlinkSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { copyDisk } from '../../src/convert/pipeline.js';
import { collectExtents } from '../../src/disk/chain.js';
import { CorruptImageError, MissingFileError, UnsupportedFeatureError, UsageError } from '../../src/disk/errors.js';
import { openImage, probeFile } from '../../src/disk/registry.js';
import { rawDriver } from '../../src/formats/raw/index.js';
import { vdiDriver } from '../../src/formats/vdi/index.js';
import { realisticRawImage, sparseRawImage } from '../helpers/images.js';
import { corpusFile, patternBuffer, qemuImg, run, sha256, sha256File, sha256OfReader, tmpDir } from '../helpers/index.js';
import { allocatedBytes, convertWith, GiB, MiB, qemuVirtualSize, TiB } from './vpc-common.js';

test('corpus virtualbox/basic.vdi: README content hash, 10 MiB, 1 MiB blocks', async () => {
  const path = corpusFile('virtualbox/basic.vdi.gz', tmpDir());
  assert.equal((await probeFile(path)).driver.name, 'vdi');
  const r = await openImage(path);
  try {
    assert.equal(r.format, 'vdi');
    assert.equal(r.virtualSize, 10485760);
    assert.equal(r.details.clusterSize, MiB);
    assert.equal(await sha256OfReader(r), '92d551781f9b62f3c8601ffd375cc7547efb1127e3cd2acc652f50f2d31afb8c');
  } finally {
    await r.close();
  }
  const check = await vdiDriver.check!(path, {});
  assert.equal(check.corruptions, 0, check.messages.join('\n'));
});

for (const variant of ['dynamic', 'static']) {
  const opts = variant === 'static' ? ['-o', 'static=on'] : [];
  test(`qemu-img's ${variant} VDI of the realistic disk reads identically in vmferry`, async () => {
    const src = realisticRawImage();
    const out = join(tmpDir(), `q-${variant}.vdi`);
    qemuImg('convert', '-f', 'raw', '-O', 'vdi', ...opts, src, out);
    const r = await openImage(out);
    try {
      assert.equal(r.virtualSize, statSync(src).size);
      assert.equal(await sha256OfReader(r), await sha256File(src));
    } finally {
      await r.close();
    }
  });

  test(`vmferry's ${variant} VDI of the realistic disk passes qemu-img check and compares identical`, async () => {
    const src = realisticRawImage();
    const out = join(tmpDir(), `v-${variant}.vdi`);
    const w = await convertWith(src, vdiDriver, out, variant === 'static' ? { static: 'on' } : {});
    assert.equal(w.virtualSize, statSync(src).size);
    assert.equal(qemuVirtualSize(out, 'vdi'), statSync(src).size);
    const chk = run('qemu-img', ['check', '-f', 'vdi', out]);
    assert.equal(chk.code, 0, chk.stdout + chk.stderr);
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'vdi', src, out]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    const ours = await vdiDriver.check!(out, {});
    assert.equal(ours.corruptions, 0, ours.messages.join('\n'));
    if (variant === 'dynamic') assert.ok(statSync(out).size < 80 * MiB, `only used blocks stored (${statSync(out).size})`);
    else assert.equal(statSync(out).size, MiB + 256 * MiB); // header and map padded to 1 MiB, then every block
  });
}

test('4 TiB sparse disk: qemu-img dynamic VDI -> vmferry, and vmferry dynamic VDI -> qemu-img check/compare', async () => {
  const src = sparseRawImage(4 * TiB);
  const dir = tmpDir();
  const q = join(dir, 'q.vdi');
  qemuImg('convert', '-f', 'raw', '-O', 'vdi', src, q);
  const r = await openImage(q);
  try {
    assert.equal(r.virtualSize, 4 * TiB);
    const extents = await collectExtents(r.extents());
    assert.ok(extents.length <= 8, `a sparse 4 TiB VDI maps in a few extents (${extents.length})`);
    const back = join(dir, 'back.raw');
    const w = await rawDriver.create!(back, r.virtualSize, { options: {} });
    await copyDisk(r, w);
    await w.finish();
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, back]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  } finally {
    await r.close();
  }
  const v = join(dir, 'v.vdi');
  await convertWith(src, vdiDriver, v);
  const chk = run('qemu-img', ['check', '-f', 'vdi', v]);
  assert.equal(chk.code, 0, chk.stdout + chk.stderr);
  const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'vdi', src, v]);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  // 16 MiB of block map (4 Mi entries), padded to 1 MiB, plus the 4 data blocks.
  assert.ok(statSync(v).size <= 17 * MiB + 4 * MiB + MiB, `size ${statSync(v).size}`);
});

test('vmferry static VDI of a 3 GiB sparse disk keeps zero ranges as holes and compares identical', async () => {
  const src = sparseRawImage(3 * GiB);
  const out = join(tmpDir(), 's.vdi');
  await convertWith(src, vdiDriver, out, { static: 'on' });
  assert.ok(allocatedBytes(out) < 32 * MiB, 'zero ranges left as holes');
  const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'vdi', src, out]);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
});

/** Writes into a raw file with plain fs calls (the expected merge). */
function rawWrite(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  writeSync(fd, data, 0, data.length, offset);
  closeSync(fd);
}

/**
 * A differencing VDI as VirtualBox lays it out: a dynamic image whose type is 4 and whose link
 * UUID is the parent's creation UUID; block 5 is marked zero (0xfffffffe) to hide the parent.
 */
async function makeVdiChain(dir: string) {
  const size = 8 * MiB;
  const expected = join(dir, 'expected.raw');
  writeFileSync(expected, Buffer.alloc(size));
  const parentPath = join(dir, 'base.vdi');
  const p = await vdiDriver.create!(parentPath, size, { options: {} });
  for (const [off, seed] of [
    [0, 1],
    [MiB, 2],
    [5 * MiB, 3],
    [6 * MiB, 4],
  ] as const) {
    const data = patternBuffer(MiB, seed);
    await p.write(off, data);
    rawWrite(expected, off, data);
  }
  await p.finish();
  const childPath = join(dir, 'snapshot.vdi');
  const c = await vdiDriver.create!(childPath, size, { options: {} });
  for (const [off, len, seed] of [
    [MiB, MiB, 10],
    [3 * MiB + 4096, 8192, 11],
  ] as const) {
    const data = patternBuffer(len, seed);
    await c.write(off, data);
    rawWrite(expected, off, data);
  }
  await c.finish();
  rawWrite(expected, 5 * MiB, Buffer.alloc(MiB));
  const child = readFileSync(childPath);
  const parent = readFileSync(parentPath);
  child.writeUInt32LE(4, 76); // differencing
  parent.copy(child, 424, 392, 408); // link UUID = parent's creation UUID
  parent.copy(child, 440, 408, 424); // parent modification UUID
  child.writeUInt32LE(0xfffffffe, 512 + 5 * 4); // block 5 reads as zeros
  writeFileSync(childPath, child);
  // A decoy in the same folder with another UUID.
  const decoy = await vdiDriver.create!(join(dir, 'other.vdi'), size, { options: {} });
  await decoy.finish();
  return { parentPath, childPath, expected };
}

test('differencing VDI: parent found by UUID in the folder; free blocks fall through, zero blocks hide it', async () => {
  const dir = tmpDir();
  const { parentPath, childPath, expected } = await makeVdiChain(dir);
  const r = await openImage(childPath);
  try {
    assert.equal(r.details.fullBackingFilename, parentPath);
    assert.equal(await sha256OfReader(r), await sha256File(expected));
    const own = await collectExtents(r.extents());
    assert.deepEqual(
      own.map((e) => [e.offset / MiB, e.length / MiB, e.kind]),
      [
        [0, 1, 'unallocated'],
        [1, 1, 'data'],
        [2, 1, 'unallocated'],
        [3, 1, 'data'],
        [4, 1, 'unallocated'],
        [5, 1, 'zero'],
        [6, 2, 'unallocated'],
      ],
    );
  } finally {
    await r.close();
  }
  // The parent named explicitly (-B) works the same.
  const r2 = await vdiDriver.open(childPath, { backingFile: parentPath });
  try {
    assert.equal(await sha256OfReader(r2), await sha256File(expected));
  } finally {
    await r2.close();
  }
  unlinkSync(parentPath);
  await assert.rejects(openImage(childPath), MissingFileError);
});

test('bad VDI headers: absurd block count, bad block size, block map past the end -> CorruptImageError', async () => {
  const dir = tmpDir();
  const good = join(dir, 'good.vdi');
  const w = await vdiDriver.create!(good, 4 * MiB, { options: {} });
  await w.write(0, patternBuffer(MiB, 1));
  await w.finish();
  const file = readFileSync(good);
  const variants: [string, (b: Buffer) => void, RegExp][] = [
    ['absurd block count', (b) => b.writeUInt32LE(0x3ffffff0, 384), /block map .* beyond the end of the file/],
    ['block count over the limit', (b) => b.writeUInt32LE(0xffffffff, 384), /exceeds the format's limit/],
    ['block size not a power of two', (b) => b.writeUInt32LE(3 * MiB, 376), /block size/],
    ['disk larger than its blocks', (b) => b.writeBigUInt64LE(BigInt(1024 * MiB), 368), /needs more than its/],
  ];
  for (const [name, patch, message] of variants) {
    const b = Buffer.from(file);
    patch(b);
    const path = join(dir, `${name.replace(/ /g, '-')}.vdi`);
    writeFileSync(path, b);
    await assert.rejects(vdiDriver.open(path, {}), (err: unknown) => {
      assert.ok(err instanceof CorruptImageError, `${name}: ${err}`);
      assert.match(err.message, message, name);
      assert.equal(err.file, path);
      return true;
    });
  }
});

test('block map entries duplicated or beyond the file: reads refuse, check agrees with qemu-img check', async () => {
  const dir = tmpDir();
  const good = join(dir, 'good.vdi');
  const w = await vdiDriver.create!(good, 4 * MiB, { options: {} });
  for (let i = 0; i < 3; i++) await w.write(i * MiB, patternBuffer(MiB, i + 1));
  await w.finish();
  const file = readFileSync(good);

  const dup = Buffer.from(file);
  dup.writeUInt32LE(dup.readUInt32LE(512 + 4), 512 + 8); // block 2 -> block 1's data
  const dupPath = join(dir, 'dup.vdi');
  writeFileSync(dupPath, dup);
  const c1 = await vdiDriver.check!(dupPath, {});
  assert.ok(c1.corruptions >= 1, c1.messages.join('\n'));
  assert.equal(run('qemu-img', ['check', '-f', 'vdi', dupPath]).code, 2, 'qemu-img check also sees corruption');

  const beyond = Buffer.from(file);
  beyond.writeUInt32LE(1000, 512 + 4);
  const beyondPath = join(dir, 'beyond.vdi');
  writeFileSync(beyondPath, beyond);
  const r = await openImage(beyondPath);
  try {
    await assert.rejects(r.read(MiB, 512), CorruptImageError);
    assert.equal(sha256(await r.read(0, MiB)), sha256(patternBuffer(MiB, 1)));
  } finally {
    await r.close();
  }
  const c2 = await vdiDriver.check!(beyondPath, {});
  assert.ok(c2.corruptions >= 1, c2.messages.join('\n'));
  assert.equal(run('qemu-img', ['check', '-f', 'vdi', beyondPath]).code, 2, 'qemu-img check also sees corruption');
});

test('options: unknown -o refused, preallocation needs static, dynamic VDI to a pipe refused', async () => {
  const dir = tmpDir();
  await assert.rejects(vdiDriver.create!(join(dir, 'a.vdi'), MiB, { options: { subformat: 'fixed' } }), UsageError);
  await assert.rejects(vdiDriver.create!(join(dir, 'b.vdi'), MiB, { options: { preallocation: 'full' } }), UsageError);
  await assert.rejects(vdiDriver.create!(join(dir, 'c.vdi'), MiB, { options: { static: 'maybe' } }), UsageError);
  await assert.rejects(vdiDriver.create!('-', MiB, { options: {} }), UnsupportedFeatureError);
  const full = join(dir, 'full.vdi');
  const w = await vdiDriver.create!(full, 3 * MiB, { options: { static: 'on', preallocation: 'full' } });
  await w.zero(0, 3 * MiB);
  await w.finish();
  assert.ok(allocatedBytes(full) >= 3 * MiB, 'preallocation=full writes every block');
  assert.equal(run('qemu-img', ['check', '-f', 'vdi', full]).code, 0);
});

test('zero() clears blocks that hold data and skips free ones, on a sparse 1 TiB disk too', async () => {
  const dir = tmpDir();
  const out = join(dir, 'z.vdi');
  const size = 1024 * 1024 * MiB;
  const w = await vdiDriver.create!(out, size, { options: {} });
  const data = Buffer.alloc(2 * MiB, 0x6b);
  await w.write(0, data);
  await w.write(size - MiB, data.subarray(0, MiB));
  await w.zero(512 * 1024, size - MiB - 512 * 1024); // from inside block 0 up to the last block
  await w.finish();
  assert.equal(run('qemu-img', ['check', '-f', 'vdi', out]).code, 0);
  const headAndTail = (skipMiB: number) => {
    const part = join(dir, `part-${skipMiB}.raw`);
    qemuImg('dd', '-f', 'vdi', '-O', 'raw', `if=${out}`, `of=${part}`, 'bs=1M', `skip=${skipMiB}`, 'count=2');
    return readFileSync(part);
  };
  const head = headAndTail(0);
  assert.ok(head.subarray(0, 512 * 1024).every((b) => b === 0x6b));
  assert.ok(head.subarray(512 * 1024).every((b) => b === 0));
  // The last block was not in the zeroed range: its data stays.
  const tail = headAndTail(1024 * 1024 - 2);
  assert.ok(tail.subarray(0, MiB).every((b) => b === 0));
  assert.ok(tail.subarray(MiB).every((b) => b === 0x6b));
});
