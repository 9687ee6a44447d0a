/**
 * A qcow2 cluster, VDI block or VHD block that holds a little data and then zeros: the zeros after
 * the data are not written, since the cluster or block was allocated at the end of the output file
 * and reads as zeros there already. Judges: qemu-img compare for the content, and qemu-img map of the
 * output file as raw (SEEK_DATA) for which of its bytes were written.
 */
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { qemuImg, runOk, tmpDir, vmferryBin } from '../helpers/index.js';
import { patternBuffer } from '../helpers/pattern.js';

const MiB = 1024 * 1024;
const PIECES = 16;
const PIECE = 8192;

/** 32 MiB raw: an 8 KiB piece of data at the start of every other MiB. */
function piecesRaw(dir: string): string {
  const path = join(dir, 'pieces.raw');
  const fd = openSync(path, 'w');
  ftruncateSync(fd, 2 * PIECES * MiB);
  for (let i = 0; i < PIECES; i++) writeSync(fd, patternBuffer(PIECE, 70 + i), 0, PIECE, 2 * i * MiB);
  closeSync(fd);
  return path;
}

/** Bytes of `path` that hold written data (the rest are holes), as qemu-img maps the file as raw. */
function writtenBytes(path: string): number {
  const map = JSON.parse(qemuImg('map', '--output=json', '-f', 'raw', path)) as { length: number; data: boolean }[];
  return map.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
}

// VPC's unit: the 64 KiB a dynamic VHD's writer records as written within its 2 MiB blocks.
for (const [format, unit] of [
  ['qcow2', 64 * 1024],
  ['vdi', MiB],
  ['vpc', 64 * 1024],
] as const) {
  test(`${format}: the zeros after each piece of data in its ${unit / 1024} KiB unit are left unwritten`, () => {
    const dir = tmpDir('vmferry-zero-tails-');
    const src = piecesRaw(dir);
    const out = join(dir, `out.${format}`);
    runOk(process.execPath, [vmferryBin, 'convert', '-O', format, src, out]);
    qemuImg('compare', '-f', 'raw', '-F', format, src, out);
    // Each unit's written part is its piece of data; its metadata is a few clusters more. Writing
    // the zeros would add (unit - 8 KiB) for every piece: 0.9 MiB for qcow2 and VPC, 15.9 MiB for VDI.
    const written = writtenBytes(out);
    assert.ok(written < PIECES * PIECE + 512 * 1024, `${written} bytes written for ${PIECES * PIECE} bytes of data`);
  });
}
