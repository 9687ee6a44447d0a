/**
 * VMDK interop: every subformat qemu-img writes, both ways, on a realistic GPT+ext4 disk and on a
 * 2 TiB sparse disk, judged by qemu-img, vmdkinfo and libyal's pyvmdk.
 */
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { collectExtents } from '../../src/disk/chain.js';
import { realisticRawImage, sparseRawImage } from '../helpers/images.js';
import { qemuImg, run, runOk, sha256File, sha256OfReader, sha256ViaLibyal, tmpDir } from '../helpers/index.js';
import { MiB, pyvmdkWindows, qemuWindow, rawBytes, SUBFORMATS, sparseWindows, TiB, toVmdk, withReader } from './vmdk-helpers.js';

function vmdkinfoMediaSize(path: string): number {
  const out = runOk('vmdkinfo', [path]);
  const m = /Media size:.*\((\d+) bytes\)/.exec(out);
  assert.ok(m, `vmdkinfo printed no media size:\n${out}`);
  return Number(m[1]);
}

describe('vmdk: realistic GPT+ext4 disk', () => {
  const raw = realisticRawImage();
  let rawHash = '';

  for (const sub of SUBFORMATS) {
    test(`qemu-img's ${sub} reads identically in vmferry`, async () => {
      rawHash ||= await sha256File(raw);
      const dir = tmpDir();
      const out = join(dir, 'disk.vmdk');
      qemuImg('convert', '-f', 'raw', '-O', 'vmdk', '-o', `subformat=${sub}`, raw, out);
      await withReader(out, async (r) => {
        assert.equal(r.format, 'vmdk');
        assert.equal(r.virtualSize, 256 * MiB);
        assert.equal(r.details.formatSpecific?.data?.['create-type'], sub);
        assert.equal(await sha256OfReader(r), rawHash);
      });
    });

    test(`vmferry's ${sub} reads identically in qemu-img, vmdkinfo and pyvmdk`, async () => {
      rawHash ||= await sha256File(raw);
      const dir = tmpDir();
      const out = join(dir, 'disk.vmdk');
      await toVmdk(raw, out, { subformat: sub });
      const compare = run('qemu-img', ['compare', '-f', 'raw', '-F', 'vmdk', raw, out]);
      assert.equal(compare.code, 0, compare.stdout + compare.stderr);
      runOk('qemu-img', ['check', '-f', 'vmdk', out]);
      const info = JSON.parse(qemuImg('info', '--output=json', out));
      assert.equal(info['format-specific'].data['create-type'], sub);
      assert.equal(vmdkinfoMediaSize(out), 256 * MiB);
      assert.equal(sha256ViaLibyal('pyvmdk', out), rawHash);
      // No temp files left behind; extents named as qemu-img names them.
      const names = readdirSync(dir).sort();
      assert.ok(!names.some((n) => n.includes('.vmferry-tmp-')), names.join(','));
      const expected: Record<string, string[]> = {
        monolithicSparse: ['disk.vmdk'],
        monolithicFlat: ['disk-flat.vmdk', 'disk.vmdk'],
        twoGbMaxExtentSparse: ['disk-s001.vmdk', 'disk.vmdk'],
        twoGbMaxExtentFlat: ['disk-f001.vmdk', 'disk.vmdk'],
        streamOptimized: ['disk.vmdk'],
      };
      assert.deepEqual(names, expected[sub]);
    });
  }
});

describe('vmdk: 2 TiB sparse disk', () => {
  const size = 2 * TiB;
  const raw = sparseRawImage(size);

  for (const sub of SUBFORMATS) {
    test(`qemu-img's 2 TiB ${sub} reads identically in vmferry, cheaply`, async () => {
      const dir = tmpDir();
      const out = join(dir, 'big.vmdk');
      qemuImg('convert', '-f', 'raw', '-O', 'vmdk', '-o', `subformat=${sub}`, raw, out);
      await withReader(out, async (r) => {
        assert.equal(r.virtualSize, size);
        for (const [off, len] of sparseWindows(size)) {
          assert.ok((await r.read(off, len)).equals(rawBytes(raw, off, len)), `window at ${off}`);
        }
        // Zeros well away from the data.
        assert.ok((await r.read(TiB / 4, MiB)).equals(Buffer.alloc(MiB)));
        if (!sub.endsWith('Flat')) {
          // The allocation map of a sparse 2 TiB image is a handful of extents found without a per-grain walk.
          const extents = await collectExtents(r.extents());
          const data = extents.filter((e) => e.kind === 'data').reduce((a, e) => a + e.length, 0);
          assert.ok(data >= 3 * MiB && data <= 4 * MiB, `data extents add up to ${data}`);
          assert.ok(extents.length <= 12, `${extents.length} extents`);
        }
      });
    });

    test(`vmferry's 2 TiB ${sub} reads identically in qemu-img and vmdkinfo`, async () => {
      const dir = tmpDir();
      const out = join(dir, 'big.vmdk');
      await toVmdk(raw, out, { subformat: sub });
      for (const [off, len] of sparseWindows(size)) {
        assert.ok(qemuWindow(out, off, len).equals(rawBytes(raw, off, len)), `window at ${off}`);
      }
      assert.ok(qemuWindow(out, TiB / 4, MiB).equals(Buffer.alloc(MiB)));
      // libyal reads the same windows.
      const windows = sparseWindows(size);
      const viaLibyal = pyvmdkWindows(out, windows);
      for (const [i, [off, len]] of windows.entries()) {
        assert.ok(viaLibyal[i]!.equals(rawBytes(raw, off, len)), `pyvmdk window at ${off}`);
      }
      assert.equal(vmdkinfoMediaSize(out), size);
      const info = JSON.parse(qemuImg('info', '--output=json', out));
      assert.equal(info['virtual-size'], size);
      if (sub.startsWith('twoGb')) assert.equal(readdirSync(dir).length, 1025);
    });
  }

  test('vmferry output of a smaller sparse disk hashes identically in pyvmdk', async () => {
    const small = sparseRawImage(64 * MiB + 4096);
    const rawHash = await sha256File(small);
    for (const sub of SUBFORMATS) {
      const dir = tmpDir();
      const out = join(dir, 'small.vmdk');
      await toVmdk(small, out, { subformat: sub });
      assert.equal(sha256ViaLibyal('pyvmdk', out), rawHash, sub);
    }
  });
});
