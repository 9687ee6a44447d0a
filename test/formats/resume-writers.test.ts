/**
 * Resumable writers: write part of an image, checkpoint, abandon the writer (as a kill -9 would:
 * no abort, no finish, and more writes after the checkpoint that the resume must cut off), resume
 * from the JSON round-tripped state, write the rest, finish. The result must be what qemu-img
 * (compare, check) and libyal read as the source; a state that does not match its file is refused.
 */
import assert from 'node:assert/strict';
import { closeSync, existsSync, ftruncateSync, openSync, readdirSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { seal } from '../../src/disk/checkpoint.js';
import { UsageError } from '../../src/disk/errors.js';
import { getDriver } from '../../src/disk/registry.js';
import type { DiskWriter } from '../../src/disk/types.js';
import '../../src/formats/index.js';
import { patternBuffer, run, sha256, sha256ViaLibyal, tmpDir } from '../helpers/index.js';

const MiB = 1024 * 1024;
const SIZE = 40 * MiB;
const UNIT = 64 * 1024;
/** Mid-block for every format (VDI 1 MiB, VHD 2 MiB, VHDX 8 MiB blocks), grain-aligned for VMDK. */
const CUT = 18 * MiB + UNIT;
/** Written by the "killed" writer after its checkpoint; the resume must drop all of it. */
const LOST_END = 27 * MiB;

/** A source with data in whole and partial blocks, zero stretches and a data tail. */
function sourceImage(dir: string): { path: string; data: Buffer } {
  const data = Buffer.alloc(SIZE);
  patternBuffer(3 * MiB, 1).copy(data, 0);
  patternBuffer(UNIT, 2).copy(data, 5 * MiB + 512 * 1024);
  patternBuffer(3 * MiB, 3).copy(data, 17 * MiB);
  patternBuffer(2 * MiB, 4).copy(data, 24 * MiB + UNIT);
  patternBuffer(MiB, 5).copy(data, SIZE - MiB);
  const path = join(dir, 'source.raw');
  writeFileSync(path, data);
  return { path, data };
}

/** Feeds [from, to) to the writer as the agent does: all-zero units as zero(), the rest as writes. */
async function feed(w: DiskWriter, data: Buffer, from: number, to: number): Promise<void> {
  for (let pos = from; pos < to; ) {
    const isZero = data.subarray(pos, Math.min(pos + UNIT, to)).every((b) => b === 0);
    let end = pos;
    while (end < to && end - pos < MiB && data.subarray(end, Math.min(end + UNIT, to)).every((b) => b === 0) === isZero)
      end = Math.min(end + UNIT, to);
    if (isZero) await w.zero(pos, end - pos);
    else await w.write(pos, Buffer.from(data.subarray(pos, end)));
    pos = end;
  }
}

/** Writes up to CUT, checkpoints, keeps writing (lost), and returns the JSON state. */
async function halfWrite(format: string, out: string, options: Record<string, string>, data: Buffer): Promise<unknown> {
  const w = await getDriver(format).create!(out, SIZE, { options });
  await feed(w, data, 0, CUT);
  assert.ok(w.checkpoint, `${format} writer has checkpoint()`);
  const state = JSON.parse(JSON.stringify(await w.checkpoint!()));
  await feed(w, data, CUT, LOST_END);
  // A later checkpoint whose state never got saved (killed in between): its metadata writes,
  // like the data after the first checkpoint, must not leak into the resumed image.
  await w.checkpoint!();
  await feed(w, data, LOST_END, LOST_END + 2 * MiB);
  // Abandoned: no abort(), no finish(); its temp file stays as a killed process leaves it.
  return state;
}

function qemuCompare(src: string, out: string, format: string): number {
  return run('qemu-img', ['compare', '-f', 'raw', '-F', format, src, out]).code;
}

const cases: { format: string; options: Record<string, string>; qemuCheck: boolean; libyal?: 'pyvhdi' | 'pyvmdk' }[] = [
  { format: 'vdi', options: {}, qemuCheck: true },
  { format: 'vdi', options: { static: 'on' }, qemuCheck: true },
  { format: 'vpc', options: {}, qemuCheck: false, libyal: 'pyvhdi' },
  { format: 'vpc', options: { subformat: 'fixed' }, qemuCheck: false, libyal: 'pyvhdi' },
  { format: 'vhdx', options: {}, qemuCheck: true, libyal: 'pyvhdi' },
  { format: 'vhdx', options: { subformat: 'fixed' }, qemuCheck: true },
  { format: 'vmdk', options: {}, qemuCheck: true, libyal: 'pyvmdk' },
  { format: 'vmdk', options: { subformat: 'streamOptimized' }, qemuCheck: true, libyal: 'pyvmdk' },
];

for (const c of cases) {
  const label = `${c.format} ${JSON.stringify(c.options)}`;
  test(`${label}: checkpoint, abandon, resume, finish: identical to the source and clean`, async () => {
    const dir = tmpDir('vmferry-resume-w-');
    const { path: src, data } = sourceImage(dir);
    const out = join(dir, `out.${c.format}`);
    const state = await halfWrite(c.format, out, c.options, data);
    const w = await getDriver(c.format).resume!(out, SIZE, { options: c.options }, state);
    await feed(w, data, CUT, SIZE);
    await w.finish();
    assert.deepEqual(
      readdirSync(dir).filter((n) => n.includes('vmferry-tmp')),
      [],
      'no temp file left',
    );
    assert.equal(qemuCompare(src, out, c.format), 0, 'qemu-img compare: identical');
    if (c.qemuCheck) {
      const r = run('qemu-img', ['check', '-f', c.format, out]);
      assert.equal(r.code, 0, `qemu-img check: ${r.stdout}${r.stderr}`);
    }
    if (c.libyal) {
      // VHD rounds the size up to its CHS geometry (the footer's current size, at byte 48 of the
      // last sector); the extra reads as zeros.
      const file = readFileSync(out);
      const size = c.format === 'vpc' ? Number(file.readBigUInt64BE(file.length - 512 + 48)) : SIZE;
      const padded = Buffer.concat([data, Buffer.alloc(size - SIZE)]);
      assert.equal(sha256ViaLibyal(c.libyal, out), sha256(padded), `${c.libyal} reads the source's content`);
    }
  });
}

/** A checkpointed output, its state, and where its temp file is. */
async function checkpointed(format: string, options: Record<string, string>) {
  const dir = tmpDir('vmferry-resume-bad-');
  const { data } = sourceImage(dir);
  const out = join(dir, `out.${format}`);
  const state = (await halfWrite(format, out, options, data)) as Record<string, unknown>;
  return { dir, out, state, temp: state.tempPath as string };
}

async function refused(format: string, options: Record<string, string>, out: string, state: unknown, why: RegExp) {
  await assert.rejects(getDriver(format).resume!(out, SIZE, { options }, state), (err: unknown) => {
    assert.ok(err instanceof UsageError, `a UsageError, not ${String(err)}`);
    assert.match(err.message, why);
    assert.equal(err.file, out);
    return true;
  });
}

for (const c of cases) {
  const label = `${c.format} ${JSON.stringify(c.options)}`;
  test(`${label}: a state that does not match its file is refused, and the file is left as it was`, async () => {
    const { out, state, temp } = await checkpointed(c.format, c.options);
    const before = readFileSync(temp);
    // An edited field (here the length) breaks the seal.
    await refused(c.format, c.options, out, { ...state, length: (state.length as number) - 4096 }, /altered or damaged/);
    // A state for another disk size.
    await assert.rejects(getDriver(c.format).resume!(out, SIZE * 2, { options: c.options }, state), UsageError);
    // A state naming some other file is never acted on.
    const other = join(out, '..', 'other');
    writeFileSync(other, 'keep');
    const { seal: _s, ...rest } = state;
    await refused(c.format, c.options, out, seal({ ...rest, tempPath: other }), /not this output's temp file/);
    assert.equal(readFileSync(other, 'utf8'), 'keep');
    assert.deepEqual(readFileSync(temp), before, 'refusals leave the temp file untouched');
    // The file's bytes just before the checkpointed length changed.
    const fd = openSync(temp, 'r+');
    writeSync(fd, Buffer.from('tampered'), 0, 8, (state.length as number) - 100);
    closeSync(fd);
    await refused(c.format, c.options, out, state, /content does not match/);
    // The file cut shorter than the checkpoint recorded.
    const fd2 = openSync(temp, 'r+');
    ftruncateSync(fd2, (state.length as number) - 1);
    closeSync(fd2);
    await refused(c.format, c.options, out, state, /shorter than/);
    assert.ok(existsSync(temp));
  });
}

test('vmdk multi-file subformats cannot be checkpointed, and refuse a resume', async () => {
  const dir = tmpDir('vmferry-resume-multi-');
  for (const subformat of ['monolithicFlat', 'twoGbMaxExtentSparse']) {
    const out = join(dir, `${subformat}.vmdk`);
    const w = await getDriver('vmdk').create!(out, SIZE, { options: { subformat } });
    assert.equal(w.checkpoint, undefined, `${subformat} offers no checkpoint()`);
    await w.abort();
    await assert.rejects(
      getDriver('vmdk').resume!(out, SIZE, { options: { subformat } }, {}),
      (err: unknown) => err instanceof UsageError && /cannot be resumed/.test(err.message),
    );
  }
});
