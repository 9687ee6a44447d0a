/** VHDX: corpus images made by Hyper-V, and round trips against qemu-img, vhdiinfo and pyvhdi. */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { closeSync, openSync, readFileSync, readSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { copyDisk } from '../../src/convert/pipeline.js';
import { collectExtents } from '../../src/disk/chain.js';
import { UsageError } from '../../src/disk/errors.js';
import { nativeHelper } from '../../src/disk/native.js';
import { openImage } from '../../src/disk/registry.js';
import '../../src/formats/index.js';
import { crc32c, crc32cPortable } from '../../src/formats/vhdx/crc32c.js';
import { vhdxDriver } from '../../src/formats/vhdx/index.js';
import { realisticRawImage, sparseRawImage } from '../helpers/images.js';
import {
  corpusFile,
  debianPython,
  qemuImg,
  runOk,
  sha256,
  sha256File,
  sha256OfReader,
  sha256ViaLibyal,
  tmpDir,
  vmferry,
} from '../helpers/index.js';
import { patternBuffer } from '../helpers/pattern.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

test('CRC-32C matches the published check value (Castagnoli, "123456789" -> 0xe3069283)', () => {
  for (const f of [crc32c, crc32cPortable]) {
    assert.equal(f(Buffer.from('123456789')), 0xe3069283);
    assert.equal(f(Buffer.alloc(32)), 0x8a9136aa); // RFC 3720 B.4: 32 bytes of zeros
    assert.equal(f(Buffer.alloc(32, 0xff)), 0x62a8ab43); // RFC 3720 B.4: 32 bytes of 0xff
    assert.equal(f(Buffer.from(Array.from({ length: 32 }, (_, i) => i))), 0x46dd794e); // RFC 3720 B.4: 0..31
  }
});

test('the native CRC-32C (SSE4.2) agrees with the portable one at every length, alignment and continuation', (t) => {
  if (!nativeHelper()) {
    t.skip('the native helper is not built: crc32c is the portable one');
    return;
  }
  const data = patternBuffer(70000, 31);
  for (const at of [0, 1, 3, 7]) {
    for (let n = 0; n <= 300; n++)
      assert.equal(crc32c(data.subarray(at, at + n)), crc32cPortable(data.subarray(at, at + n)), `${n} at ${at}`);
    const big = data.subarray(at, at + 65536 + 13);
    assert.equal(crc32c(big), crc32cPortable(big), `64 KiB at ${at}`);
    // Continued over two pieces, split at an odd place, as crc32cWithZeroField does.
    assert.equal(crc32c(big.subarray(1001), crc32c(big.subarray(0, 1001))), crc32cPortable(big));
  }
  // Not a Buffer: a plain Uint8Array (the zero field) is accepted as well.
  assert.equal(crc32c(new Uint8Array(4), 5), crc32cPortable(new Uint8Array(4), 5));
});

test('corpus dynamic.vhdx (Hyper-V, 32 MiB blocks) reads with the README content hash, as pyvhdi does', async () => {
  const dir = tmpDir();
  const path = corpusFile('hyperv/dynamic.vhdx.gz', dir);
  const r = await openImage(path);
  try {
    assert.equal(r.format, 'vhdx');
    assert.equal(r.virtualSize, 10485760);
    assert.equal(r.details.clusterSize, 32 * MiB);
    const expected = '8e2b5e9265d694b42b81819e3bff29770eff4ed0f4f9f311693ff3dbdc93efac';
    assert.equal(await sha256OfReader(r), expected);
    assert.equal(sha256ViaLibyal('pyvhdi', path), expected);
  } finally {
    await r.close();
  }
});

test('corpus fixed.vhdx (Hyper-V, 2 MiB blocks): README hash, MBR 55aa at sector 0 end, 0xff at 0x200000', async () => {
  const dir = tmpDir();
  const path = corpusFile('hyperv/fixed.vhdx.gz', dir);
  const r = await openImage(path);
  try {
    assert.equal(r.details.clusterSize, 2 * MiB);
    assert.equal(await sha256OfReader(r), 'bc0be4623b15aa84216fb31ba24e3b621ec7f1c72d198c990ac0eced222d9f62');
    const s0 = await r.read(0, 512);
    assert.equal(s0.subarray(510).toString('hex'), '55aa');
    assert.equal((await r.read(0x200000, 1))[0], 0xff);
    const extents = await collectExtents(r.extents());
    assert.deepEqual(extents, [{ offset: 0, length: 10485760, kind: 'data' }]);
  } finally {
    await r.close();
  }
  // vmferry check agrees with qemu-img check: a clean image.
  const c = await vhdxDriver.check!(path, {});
  assert.equal(c.corruptions, 0, c.messages.join('\n'));
  qemuImg('check', '-f', 'vhdx', path);
});

async function writeWithVmferry(src: string, out: string, options: Record<string, string>) {
  const reader = await openImage(src, { format: 'raw' });
  const writer = await vhdxDriver.create!(out, reader.virtualSize, { options });
  try {
    await copyDisk(reader, writer);
    await writer.finish();
  } catch (err) {
    await writer.abort();
    throw err;
  } finally {
    await reader.close();
  }
}

/** vmferry's view of `image`, written out as raw through the project's raw writer, for qemu-img compare. */
async function vmferryToRaw(image: string, out: string) {
  const reader = await openImage(image, { format: 'vhdx' });
  const writer = await openImageWriter(out, reader.virtualSize);
  try {
    await copyDisk(reader, writer);
    await writer.finish();
  } finally {
    await reader.close();
  }
}

async function openImageWriter(out: string, size: number) {
  const { getDriver } = await import('../../src/disk/registry.js');
  return getDriver('raw').create!(out, size, { options: {} });
}

/** Stretches of the 2 GiB sparse image: the data at start, middle (+ odd 4 KiB piece) and end, with zeros around. */
const SPARSE_RANGES: [number, number][] = [
  [0, 2 * MiB],
  [GiB - MiB, 6 * MiB],
  [2 * GiB - 3 * MiB, 3 * MiB],
];

function pyvhdiRanges(path: string, ranges: [number, number][]): string[] {
  const script = `
import hashlib, sys, json, pyvhdi
f = pyvhdi.file()
f.open(sys.argv[1])
out = []
for off, n in json.loads(sys.argv[2]):
    data = f.read_buffer_at_offset(n, off)
    assert len(data) == n
    out.append(hashlib.sha256(data).hexdigest())
print(' '.join(out))
`;
  return runOk(debianPython(), ['-c', script, path, JSON.stringify(ranges)])
    .trim()
    .split(' ');
}

function rawRanges(path: string, ranges: [number, number][]): string[] {
  const fd = openSync(path, 'r');
  try {
    return ranges.map(([off, n]) => {
      const b = Buffer.alloc(n);
      readSync(fd, b, 0, n, off);
      return createHash('sha256').update(b).digest('hex');
    });
  } finally {
    closeSync(fd);
  }
}

/** Guest bytes [offset, offset + length) of a VHDX as qemu reads them (qemu-img dd, whole MiBs). */
function qemuDd(path: string, offset: number, length: number): Buffer {
  const dir = tmpDir('vmferry-dd-');
  const out = join(dir, 'dd.raw');
  // qemu-img dd counts the skipped blocks in count.
  runOk('qemu-img', [
    'dd',
    '-f',
    'vhdx',
    '-O',
    'raw',
    'bs=1M',
    `skip=${offset / MiB}`,
    `count=${(offset + length) / MiB}`,
    `if=${path}`,
    `of=${out}`,
  ]);
  const data = readFileSync(out);
  assert.equal(data.length, length, 'qemu-img dd produced the requested length');
  return data;
}

const realisticHash = (() => {
  let h: Promise<string> | undefined;
  return () => {
    h ??= sha256File(realisticRawImage());
    return h;
  };
})();

for (const subformat of ['dynamic', 'fixed'] as const) {
  test(`vmferry writes a ${subformat} VHDX of a realistic GPT+ext4 disk that qemu-img, vhdiinfo and pyvhdi read identically`, async () => {
    const raw = realisticRawImage();
    const dir = tmpDir();
    const out = join(dir, `out-${subformat}.vhdx`);
    await writeWithVmferry(raw, out, { subformat });
    qemuImg('check', '-f', 'vhdx', out);
    assert.match(qemuImg('compare', '-f', 'raw', '-F', 'vhdx', raw, out), /Images are identical/);
    const info = runOk('vhdiinfo', [out]);
    assert.match(info, /Media size\s*:.*\(268435456 bytes\)/);
    assert.match(info, new RegExp(`Disk type\\s*:\\s*${subformat === 'fixed' ? 'Fixed' : 'Dynamic'}`));
    assert.equal(sha256ViaLibyal('pyvhdi', out), await realisticHash());
    const json = JSON.parse(qemuImg('info', '--output=json', out));
    assert.equal(json['cluster-size'], 8 * MiB, 'qemu-img sees the default block size qemu would pick for 256 MiB');
    const c = await vhdxDriver.check!(out, {});
    assert.equal(c.corruptions, 0, c.messages.join('\n'));
    if (subformat === 'dynamic') {
      // Only blocks with data take space; the ext4 image uses a few of its 32 blocks.
      const measured = await vhdxDriver.measure!(await openImage(raw, { format: 'raw' }), 256 * MiB, { options: { subformat } });
      assert.equal(measured.required, statSync(out).size, 'measure predicts the file size the writer produced');
      assert.ok(statSync(out).size < measured.fullyAllocated);
    }
  });

  test(`qemu-img's ${subformat} VHDX of a realistic disk reads identically in vmferry`, async () => {
    const raw = realisticRawImage();
    const dir = tmpDir();
    const out = join(dir, `qemu-${subformat}.vhdx`);
    qemuImg('convert', '-f', 'raw', '-O', 'vhdx', '-o', `subformat=${subformat}`, raw, out);
    const r = await openImage(out);
    try {
      assert.equal(r.virtualSize, 256 * MiB);
      assert.equal(await sha256OfReader(r), await realisticHash());
    } finally {
      await r.close();
    }
  });

  test(`a sparse 2 GiB disk as ${subformat} VHDX: vmferry -> qemu-img/pyvhdi and qemu-img -> vmferry`, async () => {
    const raw = sparseRawImage(2 * GiB);
    const dir = tmpDir();
    const out = join(dir, `sparse-${subformat}.vhdx`);
    await writeWithVmferry(raw, out, { subformat });
    qemuImg('check', '-f', 'vhdx', out);
    assert.match(qemuImg('compare', '-f', 'raw', '-F', 'vhdx', raw, out), /Images are identical/);
    assert.match(runOk('vhdiinfo', [out]), /Media size\s*:.*\(2147483648 bytes\)/);
    if (subformat === 'dynamic') {
      // 16 MiB blocks (qemu's default above 1 GiB); data touches 3 blocks: start, middle, end.
      const json = JSON.parse(qemuImg('info', '--output=json', out));
      assert.equal(json['cluster-size'], 16 * MiB);
      assert.ok(statSync(out).size <= 7 * MiB + 3 * 16 * MiB, `dynamic output is ${statSync(out).size} bytes`);
    }
    // pyvhdi over the stretches that hold data (and their surroundings).
    assert.deepEqual(pyvhdiRanges(out, SPARSE_RANGES), rawRanges(raw, SPARSE_RANGES));
    const qemuOut = join(dir, `qemu-sparse-${subformat}.vhdx`);
    qemuImg('convert', '-f', 'raw', '-O', 'vhdx', '-o', `subformat=${subformat}`, raw, qemuOut);
    const back = join(dir, 'back.raw');
    await vmferryToRaw(qemuOut, back);
    assert.match(qemuImg('compare', '-f', 'raw', '-F', 'raw', raw, back), /Images are identical/);
    const r = await openImage(qemuOut);
    try {
      const data = (await collectExtents(r.extents())).filter((e) => e.kind === 'data');
      assert.ok(data.length >= 3 && data.length <= 4, JSON.stringify(data));
    } finally {
      await r.close();
    }
  });
}

test('a 2 TiB sparse dynamic VHDX is written with bounded memory and reads back through qemu-img', async () => {
  const dir = tmpDir();
  const out = join(dir, 'big.vhdx');
  const size = 2 * 1024 * GiB;
  const raw = sparseRawImage(size);
  const before = process.memoryUsage().rss;
  await writeWithVmferry(raw, out, {});
  const grew = process.memoryUsage().rss - before;
  assert.ok(grew < 256 * MiB, `rss grew by ${grew}`);
  const json = JSON.parse(qemuImg('info', '--output=json', out));
  assert.equal(json['virtual-size'], size);
  assert.equal(json['cluster-size'], 32 * MiB);
  qemuImg('check', '-f', 'vhdx', out);
  // The end of the disk holds pattern 4: compare the last 32 MiB through qemu-io-free means: qemu-img dd.
  const ranges: [number, number][] = [
    [0, 2 * MiB],
    [size / 2 - MiB, 8 * MiB],
    [size - 32 * MiB, 32 * MiB],
  ];
  assert.deepEqual(
    ranges.map(([off, n]) => sha256(qemuDd(out, off, n))),
    rawRanges(raw, ranges),
  );
});

test('create options: unknown ones refused, bad values refused, block_size and log_size honoured', async () => {
  const dir = tmpDir();
  await assert.rejects(vhdxDriver.create!(join(dir, 'a.vhdx'), MiB, { options: { cluster_size: '1M' } }), UsageError);
  await assert.rejects(vhdxDriver.create!(join(dir, 'a.vhdx'), MiB, { options: { subformat: 'sparse' } }), UsageError);
  await assert.rejects(vhdxDriver.create!(join(dir, 'a.vhdx'), MiB, { options: { block_size: '3M' } }), UsageError);
  await assert.rejects(vhdxDriver.create!(join(dir, 'a.vhdx'), MiB, { options: { logical_sector_size: '1024' } }), UsageError);
  const out = join(dir, 'b.vhdx');
  const w = await vhdxDriver.create!(out, 64 * MiB, { options: { block_size: '1M', log_size: '2M' } });
  const data = Buffer.alloc(MiB, 0x5a);
  await w.write(5 * MiB, data);
  await w.finish();
  qemuImg('check', '-f', 'vhdx', out);
  assert.equal(JSON.parse(qemuImg('info', '--output=json', out))['cluster-size'], MiB);
  const r = await openImage(out);
  try {
    assert.deepEqual(await collectExtents(r.extents()), [
      { offset: 0, length: 5 * MiB, kind: 'zero' },
      { offset: 5 * MiB, length: MiB, kind: 'data' },
      { offset: 6 * MiB, length: 58 * MiB, kind: 'zero' },
    ]);
  } finally {
    await r.close();
  }
  assert.ok(qemuDd(out, 5 * MiB, MiB).equals(data));
  assert.ok(qemuDd(out, 4 * MiB, MiB).equals(Buffer.alloc(MiB)));
});

test('logical_sector_size=4096 (qemu cannot open it): vhdiinfo and pyvhdi read what vmferry wrote', async () => {
  const dir = tmpDir();
  const out = join(dir, 'c.vhdx');
  const raw = join(dir, 'c.raw');
  const content = Buffer.alloc(24 * MiB);
  content.fill(0x11, 0, 4096);
  content.fill(0x77, 9 * MiB + 4096, 9 * MiB + 3 * 4096);
  writeFileSync(raw, content);
  await writeWithVmferry(raw, out, { logical_sector_size: '4096', block_size: '2M' });
  assert.match(runOk('vhdiinfo', [out]), /Bytes per sector\s*:\s*4096/);
  assert.equal(sha256ViaLibyal('pyvhdi', out), await sha256File(raw));
});

test('abort leaves nothing behind; the CLI converts to vhdx like qemu-img', async () => {
  const dir = tmpDir();
  const out = join(dir, 'gone.vhdx');
  const w = await vhdxDriver.create!(out, 16 * MiB, { options: {} });
  await w.write(0, Buffer.alloc(MiB, 1));
  await w.abort();
  assert.deepEqual(
    (await import('node:fs')).readdirSync(dir).filter((n) => n.includes('gone')),
    [],
  );
  const src = corpusFile('hyperv/fixed.vhdx.gz', dir);
  const cli = vmferry('convert', '-O', 'vhdx', '-o', 'subformat=dynamic,block_size=4M', src, join(dir, 'cli.vhdx'));
  assert.equal(cli.code, 0, cli.stderr);
  assert.match(qemuImg('compare', src, join(dir, 'cli.vhdx')), /Images are identical/);
});
