/** VHD (vpc): Hyper-V corpus images, round trips against qemu-img, vhdiinfo and pyvhdi, bad input. */
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync, readSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { copyDisk } from '../../src/convert/pipeline.js';
import { collectExtents } from '../../src/disk/chain.js';
import { CorruptImageError, UnsafeReferenceError, UnsupportedFeatureError, UsageError } from '../../src/disk/errors.js';
import { nativeHelper } from '../../src/disk/native.js';
import { openImage, probeFile } from '../../src/disk/registry.js';
import { rawDriver } from '../../src/formats/raw/index.js';
import { azureSize, vpcDriver } from '../../src/formats/vpc/index.js';
import { decodeDynHeader, encodeDynHeader, vhdChecksum } from '../../src/formats/vpc/layout.js';
import { realisticRawImage, sparseRawImage } from '../helpers/images.js';
import {
  corpusFile,
  patternBuffer,
  qemuImg,
  run,
  runOk,
  sha256,
  sha256File,
  sha256OfReader,
  sha256ViaLibyal,
  tmpDir,
} from '../helpers/index.js';
import { allocatedBytes, convertWith, MiB, qemuVirtualSize, sha256Padded, TiB } from './vpc-common.js';

test('corpus hyperv/dynamic.vhd: README content hash, 10 MiB, 2 MiB blocks; pyvhdi agrees', async () => {
  const path = corpusFile('hyperv/dynamic.vhd.gz', tmpDir());
  const expected = 'ecff2ef6615a3cddc6a6885f1c6d9cf13a232697e1dc6575f2c2f01f57247784';
  const r = await openImage(path);
  try {
    assert.equal(r.format, 'vpc');
    assert.equal(r.virtualSize, 10485760);
    assert.equal(r.details.clusterSize, 2 * MiB);
    assert.equal(await sha256OfReader(r), expected);
  } finally {
    await r.close();
  }
  assert.equal(sha256ViaLibyal('pyvhdi', path), expected);
});

test('corpus hyperv/fixed.vhd: probed as vpc (not raw), virtual size 10485760 from current_size, README hash', async () => {
  const path = corpusFile('hyperv/fixed.vhd.gz', tmpDir());
  assert.equal((await probeFile(path)).driver.name, 'vpc');
  const r = await openImage(path);
  try {
    assert.equal(r.virtualSize, 10485760);
    assert.equal((r.details.formatSpecific!.data as Record<string, unknown>)['size-rule'], 'current_size');
    assert.equal(await sha256OfReader(r), '459325ab1fcd1d5ec9854cba790ee26378317cda177ffc1072008a1df88e6463');
  } finally {
    await r.close();
  }
  // qemu-img agrees on the size when told the format (its probe only looks at offset 0).
  assert.equal(qemuVirtualSize(path, 'vpc'), 10485760);
});

for (const subformat of ['dynamic', 'fixed']) {
  test(`qemu-img's ${subformat} VHD of the realistic disk reads identically in vmferry (size as qemu reports it)`, async () => {
    const src = realisticRawImage();
    const out = join(tmpDir(), `q-${subformat}.vhd`);
    qemuImg('convert', '-f', 'raw', '-O', 'vpc', '-o', `subformat=${subformat}`, src, out);
    const qsize = qemuVirtualSize(out, 'vpc');
    const r = await openImage(out);
    try {
      assert.equal(r.format, 'vpc');
      assert.equal(r.virtualSize, qsize);
      assert.equal(await sha256OfReader(r), await sha256Padded(src, qsize));
    } finally {
      await r.close();
    }
  });

  test(`vmferry's ${subformat} VHD of the realistic disk reads identically in qemu-img, vhdiinfo and pyvhdi`, async () => {
    const src = realisticRawImage();
    const out = join(tmpDir(), `v-${subformat}.vhd`);
    const w = await convertWith(src, vpcDriver, out, { subformat });
    // Without force_size the disk grows to its CHS geometry, exactly as qemu-img's own vpc does.
    assert.equal(w.virtualSize, qemuVirtualSize(out, 'vpc'));
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'vpc', src, out]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
    const info = runOk('vhdiinfo', [out]);
    assert.match(info, new RegExp(`Media size\\s*:.*\\(${w.virtualSize} bytes\\)`));
    assert.match(info, subformat === 'fixed' ? /Disk type\s*:\s*Fixed/ : /Disk type\s*:\s*Dynamic/);
    assert.equal(sha256ViaLibyal('pyvhdi', out), await sha256Padded(src, w.virtualSize));
    if (subformat === 'dynamic') assert.ok(statSync(out).size < 80 * MiB, 'dynamic VHD stores only used blocks');
    else assert.equal(statSync(out).size, w.virtualSize + 512);
    const check = await vpcDriver.check!(out, {});
    assert.equal(check.corruptions, 0, check.messages.join('\n'));
  });
}

test('1 TiB sparse disk: qemu-img dynamic VHD -> vmferry and vmferry dynamic VHD -> qemu-img, both cheap', async () => {
  const src = sparseRawImage(TiB);
  const dir = tmpDir();
  // qemu-img's output read by vmferry, written back to raw and compared by qemu-img.
  const q = join(dir, 'q.vhd');
  qemuImg('convert', '-f', 'raw', '-O', 'vpc', src, q);
  const r = await openImage(q);
  try {
    assert.equal(r.virtualSize, TiB);
    const extents = await collectExtents(r.extents());
    assert.ok(extents.length <= 8, `a sparse 1 TiB VHD maps in a few extents (${extents.length})`);
    const back = join(dir, 'back.raw');
    const w = await rawDriver.create!(back, r.virtualSize, { options: {} });
    await copyDisk(r, w);
    await w.finish();
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, back]);
    assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  } finally {
    await r.close();
  }
  // vmferry's output read by qemu-img and vhdiinfo.
  const v = join(dir, 'v.vhd');
  const w = await convertWith(src, vpcDriver, v);
  assert.equal(w.virtualSize, TiB);
  assert.equal(qemuVirtualSize(v, 'vpc'), TiB);
  const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'vpc', src, v]);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  assert.match(runOk('vhdiinfo', [v]), new RegExp(`Media size\\s*:.*\\(${TiB} bytes\\)`));
  assert.ok(statSync(v).size < 16 * MiB, `BAT + 4 blocks, got ${statSync(v).size}`);
});

test('vmferry fixed VHD of a 3 GiB sparse disk stays sparse and matches in qemu-img', async () => {
  const src = sparseRawImage(3 * 1024 * MiB);
  const out = join(tmpDir(), 'f.vhd');
  const w = await convertWith(src, vpcDriver, out, { subformat: 'fixed' });
  assert.ok(allocatedBytes(out) < 32 * MiB, 'zero ranges left as holes');
  const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'vpc', src, out]);
  assert.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  assert.equal(qemuVirtualSize(out, 'vpc'), w.virtualSize);
  // Reading it back, the holes of the sparse file are zero extents: a copy reads only the data.
  const r = await openImage(out);
  try {
    const data = (await collectExtents(r.extents())).filter((e) => e.kind === 'data');
    const dataBytes = data.reduce((n, e) => n + e.length, 0);
    if (nativeHelper()) assert.ok(dataBytes < 32 * MiB, `data extents cover ${dataBytes} bytes`);
    // The data where sparseRawImage put it (start, middle, end), read through those extents.
    const fd = openSync(src, 'r');
    try {
      for (const off of [0, 1536 * MiB, 1539 * MiB, 3 * 1024 * MiB - MiB]) {
        const want = Buffer.alloc(MiB);
        readSync(fd, want, 0, MiB, off);
        assert.ok((await r.read(off, MiB)).equals(want), `content at ${off}`);
      }
    } finally {
      closeSync(fd);
    }
  } finally {
    await r.close();
  }
});

test('Azure: -o subformat=fixed,force_size=on on azureSize() gives k MiB + 512 bytes; qemu-img reads it back', async () => {
  const dir = tmpDir();
  const odd = 10 * MiB + 12345;
  const srcPath = join(dir, 'odd.raw');
  writeFileSync(srcPath, patternBuffer(odd, 7));
  const size = azureSize(odd);
  assert.equal(size, 11 * MiB);
  const out = join(dir, 'azure.vhd');
  const w = await convertWith(srcPath, vpcDriver, out, { subformat: 'fixed', force_size: 'on' }, size);
  assert.equal(w.virtualSize, size);
  assert.equal(statSync(out).size, 11 * MiB + 512);
  assert.equal(qemuVirtualSize(out, 'vpc'), size);
  const back = join(dir, 'back.raw');
  qemuImg('convert', '-f', 'vpc', '-O', 'raw', out, back);
  assert.equal(await sha256File(back), await sha256Padded(srcPath, size));
  assert.match(runOk('vhdiinfo', [out]), new RegExp(`Media size\\s*:.*\\(${size} bytes\\)`));
  // force_size also holds for dynamic disks: qemu-img sees exactly the size asked for.
  const dyn = join(dir, 'dyn.vhd');
  const wd = await vpcDriver.create!(dyn, 10 * MiB, { options: { force_size: 'on' } });
  await wd.finish();
  assert.equal(qemuVirtualSize(dyn, 'vpc'), 10 * MiB);
});

/** Writes `data` at `offset` into a raw file with plain fs calls (the expected merge). */
function rawWrite(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  writeSync(fd, data, 0, data.length, offset);
  closeSync(fd);
}

test('differencing chain by vmferry: child over dynamic parent reads as the fs-written merge in vmferry and pyvhdi', async () => {
  const dir = tmpDir();
  const size = 20 * MiB;
  const expectedPath = join(dir, 'expected.raw');
  writeFileSync(expectedPath, Buffer.alloc(0));
  closeSync(openSync(expectedPath, 'r+'));
  runOk('truncate', ['-s', String(size), expectedPath]);

  const parentPath = join(dir, 'parent.vhd');
  const parent = await vpcDriver.create!(parentPath, size, { options: { force_size: 'on' } });
  const parentWrites: [number, Buffer][] = [
    [0, patternBuffer(3 * MiB, 11)],
    [6 * MiB + 4096, patternBuffer(64 * 1024, 12)],
    [12 * MiB, patternBuffer(4 * MiB, 13)],
  ];
  for (const [off, data] of parentWrites) {
    await parent.write(off, data);
    rawWrite(expectedPath, off, data);
  }
  await parent.finish();

  const childPath = join(dir, 'child.vhd');
  const child = await vpcDriver.create!(childPath, 0, { options: { backing_file: parentPath } });
  assert.equal(child.virtualSize, size);
  const childWrites: [number, Buffer][] = [
    [MiB, patternBuffer(8192, 21)], // over parent data, inside a block
    [6 * MiB, patternBuffer(2 * MiB, 22)], // a whole block over a partly written parent block
    [17 * MiB + 100, patternBuffer(1000, 23)], // partial sectors over a parent hole
    [12 * MiB + 1000, patternBuffer(300, 24)], // partial sectors over parent data
    [12 * MiB + 5000, patternBuffer(20000, 25)], // across 4 KiB grains, next to the previous write
  ];
  for (const [off, data] of childWrites) {
    await child.write(off, data);
    rawWrite(expectedPath, off, data);
  }
  await child.zero(14 * MiB + 512, MiB); // zeros that must hide the parent's data (unaligned)
  rawWrite(expectedPath, 14 * MiB + 512, Buffer.alloc(MiB));
  await child.finish();

  const expected = await sha256File(expectedPath);
  const r = await openImage(childPath);
  try {
    assert.equal(await sha256OfReader(r), expected);
    assert.equal(r.details.backingFilename, '.\\parent.vhd');
    assert.equal((r.details.formatSpecific!.data as Record<string, unknown>)['parent-locator'], 'W2ru');
    assert.equal(r.backing?.format, 'vpc');
  } finally {
    await r.close();
  }
  const script = `
import hashlib, sys, pyvhdi
p = pyvhdi.file(); p.open(sys.argv[2])
c = pyvhdi.file(); c.open(sys.argv[1]); c.set_parent(p)
size = c.get_media_size(); h = hashlib.sha256(); pos = 0
while pos < size:
    n = min(4 << 20, size - pos); h.update(c.read_buffer(n)); pos += n
print(size, h.hexdigest(), c.get_disk_type())
`;
  const [pySize, pyHash] = runOk('/usr/bin/python3', ['-c', script, childPath, parentPath]).trim().split(' ');
  assert.equal(Number(pySize), size);
  assert.equal(pyHash, expected);
  const info = runOk('vhdiinfo', [childPath]);
  assert.match(info, /Differential/i);
});

/** Rewrites a differencing VHD's parent locators (W2ru, W2ku): new data appended before the footer. */
function setLocators(path: string, w2ru: string, w2ku: string): void {
  const file = readFileSync(path);
  const header = decodeDynHeader(file.subarray(512, 1536), path);
  const body = file.subarray(0, file.length - 512);
  const footer = file.subarray(file.length - 512);
  const pad = (b: Buffer) => Buffer.concat([b, Buffer.alloc(Math.ceil(b.length / 512) * 512 - b.length)]);
  const ru = Buffer.from(w2ru, 'utf16le');
  const ku = Buffer.from(w2ku, 'utf16le');
  const locators = [
    { platformCode: 'W2ru', dataSpace: pad(ru).length, dataLength: ru.length, dataOffset: body.length },
    { platformCode: 'W2ku', dataSpace: pad(ku).length, dataLength: ku.length, dataOffset: body.length + pad(ru).length },
  ];
  const out = Buffer.concat([body, pad(ru), pad(ku), footer]);
  encodeDynHeader({ ...header, parentName: 'renamed.vhd', locators }).copy(out, 512);
  writeFileSync(path, out);
}

async function makeChain(dir: string): Promise<{ parentPath: string; childPath: string }> {
  const parentPath = join(dir, 'parent.vhd');
  const p = await vpcDriver.create!(parentPath, 4 * MiB, { options: { force_size: 'on' } });
  await p.write(0, patternBuffer(MiB, 1));
  await p.finish();
  const childPath = join(dir, 'child.vhd');
  const c = await vpcDriver.create!(childPath, 0, { options: { backing_file: parentPath } });
  await c.write(2 * MiB, patternBuffer(MiB, 2));
  await c.finish();
  return { parentPath, childPath };
}

test('parent locators leaving the folder (/etc/passwd, ..\\..\\x) are refused with UnsafeReferenceError', async () => {
  const dir = tmpDir();
  const { childPath } = await makeChain(dir);
  setLocators(childPath, '..\\..\\x', '/etc/passwd');
  await assert.rejects(openImage(childPath), UnsafeReferenceError);
  // With no parent opened (info on one layer) the image itself is fine.
  const r = await vpcDriver.open(childPath, { noBacking: true });
  await r.close();
});

test('an absolute Windows parent path is tried by its file name inside the folder only (details say W2ku)', async () => {
  const dir = tmpDir();
  const { childPath } = await makeChain(dir);
  setLocators(childPath, '..\\elsewhere\\parent.vhd', 'C:\\Users\\Public\\Documents\\parent.vhd');
  const r = await openImage(childPath);
  try {
    const data = r.details.formatSpecific!.data as Record<string, unknown>;
    assert.equal(data['parent-locator'], 'W2ku');
    assert.equal(r.details.backingFilename, 'C:\\Users\\Public\\Documents\\parent.vhd');
    assert.equal(sha256(await r.read(0, MiB)), sha256(patternBuffer(MiB, 1)));
    assert.equal(sha256(await r.read(2 * MiB, MiB)), sha256(patternBuffer(MiB, 2)));
  } finally {
    await r.close();
  }
});

test("a parent whose unique id differs from the child's record is refused", async () => {
  const dir = tmpDir();
  const { parentPath, childPath } = await makeChain(dir);
  const other = await vpcDriver.create!(parentPath, 4 * MiB, { options: { force_size: 'on' } });
  await other.finish(); // same name, new unique id
  await assert.rejects(openImage(childPath), CorruptImageError);
  const r = await openImage(childPath, { ignoreParentId: true });
  await r.close();
});

test('bad footer checksum: CorruptImageError naming the file', async () => {
  const dir = tmpDir();
  const path = corpusFile('hyperv/fixed.vhd.gz', dir);
  const size = statSync(path).size;
  const fd = openSync(path, 'r+');
  writeSync(fd, Buffer.from([0x42]), 0, 1, size - 512 + 100); // inside the reserved area
  closeSync(fd);
  await assert.rejects(vpcDriver.open(path, {}), (err: unknown) => {
    assert.ok(err instanceof CorruptImageError);
    assert.match(err.message, /checksum/);
    assert.equal(err.file, path);
    return true;
  });
});

test('BAT entry beyond EOF and overlapping blocks: reads refuse, check counts corruptions', async () => {
  const dir = tmpDir();
  const path = join(dir, 'd.vhd');
  const w = await vpcDriver.create!(path, 8 * MiB, { options: { force_size: 'on' } });
  await w.write(0, patternBuffer(2 * MiB, 3));
  await w.write(2 * MiB, patternBuffer(2 * MiB, 4));
  await w.finish();
  assert.equal((await vpcDriver.check!(path, {})).corruptions, 0);
  const bat = 1536;
  const file = readFileSync(path);
  const entry0 = file.readUInt32BE(bat);

  const beyond = Buffer.from(file);
  beyond.writeUInt32BE(0x00ffffff, bat + 4);
  const beyondPath = join(dir, 'beyond.vhd');
  writeFileSync(beyondPath, beyond);
  const r = await openImage(beyondPath);
  try {
    await assert.rejects(r.read(2 * MiB, 512), CorruptImageError);
    assert.equal(sha256(await r.read(0, 2 * MiB)), sha256(patternBuffer(2 * MiB, 3)));
  } finally {
    await r.close();
  }
  const c1 = await vpcDriver.check!(beyondPath, {});
  assert.equal(c1.corruptions, 1, c1.messages.join('\n'));

  const overlap = Buffer.from(file);
  overlap.writeUInt32BE(entry0 + 8, bat + 4); // 4 KiB into block 0
  const overlapPath = join(dir, 'overlap.vhd');
  writeFileSync(overlapPath, overlap);
  const c2 = await vpcDriver.check!(overlapPath, {});
  assert.ok(c2.corruptions >= 1 && c2.messages.some((m) => /overlap/.test(m)), c2.messages.join('\n'));
});

test('a dynamic header with a bad checksum or a BAT past the end of the file is refused', async () => {
  const dir = tmpDir();
  const path = join(dir, 'd.vhd');
  const w = await vpcDriver.create!(path, 4 * MiB, { options: {} });
  await w.finish();
  const file = readFileSync(path);
  const badSum = Buffer.from(file);
  badSum[512 + 600] = 1;
  writeFileSync(join(dir, 'sum.vhd'), badSum);
  await assert.rejects(vpcDriver.open(join(dir, 'sum.vhd'), {}), /dynamic header checksum/);
  const huge = Buffer.from(file);
  huge.writeUInt32BE(0x40000000, 512 + 28); // max table entries
  huge.writeUInt32BE(vhdChecksum(huge.subarray(512, 1536), 36), 512 + 36);
  writeFileSync(join(dir, 'huge.vhd'), huge);
  await assert.rejects(vpcDriver.open(join(dir, 'huge.vhd'), {}), (err: unknown) => {
    assert.ok(err instanceof CorruptImageError);
    assert.match(err.message, /beyond the end of the file/);
    return true;
  });
});

test('options: unknown -o refused, bad subformat refused, dynamic to a pipe refused, sizes past 2040 GiB refused', async () => {
  const dir = tmpDir();
  await assert.rejects(vpcDriver.create!(join(dir, 'a.vhd'), MiB, { options: { cluster_size: '1M' } }), UsageError);
  await assert.rejects(vpcDriver.create!(join(dir, 'b.vhd'), MiB, { options: { subformat: 'sparse' } }), UsageError);
  await assert.rejects(vpcDriver.create!(join(dir, 'c.vhd'), 2041 * 1024 * MiB, { options: {} }), UsageError);
  // '-' is standard output: a pipe cannot take a dynamic VHD (its BAT precedes the data).
  await assert.rejects(vpcDriver.create!('-', MiB, { options: {} }), UnsupportedFeatureError);
});

test('zero() over data already written into a block clears it, and skips what was never written', async () => {
  const dir = tmpDir();
  const out = join(dir, 'z.vhd');
  const w = await vpcDriver.create!(out, 8 * MiB, { options: {} });
  const data = Buffer.alloc(3 * MiB, 0x5a);
  await w.write(0, data.subarray(0, 1536 * 1024)); // 1.5 MiB of block 0
  await w.write(2 * MiB + 512, data.subarray(0, 4096)); // a sliver of block 1
  await w.zero(MiB, 2 * MiB); // the second half of the data in block 0, and the sliver
  await w.write(5 * MiB, data.subarray(0, 65536));
  await w.zero(4 * MiB, MiB); // never written: nothing to do
  await w.finish();
  const raw = join(dir, 'z.raw');
  qemuImg('convert', '-f', 'vpc', '-O', 'raw', out, raw);
  const got = readFileSync(raw);
  const expected = Buffer.alloc(got.length);
  data.copy(expected, 0, 0, MiB);
  data.copy(expected, 5 * MiB, 0, 65536);
  assert.ok(got.subarray(0, 8 * MiB).equals(expected.subarray(0, 8 * MiB)));
});
