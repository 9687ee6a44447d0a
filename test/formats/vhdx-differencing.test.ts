/** VHDX differencing disks (.avhdx, Hyper-V checkpoints): parent lookup, linkage, merged reads vs pyvhdi. */
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { CorruptImageError, MissingFileError, UnsafeReferenceError } from '../../src/disk/errors.js';
import { openImage } from '../../src/disk/registry.js';
import '../../src/formats/index.js';
import { VhdxWriter } from '../../src/formats/vhdx/writer.js';
import { corpusFile, debianPython, patternBuffer, runOk, sha256, tmpDir, vmferry } from '../helpers/index.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const PARENT_NAME = 'Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx';
const RELATIVE_PATH = `.\\${PARENT_NAME}`;
/** The child's parent_linkage (also what vhdiinfo prints as its "Parent identifier"). */
const PARENT_LINKAGE = 'ff34003b-11ed-4cf8-a166-b2be05e20b80';
/** Payload blocks (2 MiB) the checkpoint stores, read off its BAT with an independent dump (all partially present). */
const CHILD_BLOCKS = [
  0, 256, 923, 1018, 1027, 1028, 1041, 1042, 1043, 1716, 1750, 1760, 1764, 1872, 1874, 1886, 1900, 1903, 2509, 2513, 2565, 2615,
  2671, 2675, 2679, 2738, 2740, 3302, 3412, 3413, 3479, 3514,
];
/** Parent blocks given content: some under child blocks, one (5) the child does not store. */
const PARENT_BLOCKS = [0, 5, 256, 1027, 1028, 2513];

function childCopy(dir: string): string {
  return corpusFile('hyperv/differencing.avhdx.gz', dir);
}

async function buildParent(dir: string, guid: string): Promise<string> {
  const path = join(dir, PARENT_NAME);
  const w = await VhdxWriter.create(path, 8 * GiB, { options: { block_size: '2M' } }, { dataWriteGuid: guid });
  for (const b of PARENT_BLOCKS) await w.write(b * 2 * MiB, patternBuffer(2 * MiB, 100 + b));
  await w.finish();
  return path;
}

test('corpus differencing.avhdx: details name the parent it needs, even without opening it', async () => {
  const dir = tmpDir();
  const r = await openImage(childCopy(dir), { noBacking: true });
  try {
    assert.equal(r.format, 'vhdx');
    assert.equal(r.virtualSize, 8 * GiB);
    assert.equal(r.details.backingFilename, RELATIVE_PATH);
    assert.equal(r.details.backingFormat, 'vhdx');
    assert.equal(r.details.clusterSize, 2 * MiB);
    assert.equal(r.backing, undefined);
  } finally {
    await r.close();
  }
  // pyvhdi agrees on what the parent is.
  const py = runOk(debianPython(), [
    '-c',
    'import sys, pyvhdi\nf = pyvhdi.file()\nf.open(sys.argv[1])\nprint(f.get_parent_identifier())\nprint(f.get_parent_filename())',
    join(dir, 'differencing.avhdx'),
  ]);
  assert.match(py, new RegExp(PARENT_LINKAGE));
  assert.match(py, new RegExp(PARENT_NAME.replace(/[.]/g, '\\.')));
  const info = vmferry('info', '--output=json', join(dir, 'differencing.avhdx'));
  assert.equal(info.code, 0, info.stderr);
  assert.equal(JSON.parse(info.stdout)['backing-filename'], RELATIVE_PATH);
});

test('opening the checkpoint without its parent fails with one MissingFileError naming the parent', async () => {
  const dir = tmpDir();
  const child = childCopy(dir);
  await assert.rejects(openImage(child), (err: unknown) => {
    assert.ok(err instanceof MissingFileError, String(err));
    assert.ok(err.message.includes(PARENT_NAME), err.message);
    assert.equal(err.file, child);
    return true;
  });
  const cli = vmferry('convert', '-O', 'raw', child, join(dir, 'out.raw'));
  assert.notEqual(cli.code, 0);
  const lines = cli.stderr.trim().split('\n');
  assert.equal(lines.length, 1, cli.stderr);
  assert.ok(lines[0]!.includes(PARENT_NAME), cli.stderr);
});

test('with a parent of the right data-write GUID, the checkpoint reads merged exactly as pyvhdi reads it', async () => {
  const dir = tmpDir();
  const child = childCopy(dir);
  const parent = await buildParent(dir, PARENT_LINKAGE);
  const ranges = [...new Set([...CHILD_BLOCKS, ...PARENT_BLOCKS, 1, 4095])].map((b) => [b * 2 * MiB, 2 * MiB] as const);
  const script = `
import hashlib, sys, json, pyvhdi
p = pyvhdi.file()
p.open(sys.argv[2])
c = pyvhdi.file()
c.open(sys.argv[1])
c.set_parent(p)
out = []
for off, n in json.loads(sys.argv[3]):
    data = c.read_buffer_at_offset(n, off)
    assert len(data) == n
    out.append(hashlib.sha256(data).hexdigest())
print(' '.join(out))
`;
  const expected = runOk(debianPython(), ['-c', script, child, parent, JSON.stringify(ranges)])
    .trim()
    .split(' ');
  const r = await openImage(child);
  const alone = await openImage(child, { noBacking: true });
  const base = await openImage(parent);
  try {
    assert.ok(r.backing, 'the parent was opened');
    assert.equal(r.details.fullBackingFilename, parent);
    const got: string[] = [];
    for (const [off, n] of ranges) got.push(sha256(await r.read(off, n)));
    assert.deepEqual(got, expected);
    // Block 0 really mixes both layers: it differs from the child alone and from the parent alone.
    const merged = await r.read(0, 2 * MiB);
    assert.ok(!merged.equals(await alone.read(0, 2 * MiB)));
    assert.ok(!merged.equals(await base.read(0, 2 * MiB)));
    // Block 5 is not in the child: the parent's bytes show through.
    assert.ok((await r.read(5 * 2 * MiB, 2 * MiB)).equals(patternBuffer(2 * MiB, 105)));
  } finally {
    await r.close();
    await alone.close();
    await base.close();
  }
});

test('a parent whose data-write GUID differs from parent_linkage is refused, naming both', async () => {
  const dir = tmpDir();
  const child = childCopy(dir);
  await buildParent(dir, '12345678-9abc-4def-8123-456789abcdef');
  await assert.rejects(openImage(child), (err: unknown) => {
    assert.ok(err instanceof CorruptImageError, String(err));
    assert.match(err.message, /12345678-9abc-4def-8123-456789abcdef/);
    assert.match(err.message, new RegExp(PARENT_LINKAGE));
    return true;
  });
});

test('a parent locator whose relative_path leaves the folder is refused as unsafe', async () => {
  const dir = tmpDir();
  const child = childCopy(dir);
  // Same length, so the locator's layout is unchanged: ".\Generation..." -> "..\eneration...".
  const bytes = readFileSync(child);
  const from = Buffer.from(RELATIVE_PATH, 'utf16le');
  const to = Buffer.from(`..\\${PARENT_NAME.slice(1)}`, 'utf16le');
  // The metadata region holds it (an old log entry holds a stale copy too): change every copy.
  let changed = 0;
  for (let at = bytes.indexOf(from); at >= 0; at = bytes.indexOf(from, at + 1)) {
    to.copy(bytes, at);
    changed++;
  }
  assert.ok(changed > 0);
  writeFileSync(child, bytes);
  await assert.rejects(openImage(child), (err: unknown) => {
    assert.ok(err instanceof UnsafeReferenceError, String(err));
    assert.match(err.message, /leaves the image's folder/);
    return true;
  });
});
