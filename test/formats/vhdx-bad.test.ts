/** VHDX: damaged and hostile input gives one clear typed error; a dirty log is replayed in memory like qemu does on disk. */
import assert from 'node:assert/strict';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { CorruptImageError } from '../../src/disk/errors.js';
import { openImage } from '../../src/disk/registry.js';
import '../../src/formats/index.js';
import { crc32c } from '../../src/formats/vhdx/crc32c.js';
import { vhdxDriver } from '../../src/formats/vhdx/index.js';
import { writeGuid } from '../../src/formats/vhdx/layout.js';
import { VhdxWriter } from '../../src/formats/vhdx/writer.js';
import {
  corpusFile,
  patternBuffer,
  qemuImg,
  run,
  sha256,
  sha256File,
  sha256OfReader,
  sha256ViaQemu,
  tmpDir,
} from '../helpers/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const HEADERS = [64 * KiB, 128 * KiB];
const REGION_TABLES = [192 * KiB, 256 * KiB];

function restamp(buf: Buffer, at: number, length: number) {
  buf.writeUInt32LE(0, at + 4);
  buf.writeUInt32LE(crc32c(buf.subarray(at, at + length)), at + 4);
}

function edit(path: string, change: (b: Buffer) => void) {
  const b = readFileSync(path);
  change(b);
  writeFileSync(path, b);
}

async function expectCorrupt(path: string, pattern: RegExp) {
  await assert.rejects(
    (async () => {
      const r = await openImage(path);
      try {
        await sha256OfReader(r);
      } finally {
        await r.close();
      }
    })(),
    (err: unknown) => {
      assert.ok(err instanceof CorruptImageError, String(err));
      assert.match(err.message, pattern);
      assert.equal(err.file, path);
      return true;
    },
  );
}

test('a region table claiming more than 2047 entries is refused (CRC valid, so only the count is wrong)', async () => {
  const dir = tmpDir();
  const path = corpusFile('hyperv/dynamic.vhdx.gz', dir);
  edit(path, (b) => {
    for (const at of REGION_TABLES) {
      b.writeUInt32LE(2048, at + 8);
      restamp(b, at, 64 * KiB);
    }
  });
  await expectCorrupt(path, /2048 entries, more than the limit of 2047/);
});

test('bad header CRC: in both headers the image is refused; in one, the other header is used and check reports it', async () => {
  const dir = tmpDir();
  const path = corpusFile('hyperv/dynamic.vhdx.gz', dir);
  const one = join(dir, 'one.vhdx');
  edit(path, (b) => {
    b[HEADERS[1]! + 100]! ^= 0xff; // header 2 (the current one, higher sequence)
  });
  copyFileSync(path, one);
  edit(path, (b) => {
    b[HEADERS[0]! + 100]! ^= 0xff;
  });
  await expectCorrupt(path, /neither VHDX header is valid.*CRC-32C/);
  assert.notEqual(run('qemu-img', ['info', '-f', 'vhdx', path]).code, 0, 'qemu-img refuses it too');

  const r = await openImage(one);
  try {
    assert.equal(await sha256OfReader(r), '8e2b5e9265d694b42b81819e3bff29770eff4ed0f4f9f311693ff3dbdc93efac');
  } finally {
    await r.close();
  }
  const c = await vhdxDriver.check!(one, {});
  assert.equal(c.corruptions, 1);
  assert.match(c.messages.join('\n'), /header 2 has a bad CRC-32C/);
});

test('a BAT entry pointing beyond the end of the file: reads fail clearly, check counts it as qemu-img check does', async () => {
  const dir = tmpDir();
  const path = corpusFile('hyperv/dynamic.vhdx.gz', dir);
  // BAT at 3 MiB (region table of this file); entry 0 -> 1000 MiB, fully present.
  edit(path, (b) => {
    b.writeUInt32LE(((1000 % 4096) << 20) | 6, 3 * MiB);
  });
  await expectCorrupt(path, /BAT entry 0: payload block at offset 1048576000 .* beyond the end of the file/);
  const c = await vhdxDriver.check!(path, {});
  assert.equal(c.corruptions, 1, c.messages.join('\n'));
  assert.match(c.messages[0]!, /beyond the end of the file/);
  const q = run('qemu-img', ['check', '-f', 'vhdx', path]);
  assert.notEqual(q.code, 0, 'qemu-img check also finds the image corrupt');
});

test('two BAT entries sharing one block are reported as overlapping by check', async () => {
  const dir = tmpDir();
  const path = join(dir, 'overlap.vhdx');
  const w = await VhdxWriter.create(path, 8 * MiB, { options: { block_size: '1M' } });
  await w.write(0, patternBuffer(MiB, 1));
  await w.write(MiB, patternBuffer(MiB, 2));
  const { batOffset } = w.plan;
  await w.finish();
  assert.equal((await vhdxDriver.check!(path, {})).corruptions, 0);
  edit(path, (b) => {
    b.copy(b, batOffset + 8, batOffset, batOffset + 8);
  });
  const c = await vhdxDriver.check!(path, {});
  assert.equal(c.corruptions, 1, c.messages.join('\n'));
  assert.match(c.messages[0]!, /payload block 1 .* overlaps payload block 0/);
});

test('a truncated file and a file that is not VHDX at all give typed errors', async () => {
  const dir = tmpDir();
  const path = corpusFile('hyperv/dynamic.vhdx.gz', dir);
  const short = join(dir, 'short.vhdx');
  writeFileSync(short, readFileSync(path).subarray(0, 512 * KiB));
  await assert.rejects(vhdxDriver.open(short, {}), CorruptImageError);
  const notVhdx = join(dir, 'zeros.vhdx');
  writeFileSync(notVhdx, Buffer.alloc(2 * MiB));
  await assert.rejects(vhdxDriver.open(notVhdx, {}), /not a VHDX image/);
});

/**
 * Builds a log entry by the [MS-VHDX] layout: 64-byte header, 32-byte descriptors padded to
 * 4 KiB, then one 4 KiB data sector per data descriptor.
 */
function logEntry(
  seq: bigint,
  logGuid: string,
  fileSize: number,
  descs: ({ zero: number; at: number } | { data: Buffer; at: number })[],
): Buffer {
  const dataDescs = descs.filter((d) => 'data' in d) as { data: Buffer; at: number }[];
  const descArea = Math.ceil((64 + descs.length * 32) / 4096) * 4096;
  const entry = Buffer.alloc(descArea + dataDescs.length * 4096);
  entry.write('loge', 0, 'latin1');
  entry.writeUInt32LE(entry.length, 8);
  entry.writeUInt32LE(0, 12); // tail: this entry
  entry.writeBigUInt64LE(seq, 16);
  entry.writeUInt32LE(descs.length, 24);
  writeGuid(entry, 32, logGuid);
  entry.writeBigUInt64LE(BigInt(fileSize), 48);
  entry.writeBigUInt64LE(BigInt(fileSize), 56);
  let k = 0;
  descs.forEach((d, i) => {
    const at = 64 + i * 32;
    if ('zero' in d) {
      entry.write('zero', at, 'latin1');
      entry.writeBigUInt64LE(BigInt(d.zero), at + 8);
    } else {
      entry.write('desc', at, 'latin1');
      d.data.copy(entry, at + 4, 4092, 4096); // trailing bytes
      d.data.copy(entry, at + 8, 0, 8); // leading bytes
      const sector = descArea + k * 4096;
      entry.write('data', sector, 'latin1');
      entry.writeUInt32LE(Number(seq >> 32n), sector + 4);
      d.data.copy(entry, sector + 8, 8, 4092);
      entry.writeUInt32LE(Number(seq & 0xffffffffn), sector + 4092);
      k++;
    }
    entry.writeBigUInt64LE(BigInt(d.at), at + 16);
    entry.writeBigUInt64LE(seq, at + 24);
  });
  entry.writeUInt32LE(crc32c(entry), 4);
  return entry;
}

test('a dirty log is replayed in memory (source untouched) with the same result qemu-img check -r all writes to disk', async () => {
  const dir = tmpDir();
  const path = join(dir, 'dirty.vhdx');
  const w = await VhdxWriter.create(path, 16 * MiB, { options: { block_size: '1M' } });
  await w.write(0, patternBuffer(MiB, 7));
  await w.write(2 * MiB, patternBuffer(MiB, 8));
  const { batOffset, dataOffset } = w.plan;
  await w.finish();
  const clean = await sha256ViaQemu(path, 'vhdx');

  const image = readFileSync(path);
  const logGuid = '0b5e1c5a-7d1f-4c3e-9a6b-2f4d8e9c1a03';
  // The log's writes: a new sector inside block 0, zeros over another, and a BAT sector that
  // turns block 2 (fully present) into a ZERO block.
  const sector = Buffer.alloc(4096, 0xc3);
  sector.write('replayed by the log', 100, 'latin1');
  const bat = Buffer.from(image.subarray(batOffset, batOffset + 4096));
  bat.writeBigUInt64LE(2n, 16);
  const entry = logEntry(5n, logGuid, image.length, [
    { data: sector, at: dataOffset + 4096 },
    { zero: 4096, at: dataOffset + 3 * 4096 },
    { data: bat, at: batOffset },
  ]);
  entry.copy(image, MiB); // the log starts at 1 MiB
  for (const at of HEADERS) {
    writeGuid(image, at + 48, logGuid);
    restamp(image, at, 4096);
  }
  writeFileSync(path, image);
  const before = await sha256File(path);

  const r = await openImage(path);
  let ours: string;
  try {
    assert.equal(r.details.dirtyFlag, true);
    ours = await sha256OfReader(r);
    assert.ok((await r.read(4096, 4096)).equals(sector));
    assert.ok((await r.read(3 * 4096, 4096)).equals(Buffer.alloc(4096)));
    assert.ok((await r.read(2 * MiB, MiB)).equals(Buffer.alloc(MiB)));
  } finally {
    await r.close();
  }
  assert.equal(await sha256File(path), before, 'the source image was not written');
  assert.notEqual(ours, clean);
  const c = await vhdxDriver.check!(path, {});
  assert.match(c.messages.join('\n'), /log is dirty.*1 log entries were replayed/);

  // qemu replays the log into the file when it opens it read-write.
  const replayed = join(dir, 'replayed.vhdx');
  copyFileSync(path, replayed);
  run('qemu-img', ['check', '-r', 'all', '-f', 'vhdx', replayed]);
  assert.match(qemuImg('info', replayed), /vhdx/, 'after replay qemu opens it read-only');
  assert.equal(await sha256ViaQemu(replayed, 'vhdx'), ours);
  assert.equal(sha256(readFileSync(path)), before);
});
