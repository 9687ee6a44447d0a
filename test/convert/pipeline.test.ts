/**
 * The copy pipeline as the CLI drives it: read-ahead with reused buffers, compression on worker
 * threads (qcow2 zlib/zstd, VMDK streamOptimized), judged by qemu-img (compare, check, file sizes
 * of its own conversion of the same input) and by the kernel's peak RSS.
 */
import assert from 'node:assert/strict';
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { PLAIN_OUTPUTS } from '../helpers/images.js';
import { patternBuffer, qemuImg, run, tmpDir, vmferry, vmferryBin } from '../helpers/index.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/**
 * A raw image whose clusters alternate in runs between incompressible, text-like (compressible)
 * and zero data, with a size that is not a multiple of the 64 KiB cluster (a short last cluster),
 * and data in more chunks than the pipeline keeps in flight (so reused buffers are reused).
 */
function mixedImage(dir: string): string {
  const path = join(dir, 'mixed.raw');
  const size = 12 * MiB + 20 * KiB;
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  let pos = 0;
  let k = 0;
  while (pos < size) {
    const len = Math.min(size - pos, [192 * KiB, 320 * KiB, 128 * KiB][k % 3]!);
    if (k % 3 === 0) writeSync(fd, patternBuffer(len, k + 1), 0, len, pos);
    else if (k % 3 === 1) writeSync(fd, Buffer.alloc(len, `cluster run ${k}, compressible text; `), 0, len, pos);
    // k % 3 === 2: a hole, read as zeros
    pos += len;
    k++;
  }
  // The short last cluster holds data.
  writeSync(fd, patternBuffer(20 * KiB, 99), 0, 20 * KiB, size - 20 * KiB);
  closeSync(fd);
  return path;
}

function convertBoth(dir: string, src: string, ext: string, args: string[]): { ours: string; theirs: string } {
  const ours = join(dir, `vmferry-${args.join('_').replace(/[^a-zA-Z0-9_]/g, '')}.${ext}`);
  const theirs = join(dir, `qemu-${args.join('_').replace(/[^a-zA-Z0-9_]/g, '')}.${ext}`);
  const r = vmferry('convert', ...args, src, ours);
  assert.equal(r.code, 0, r.stderr);
  // The output must exist: an idle worker pool once let the process exit 0 before writing it.
  assert.ok(existsSync(ours), 'vmferry convert exited 0 but wrote no output');
  qemuImg('convert', ...args, src, theirs);
  return { ours, theirs };
}

test('qcow2 -c (zlib): same content, clean check, same file size as qemu-img (clusters packed as qemu packs them)', () => {
  const dir = tmpDir();
  const src = mixedImage(dir);
  const { ours, theirs } = convertBoth(dir, src, 'qcow2', ['-c', '-O', 'qcow2']);
  qemuImg('compare', '-f', 'raw', '-F', 'qcow2', src, ours);
  const check = JSON.parse(qemuImg('check', '--output=json', ours)) as Record<string, number>;
  assert.equal(check['check-errors'] ?? 0, 0);
  assert.equal(check.corruptions ?? 0, 0);
  assert.equal(check.leaks ?? 0, 0);
  assert.ok((check['compressed-clusters'] ?? 0) > 0, 'some clusters are stored compressed');
  assert.equal(statSync(ours).size, statSync(theirs).size);
});

test('qcow2 -c zstd: same content, clean check, same file size as qemu-img', () => {
  const dir = tmpDir();
  const src = mixedImage(dir);
  const { ours, theirs } = convertBoth(dir, src, 'qcow2', ['-c', '-O', 'qcow2', '-o', 'compression_type=zstd']);
  qemuImg('compare', '-f', 'raw', '-F', 'qcow2', src, ours);
  const info = JSON.parse(qemuImg('info', '--output=json', ours)) as { 'format-specific': { data: Record<string, unknown> } };
  assert.equal(info['format-specific'].data['compression-type'], 'zstd');
  const check = JSON.parse(qemuImg('check', '--output=json', ours)) as Record<string, number>;
  assert.equal(check.corruptions ?? 0, 0);
  assert.equal(check.leaks ?? 0, 0);
  assert.ok((check['compressed-clusters'] ?? 0) > 0);
  assert.equal(statSync(ours).size, statSync(theirs).size);
});

test('qcow2 -c with extended L2 and 128 KiB clusters: content as the source', () => {
  const dir = tmpDir();
  const src = mixedImage(dir);
  const out = join(dir, 'ext.qcow2');
  const r = vmferry('convert', '-c', '-O', 'qcow2', '-o', 'extended_l2=on,cluster_size=128k', src, out);
  assert.equal(r.code, 0, r.stderr);
  qemuImg('compare', '-f', 'raw', '-F', 'qcow2', src, out);
  const check = JSON.parse(qemuImg('check', '--output=json', out)) as Record<string, number>;
  assert.equal(check.corruptions ?? 0, 0);
  assert.equal(check.leaks ?? 0, 0);
});

test('vmdk streamOptimized: grains compressed on workers, content as the source, deterministic output', () => {
  const dir = tmpDir();
  const src = mixedImage(dir);
  const a = join(dir, 'a', 'disk.vmdk');
  const b = join(dir, 'b', 'disk.vmdk');
  for (const out of [a, b]) {
    run('mkdir', ['-p', join(out, '..')]);
    const r = vmferry('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', src, out);
    assert.equal(r.code, 0, r.stderr);
  }
  qemuImg('compare', '-f', 'raw', '-F', 'vmdk', src, a);
  assert.equal(qemuImg('check', a).includes('No errors'), true);
  assert.ok(readFileSync(a).equals(readFileSync(b)), 'two conversions of the same input are byte-for-byte equal');
  // Grains are deflated at zlib's default level as qemu-img does: sizes stay within 2%.
  const theirs = join(dir, 'qemu.vmdk');
  qemuImg('convert', '-O', 'vmdk', '-o', 'subformat=streamOptimized', src, theirs);
  const ratio = statSync(a).size / statSync(theirs).size;
  assert.ok(ratio > 0.98 && ratio < 1.02, `size ratio ${ratio}`);
});

test('uncompressed copies through reused read buffers: content as the source, into every format', () => {
  const dir = tmpDir();
  const src = mixedImage(dir);
  for (const [fmt, opts] of PLAIN_OUTPUTS) {
    const out = join(dir, `plain.${fmt}`);
    const r = vmferry('convert', '-O', fmt, ...opts, src, out);
    assert.equal(r.code, 0, `${fmt}: ${r.stderr}`);
    const res = run('qemu-img', ['compare', '-f', 'raw', '-F', fmt, src, out]);
    assert.equal(res.code, 0, `${fmt}: ${res.stdout}${res.stderr}`);
    // vpc rounds the size up to its CHS geometry (compare checks the rest reads as zeros).
    const info = JSON.parse(qemuImg('info', '--output=json', '-f', fmt, out)) as { 'virtual-size': number };
    if (fmt !== 'vpc') assert.equal(info['virtual-size'], statSync(src).size, fmt);
  }
});

test('peak RSS of a compressing conversion stays far under 256 MiB (kernel-measured)', () => {
  const dir = tmpDir();
  const src = join(dir, 'dense.raw');
  const fd = openSync(src, 'w');
  for (let i = 0; i < 32; i++) writeSync(fd, patternBuffer(MiB, i + 7), 0, MiB, i * MiB);
  closeSync(fd);
  const stats = join(dir, 'stats.jsonl');
  const r = run(process.execPath, [vmferryBin, 'convert', '-c', '-O', 'qcow2', src, join(dir, 'd.qcow2')], {
    env: { ...process.env, VMFERRY_STATS: stats },
  });
  assert.equal(r.code, 0, r.stderr);
  const line = JSON.parse(readFileSync(stats, 'utf8').trim().split('\n').pop()!) as { maxRssBytes: number };
  assert.ok(line.maxRssBytes > 0 && line.maxRssBytes < 200 * MiB, `peak RSS ${line.maxRssBytes / MiB} MiB`);
  qemuImg('compare', '-f', 'raw', '-F', 'qcow2', src, join(dir, 'd.qcow2'));
});
