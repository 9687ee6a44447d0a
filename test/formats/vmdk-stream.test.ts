/**
 * streamOptimized output: deterministic, the same through a pipe, and laid out as VMware's
 * "Virtual Disk Format 5.0" note says (decoded here by hand, not with vmferry's own layout code).
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { inflateSync } from 'node:zlib';
import { realisticRawImage } from '../helpers/images.js';
import { runOk, tmpDir } from '../helpers/index.js';
import { MiB, rawBytes, toVmdk } from './vmdk-helpers.js';

const raw = realisticRawImage();
const dirA = tmpDir();
const first = join(dirA, 'disk.vmdk');

test('streamOptimized output is byte-for-byte identical across two runs', async () => {
  await toVmdk(raw, first, { subformat: 'streamOptimized', adapter_type: 'lsilogic', hwversion: '13' });
  const second = join(tmpDir(), 'disk.vmdk');
  await toVmdk(raw, second, { subformat: 'streamOptimized', adapter_type: 'lsilogic', hwversion: '13' });
  assert.ok(readFileSync(first).equals(readFileSync(second)));
});

test('streamOptimized written to a FIFO is identical to the file', async () => {
  const dir = tmpDir();
  const fifo = join(dir, 'disk.vmdk');
  const captured = join(dir, 'captured.bin');
  runOk('mkfifo', [fifo]);
  const reader = spawn('sh', ['-c', 'cat "$1" > "$2"', 'sh', fifo, captured], { stdio: 'ignore' });
  const exited = new Promise<number>((resolve) => reader.on('exit', (code) => resolve(code ?? -1)));
  // The sink closes the FIFO when the image is complete, so cat sees end-of-file.
  await toVmdk(raw, fifo, { subformat: 'streamOptimized', adapter_type: 'lsilogic', hwversion: '13' });
  assert.equal(await exited, 0);
  assert.ok(readFileSync(captured).equals(readFileSync(first)));
});

test('streamOptimized header, markers, grain tables, directory, footer and EOS follow the spec', () => {
  const file = readFileSync(first);
  const size = 256 * MiB;
  // Header (sector 0).
  assert.equal(file.toString('latin1', 0, 4), 'KDMV');
  assert.equal(file.readUInt32LE(4), 3, 'version');
  const flags = file.readUInt32LE(8);
  assert.equal(flags & 1, 1, 'valid new-line detection test');
  assert.equal(flags & (1 << 16), 1 << 16, 'compressed grains');
  assert.equal(flags & (1 << 17), 1 << 17, 'markers');
  assert.equal(Number(file.readBigUInt64LE(12)), size / 512, 'capacity');
  const grainSectors = Number(file.readBigUInt64LE(20));
  assert.equal(grainSectors, 128);
  const descOffset = Number(file.readBigUInt64LE(28));
  const descSize = Number(file.readBigUInt64LE(36));
  assert.equal(file.readUInt32LE(44), 512, 'numGTEsPerGT');
  assert.equal(file.readBigUInt64LE(56), 0xffffffffffffffffn, 'gdOffset = GD_AT_END');
  const overHead = Number(file.readBigUInt64LE(64));
  assert.deepEqual([...file.subarray(73, 77)], [0x0a, 0x20, 0x0d, 0x0a]);
  assert.equal(file.readUInt16LE(77), 1, 'compressAlgorithm = deflate');
  // Embedded descriptor.
  const desc = file.toString('latin1', descOffset * 512, (descOffset + descSize) * 512).replace(/\0+$/, '');
  assert.match(desc, /^createType="streamOptimized"$/m);
  assert.match(desc, /^RW 524288 SPARSE "disk.vmdk"$/m);
  assert.match(desc, /^ddb\.adapterType = "lsilogic"$/m);
  assert.match(desc, /^ddb\.virtualHWVersion = "13"$/m);
  assert.match(desc, /^ddb\.geometry\.heads = "255"$/m);
  assert.match(desc, /^ddb\.uuid = "[0-9a-f]{2}( [0-9a-f]{2}){7}-[0-9a-f]{2}( [0-9a-f]{2}){7}"$/m);
  assert.match(desc, /^ddb\.toolsVersion = "\d+"$/m);

  // Walk the stream.
  const grainBytes = grainSectors * 512;
  const grainAt = new Map<number, number>(); // sector of marker -> lba
  const tables: { sector: number; entries: number[] }[] = [];
  let gd: { sector: number; entries: number[] } | null = null;
  let footerSeen = false;
  let pos = overHead * 512;
  let lastLba = -1;
  for (;;) {
    assert.ok(pos + 512 <= file.length, `stream ends without an end-of-stream marker at ${pos}`);
    const value = Number(file.readBigUInt64LE(pos));
    const sizeField = file.readUInt32LE(pos + 8);
    if (sizeField > 0) {
      // Grain marker: LBA, size, deflate (zlib) data; padded to a sector.
      assert.equal(value % grainSectors, 0, 'grain LBA is grain-aligned');
      assert.ok(value > lastLba, 'grains ascend');
      lastLba = value;
      const data = inflateSync(file.subarray(pos + 12, pos + 12 + sizeField));
      assert.equal(data.length, grainBytes);
      assert.ok(data.equals(rawBytes(raw, value * 512, grainBytes)), `grain at LBA ${value}`);
      grainAt.set(pos / 512, value);
      pos += Math.ceil((12 + sizeField) / 512) * 512;
      continue;
    }
    const type = file.readUInt32LE(pos + 12);
    if (type === 0) {
      assert.equal(value, 0);
      assert.equal(pos + 512, file.length, 'EOS marker is the last sector');
      break;
    }
    const body = pos + 512;
    if (type === 1) {
      assert.equal(value, 4, 'GT marker counts 4 sectors');
      const entries = Array.from({ length: 512 }, (_, i) => file.readUInt32LE(body + i * 4));
      tables.push({ sector: body / 512, entries });
      pos = body + value * 512;
    } else if (type === 2) {
      const n = Math.ceil(size / (grainBytes * 512));
      assert.equal(value, Math.ceil((n * 4) / 512));
      gd = { sector: body / 512, entries: Array.from({ length: n }, (_, i) => file.readUInt32LE(body + i * 4)) };
      pos = body + value * 512;
    } else if (type === 3) {
      assert.equal(value, 1);
      assert.ok(gd, 'footer comes after the grain directory');
      assert.equal(file.toString('latin1', body, body + 4), 'KDMV');
      assert.equal(Number(file.readBigUInt64LE(body + 56)), gd.sector, 'footer gdOffset = real GD offset');
      assert.equal(Number(file.readBigUInt64LE(body + 12)), size / 512);
      footerSeen = true;
      pos = body + 512;
    } else {
      assert.fail(`unknown marker type ${type} at ${pos}`);
    }
  }
  assert.ok(footerSeen && gd);
  // The directory points at every table; tables point at grain markers of their own LBAs.
  const pointed = gd.entries.filter((e) => e !== 0);
  assert.deepEqual(
    pointed,
    tables.map((t) => t.sector),
  );
  let grainsInTables = 0;
  for (const [gi, sector] of gd.entries.entries()) {
    if (sector === 0) continue;
    const t = tables.find((x) => x.sector === sector)!;
    for (const [j, g] of t.entries.entries()) {
      if (g === 0) continue;
      grainsInTables++;
      assert.equal(grainAt.get(g), (gi * 512 + j) * grainSectors, 'GT entry points at the grain of its LBA');
    }
  }
  assert.equal(grainsInTables, grainAt.size);
  // Every non-zero grain of the source is in the stream.
  let nonZero = 0;
  const zero = Buffer.alloc(grainBytes);
  for (let off = 0; off < size; off += grainBytes) if (!rawBytes(raw, off, grainBytes).equals(zero)) nonZero++;
  assert.equal(grainAt.size, nonZero);
});
