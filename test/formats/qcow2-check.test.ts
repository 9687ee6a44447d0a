/** driver.check and driver.measure against qemu-img check and qemu-img measure on the same files. */
import assert from 'node:assert/strict';
import { closeSync, copyFileSync, openSync, readFileSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { describe, test } from 'node:test';
import type { CheckResult } from '../../src/disk/types.js';
import { qcow2Driver } from '../../src/formats/qcow2/index.js';
import { corpusFile, qemuImg, tmpDir } from '../helpers/index.js';
import { mixedRaw, open, type QemuCheck, qemuCheck, qemuIo } from './qcow2-helpers.js';

const dir = tmpDir('vmferry-qcow2-check-');
const mixed = mixedRaw(dir);

function asQemu(r: CheckResult): QemuCheck {
  return {
    'check-errors': r.checkErrors,
    corruptions: r.corruptions,
    leaks: r.leaks,
    'image-end-offset': r.imageEndOffset,
    'total-clusters': r.totalClusters,
    'allocated-clusters': r.allocatedClusters,
    'fragmented-clusters': r.fragmentedClusters,
    'compressed-clusters': r.compressedClusters,
  };
}

/** qemu-img check's JSON with the fields it leaves out when zero filled in. */
function normalise(q: QemuCheck): QemuCheck {
  return {
    'check-errors': q['check-errors'],
    corruptions: q.corruptions ?? 0,
    leaks: q.leaks ?? 0,
    'image-end-offset': q['image-end-offset'],
    'total-clusters': q['total-clusters'],
    'allocated-clusters': q['allocated-clusters'] ?? 0,
    'fragmented-clusters': q['fragmented-clusters'] ?? 0,
    'compressed-clusters': q['compressed-clusters'] ?? 0,
  };
}

async function sameAsQemu(path: string): Promise<CheckResult> {
  const ours = await qcow2Driver.check!(path, {});
  assert.deepEqual(asQemu(ours), normalise(qemuCheck(path, dirname(path))), path);
  return ours;
}

describe('check agrees with qemu-img check', () => {
  const cdir = tmpDir('vmferry-qcow2-check-corpus-');
  for (const f of ['backing-chain-2.qcow2', 'backing-chain-3.qcow2', 'data-file.bin']) corpusFile(`qemu/${f}.gz`, cdir);
  for (const f of ['basic.qcow2', 'basic-zstd.qcow2', 'snapshot.qcow2', 'backing-chain-1.qcow2', 'data-file.qcow2']) {
    test(`corpus ${f}`, async () => {
      const p = corpusFile(`qemu/${f}.gz`, cdir);
      await sameAsQemu(p);
    });
  }

  for (const [name, args] of [
    ['cluster_size=512 -c', ['-c', '-o', 'cluster_size=512']],
    ['extended_l2=on', ['-o', 'extended_l2=on']],
    ['refcount_bits=1', ['-o', 'refcount_bits=1']],
    ['refcount_bits=64 compat=1.1', ['-o', 'refcount_bits=64']],
  ] as [string, string[]][]) {
    test(`qemu-img convert ${name}`, async () => {
      const p = join(dir, `c-${name.replace(/[^a-z0-9]+/gi, '_')}.qcow2`);
      qemuImg('convert', '-f', 'raw', '-O', 'qcow2', ...args, mixed.path, p);
      await sameAsQemu(p);
    });
  }

  test('an image with internal snapshots sharing clusters, then rewritten', async () => {
    const p = join(dir, 'snaps.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', mixed.path, p);
    qemuImg('snapshot', '-c', 'a', p);
    qemuIo(p, 'write -P 0x41 0 256k', 'write -z 2M 64k');
    qemuImg('snapshot', '-c', 'b', p);
    qemuIo(p, 'write -P 0x42 64k 64k');
    await sameAsQemu(p);
  });

  test('leaks and corruptions are found where qemu finds them', async () => {
    const base = join(dir, 'victim.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', mixed.path, base);
    const head = readFileSync(base).subarray(0, 72);
    const reftable = Number(head.readBigUInt64BE(48));
    const l1 = Number(head.readBigUInt64BE(40));
    const block = Number(readFileSync(base).readBigUInt64BE(reftable));
    const patch = (name: string, at: number, value: number) => {
      const p = join(dir, name);
      copyFileSync(base, p);
      const fd = openSync(p, 'r+');
      const b = Buffer.alloc(2);
      b.writeUInt16BE(value);
      writeSync(fd, b, 0, 2, at);
      closeSync(fd);
      return p;
    };
    // Header cluster counted twice: a leak.
    const leak = patch('leak.qcow2', block, 2);
    const r1 = await sameAsQemu(leak);
    assert.equal(r1.leaks, 1);
    assert.equal(r1.corruptions, 0);
    // The L1 table's cluster refcount zeroed: a corruption.
    const corrupt = patch('corrupt.qcow2', block + 2 * (l1 / 65536), 0);
    const r2 = await sameAsQemu(corrupt);
    assert.equal(r2.corruptions, 1);
    assert.ok(r2.messages.some((m) => m.startsWith('ERROR')));
  });

  test('vmferry-written images check clean by both', async () => {
    const out = join(dir, 'ours.qcow2');
    const src = await open(mixed.path);
    const { copyDisk } = await import('../../src/convert/pipeline.js');
    const w = await qcow2Driver.create!(out, src.virtualSize, { options: { cluster_size: '4096' }, compress: true });
    await copyDisk(src, w);
    await w.finish();
    await src.close();
    const r = await sameAsQemu(out);
    assert.equal(r.corruptions + r.leaks, 0);
  });
});

describe('measure agrees with qemu-img measure -O qcow2', () => {
  const cdir = tmpDir('vmferry-qcow2-measure-');
  const basic = corpusFile('qemu/basic.qcow2.gz', cdir);
  for (const [label, source] of [
    ['raw source', mixed.path],
    ['qcow2 source', basic],
  ]) {
    for (const opts of ['', 'cluster_size=512', 'cluster_size=2M,refcount_bits=64', 'extended_l2=on', 'compat=0.10']) {
      test(`${label} ${opts || 'defaults'}`, async () => {
        const r = await open(source!);
        const options: Record<string, string> = {};
        for (const kv of opts.split(',').filter(Boolean)) {
          const [k, v] = kv.split('=');
          options[k!] = v!;
        }
        const ours = await qcow2Driver.measure!(r, r.virtualSize, { options });
        await r.close();
        const q = JSON.parse(qemuImg('measure', '--output=json', '-O', 'qcow2', ...(opts ? ['-o', opts] : []), source!));
        assert.equal(ours.required, q.required);
        assert.equal(ours.fullyAllocated, q['fully-allocated']);
        assert.equal(ours.bitmaps, q.bitmaps);
      });
    }
  }
});
