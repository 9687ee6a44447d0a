import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { crc32 } from 'node:zlib';
import '../../src/formats/index.js';
import { openImage } from '../../src/disk/registry.js';
import { firmwareMismatch, type PartitionTable, readPartitionTable } from '../../src/vm/partitions.js';
import { qemuImg, runOk, tmpDir } from '../helpers/index.js';

const MiB = 1024 * 1024;
const dir = tmpDir('vmferry-parts-');

interface SfdiskPartition {
  node: string;
  start: number;
  size: number;
  type: string;
  uuid?: string;
  name?: string;
  bootable?: boolean;
}
interface SfdiskTable {
  label: 'gpt' | 'dos';
  id: string;
  sectorsize: number;
  firstlba?: number;
  lastlba?: number;
  partitions: SfdiskPartition[];
}

function blank(name: string, size: number): string {
  const path = join(dir, name);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  closeSync(fd);
  return path;
}

function sfdisk(path: string, script: string): void {
  runOk('sfdisk', ['--quiet', path], { input: script });
}

function sfdiskJson(path: string): SfdiskTable {
  return (JSON.parse(runOk('sfdisk', ['--json', path])) as { partitiontable: SfdiskTable }).partitiontable;
}

async function table(path: string): Promise<PartitionTable> {
  const reader = await openImage(path);
  try {
    return await readPartitionTable(reader);
  } finally {
    await reader.close();
  }
}

/** Our reading must say exactly what sfdisk --json says. */
function assertAgrees(ours: PartitionTable, theirs: SfdiskTable, imageName: string): void {
  assert.equal(ours.scheme, theirs.label === 'dos' ? 'mbr' : 'gpt');
  assert.equal(ours.id, theirs.id);
  if (theirs.label === 'gpt') {
    assert.equal(ours.firstLba, theirs.firstlba);
    assert.equal(ours.lastLba, theirs.lastlba);
  }
  assert.deepEqual(
    ours.partitions.map((p) => ({
      node: `${imageName}${p.number}`,
      start: p.start / theirs.sectorsize,
      size: p.size / theirs.sectorsize,
      type: theirs.label === 'dos' ? p.type.replace(/^0(?=.)/, '') : p.type,
      ...(p.uuid ? { uuid: p.uuid } : {}),
      ...(p.name ? { name: p.name } : {}),
      ...(p.bootable && theirs.label === 'dos' ? { bootable: true } : {}),
    })),
    theirs.partitions.map((p) => ({ ...p, node: p.node.replace(/^.*\//, '') })),
  );
}

describe('partition tables laid out by sfdisk, read through the disk plane', () => {
  const uefiDisk = blank('uefi.raw', 64 * MiB);
  sfdisk(uefiDisk, 'label: gpt\nstart=2048, size=20480, type=uefi, name="EFI System"\nstart=22528, type=linux, name=root\n');
  const biosGpt = blank('biosgpt.raw', 32 * MiB);
  sfdisk(biosGpt, 'label: gpt\nstart=2048, size=2048, type=21686148-6449-6E6F-744E-656564454649\nstart=4096, type=linux\n');
  const mbrDisk = blank('mbr.raw', 64 * MiB);
  sfdisk(
    mbrDisk,
    'label: dos\nlabel-id: 0x1234abcd\nstart=2048, size=20480, type=c, bootable\nstart=22528, size=80000, type=5\nstart=24576, size=10000, type=83\nstart=36864, size=10000, type=82\nstart=49152, size=2048, type=8e\n',
  );

  test('GPT with an EFI system partition: partitions as sfdisk --json lists them; looks UEFI', async () => {
    const t = await table(uefiDisk);
    assertAgrees(t, sfdiskJson(uefiDisk), 'uefi.raw');
    assert.equal(t.partitions[0]!.esp, true);
    assert.equal(t.partitions[0]!.typeName, 'EFI System');
    assert.equal(t.bootHint, 'uefi');
    assert.deepEqual(t.warnings, []);
    assert.equal(firmwareMismatch('uefi', t), undefined);
    assert.match(firmwareMismatch('bios', t) ?? '', /says BIOS but the boot disk looks UEFI/);
  });

  test('GPT with a BIOS boot partition looks BIOS', async () => {
    const t = await table(biosGpt);
    assertAgrees(t, sfdiskJson(biosGpt), 'biosgpt.raw');
    assert.equal(t.partitions[0]!.biosBoot, true);
    assert.equal(t.bootHint, 'bios');
  });

  test('MBR with an active partition, an extended one and logical partitions: as sfdisk; looks BIOS', async () => {
    const t = await table(mbrDisk);
    assertAgrees(t, sfdiskJson(mbrDisk), 'mbr.raw');
    assert.deepEqual(
      t.partitions.map((p) => p.number),
      [1, 2, 5, 6, 7],
    );
    assert.equal(t.bootHint, 'bios');
    assert.match(firmwareMismatch('uefi', t) ?? '', /says UEFI but the boot disk looks BIOS/);
  });

  for (const format of ['qcow2', 'vmdk', 'vhdx']) {
    test(`the same GPT disk as ${format} (qemu-img convert) reads the same`, async () => {
      const out = join(dir, `uefi.${format}`);
      qemuImg('convert', '-f', 'raw', '-O', format, uefiDisk, out);
      assertAgrees(await table(out), sfdiskJson(uefiDisk), 'uefi.raw');
    });
  }

  test('a damaged primary GPT header: the backup is used (as sfdisk does), with a warning', async () => {
    const path = blank('damaged-header.raw', 64 * MiB);
    sfdisk(path, 'label: gpt\nstart=2048, size=20480, type=uefi\nstart=22528, type=linux\n');
    const before = sfdiskJson(path);
    patch(path, 512 + 40, Buffer.from([0x77])); // first usable LBA: header CRC no longer matches
    const t = await table(path);
    assert.match(
      t.warnings.join('\n'),
      /primary GPT header has a bad header CRC32; the backup GPT header at LBA 131071 was used/,
    );
    assertAgrees(t, sfdiskJson(path), 'damaged-header.raw');
    assert.deepEqual(sfdiskJson(path).partitions, before.partitions);
  });

  test('damaged primary GPT entries (entry array CRC32): the backup is used, with a warning', async () => {
    const path = blank('damaged-entries.raw', 64 * MiB);
    sfdisk(path, 'label: gpt\nstart=2048, size=20480, type=uefi\nstart=22528, type=linux\n');
    patch(path, 1024 + 128 + 56, Buffer.from('X', 'utf16le')); // a name byte in entry 2
    const t = await table(path);
    assert.match(t.warnings.join('\n'), /primary GPT partition entries have a bad CRC32/);
    assertAgrees(t, sfdiskJson(path), 'damaged-entries.raw');
  });

  test('a disk without a table, and one smaller than a sector', async () => {
    const t = await table(blank('empty.raw', 4 * MiB));
    assert.equal(t.scheme, 'none');
    assert.equal(t.bootHint, 'unknown');
    assert.equal((await table(blank('tiny.raw', 100))).scheme, 'none');
  });

  test('a GPT header with a valid CRC but absurd entry count or size is refused, not trusted', async () => {
    const path = blank('hostile.raw', 8 * MiB);
    sfdisk(path, 'label: gpt\nstart=2048, type=linux\n');
    const header = readAt(path, 512, 512);
    header.writeUInt32LE(0x7fffffff, 80); // entry count
    header.writeUInt32LE(0, 16);
    header.writeUInt32LE(crc32(header.subarray(0, 92)), 16);
    patch(path, 512, header);
    // Destroy the backup too: nothing trustworthy remains.
    patch(path, 8 * MiB - 512, Buffer.alloc(512));
    const t = await table(path);
    assert.equal(t.scheme, 'none');
    assert.match(t.warnings.join('\n'), /too many entries/);
  });
});

function patch(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  writeSync(fd, data, 0, data.length, offset);
  closeSync(fd);
}

function readAt(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  const buf = Buffer.alloc(length);
  readSync(fd, buf, 0, length, offset);
  closeSync(fd);
  return buf;
}
