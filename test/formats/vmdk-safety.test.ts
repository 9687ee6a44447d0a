/**
 * VMDK references and integrity: extents outside the folder refused, CID/parentCID chains,
 * the seSparse corpus image, check on damaged images, options as qemu-img names them.
 */
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { CorruptImageError, UnsafeReferenceError, UsageError, VmferryError } from '../../src/disk/errors.js';
import { getDriver, openImage } from '../../src/disk/registry.js';
import { corpusFile, qemuImg, run, runOk, sha256OfReader, sha256ViaQemu, tmpDir } from '../helpers/index.js';
import { MiB, toVmdk, withReader } from './vmdk-helpers.js';

const vmdk = () => getDriver('vmdk');

function flatDescriptor(extentLine: string): string {
  return `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\n${extentLine}\n\nddb.adapterType = "ide"\n`;
}

test('an extent line naming /etc/passwd is refused, and nothing of it reaches an output', async () => {
  const dir = tmpDir();
  const desc = join(dir, 'evil.vmdk');
  writeFileSync(desc, flatDescriptor('RW 1 FLAT "/etc/passwd" 0'));
  await assert.rejects(openImage(desc), (err: unknown) => {
    assert.ok(err instanceof UnsafeReferenceError, String(err));
    assert.equal(err.file, desc);
    assert.match(err.message, /extent '\/etc\/passwd' is an absolute path/);
    return true;
  });
  const out = join(dir, 'out.vmdk');
  await assert.rejects(toVmdk(desc, out), UnsafeReferenceError);
  assert.deepEqual(readdirSync(dir), ['evil.vmdk']);
  // The CLI too: a clear one-line error, no output file.
  if (existsSync(join(process.cwd(), 'bin/vmferry'))) {
    const r = run(process.execPath, ['bin/vmferry', 'convert', '-O', 'raw', desc, join(dir, 'out.raw')]);
    assert.notEqual(r.code, 0);
    assert.doesNotMatch(r.stdout + r.stderr, /root:/);
    assert.deepEqual(readdirSync(dir), ['evil.vmdk']);
  }
});

test("an extent line leaving the folder with '..' is refused unless external files are allowed", async () => {
  const outer = tmpDir();
  const inner = join(outer, 'vm');
  mkdirSync(inner);
  const secret = Buffer.alloc(512, 0x5a);
  writeFileSync(join(outer, 'secret.raw'), secret);
  const desc = join(inner, 'disk.vmdk');
  writeFileSync(desc, flatDescriptor('RW 1 FLAT "../secret.raw" 0'));
  await assert.rejects(openImage(desc), (err: unknown) => {
    assert.ok(err instanceof UnsafeReferenceError, String(err));
    assert.match(err.message, /extent '\.\.\/secret\.raw' leaves the image's folder/);
    return true;
  });
  await withReader(desc, async (r) => assert.ok((await r.read(0, 512)).equals(secret)), { allowExternalFiles: true });
});

test('a child with a wrong parentCID is refused naming both files; ignoreParentId reads it', async () => {
  const dir = tmpDir();
  const parent = join(dir, 'parent.vmdk');
  const child = join(dir, 'child.vmdk');
  qemuImg('create', '-f', 'vmdk', parent, '64M');
  runOk('qemu-io', ['-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x33 32M 256k', parent]);
  qemuImg('create', '-f', 'vmdk', '-b', 'parent.vmdk', '-F', 'vmdk', child);
  runOk('qemu-io', ['-c', 'write -P 0x22 512k 64k', child]);
  const expected = await sha256ViaQemu(child, 'vmdk');
  await withReader(child, async (r) => {
    assert.equal(r.details.backingFilename, 'parent.vmdk');
    assert.equal(r.backing?.format, 'vmdk');
    assert.equal(await sha256OfReader(r), expected);
  });
  // Change the parent's content identifier as VMware does when the parent is written to. qemu
  // writes it without leading zeros, so the new value keeps the old one's length (the descriptor
  // must not move).
  const bytes = readFileSync(parent);
  const at = bytes.indexOf('CID=', 512, 'latin1');
  const cid = bytes.toString('latin1', at + 4, bytes.indexOf('\n', at, 'latin1'));
  const changed = (cid === '0badcafe'.slice(0, cid.length) ? 'cafe0bad' : '0badcafe').slice(0, cid.length);
  bytes.write(changed, at + 4, 'latin1');
  writeFileSync(parent, bytes);
  await assert.rejects(openImage(child), (err: unknown) => {
    assert.ok(err instanceof CorruptImageError, String(err));
    assert.equal(err.file, child);
    assert.ok(err.message.includes(parent), err.message);
    assert.match(err.message, new RegExp(`parentCID [0-9a-f]{8} does not match the CID ${changed.padStart(8, '0')}`));
    return true;
  });
  await withReader(child, async (r) => assert.equal(await sha256OfReader(r), expected), { ignoreParentId: true });
});

test('corpus seSparse extent (no descriptor) probes as vmdk and reads as the README says', async () => {
  const dir = tmpDir();
  const path = corpusFile('vmware/sesparse.vmdk.gz', dir);
  const h = createHash('sha256');
  h.update(Buffer.alloc(0x1000000, 'a'));
  const zeros = Buffer.alloc(16 * MiB);
  for (let pos = 0x1000000; pos < 536870912; pos += zeros.length) h.update(zeros);
  await withReader(path, async (r) => {
    assert.equal(r.format, 'vmdk');
    assert.equal(r.virtualSize, 536870912);
    assert.equal(r.details.formatSpecific?.data?.['create-type'], 'seSparse');
    assert.equal(r.details.clusterSize, 4096);
    assert.equal(await sha256OfReader(r), h.digest('hex'));
  });
});

test('check finds grains beyond the end of the file and overlapping grains; qemu-img agrees on the first', async () => {
  const dir = tmpDir();
  const good = join(dir, 'good.vmdk');
  qemuImg('create', '-f', 'vmdk', good, '64M');
  runOk('qemu-io', ['-c', 'write -P 0x44 0 256k', good]);
  const clean = await vmdk().check!(good, {});
  assert.equal(clean.corruptions, 0, clean.messages.join('\n'));
  assert.equal(clean.allocatedClusters, 4);

  // Locate grain table 0 through the header's grain directory (offsets per the VMDK note).
  const bytes = readFileSync(good);
  const gdSector = Number(bytes.readBigUInt64LE(56));
  const gt0 = bytes.readUInt32LE(gdSector * 512) * 512;
  const rgdSector = Number(bytes.readBigUInt64LE(48));
  const rgt0 = bytes.readUInt32LE(rgdSector * 512) * 512;

  const beyond = Buffer.from(bytes);
  for (const t of [gt0, rgt0]) beyond.writeUInt32LE(0x00fffff0, t + 4); // grain 1 far past EOF
  const beyondPath = join(dir, 'beyond.vmdk');
  writeFileSync(beyondPath, beyond);
  const r1 = await vmdk().check!(beyondPath, {});
  assert.ok(r1.corruptions >= 1);
  assert.ok(
    r1.messages.some((m) => /beyond the end of the file/.test(m)),
    r1.messages.join('\n'),
  );
  assert.notEqual(run('qemu-img', ['check', '-f', 'vmdk', beyondPath]).code, 0, 'qemu-img check also fails it');

  const overlap = Buffer.from(bytes);
  for (const t of [gt0, rgt0]) overlap.writeUInt32LE(overlap.readUInt32LE(t), t + 8); // grain 2 = grain 0
  const overlapPath = join(dir, 'overlap.vmdk');
  writeFileSync(overlapPath, overlap);
  const r2 = await vmdk().check!(overlapPath, {});
  assert.ok(
    r2.messages.some((m) => /overlaps/.test(m)),
    r2.messages.join('\n'),
  );

  const split = Buffer.from(bytes);
  split.writeUInt32LE(0x7777, gt0 + 12); // primary and redundant tables disagree
  const splitPath = join(dir, 'split.vmdk');
  writeFileSync(splitPath, split);
  const r3 = await vmdk().check!(splitPath, {});
  assert.ok(
    r3.messages.some((m) => /differs from its redundant copy/.test(m)),
    r3.messages.join('\n'),
  );
});

test('damaged headers are typed errors naming the file, never raw exceptions', async () => {
  const dir = tmpDir();
  const good = join(dir, 'g.vmdk');
  qemuImg('create', '-f', 'vmdk', good, '64M');
  const bytes = readFileSync(good);
  const cases: [string, Buffer][] = [
    ['truncated', bytes.subarray(0, 700)],
    [
      'petabyte',
      (() => {
        const b = Buffer.from(bytes);
        b.writeBigUInt64LE(2n ** 41n, 12); // capacity: 1 PiB in sectors, grain directory cannot fit
        return b;
      })(),
    ],
    [
      'grain-size',
      (() => {
        const b = Buffer.from(bytes);
        b.writeBigUInt64LE(3n, 20);
        return b;
      })(),
    ],
  ];
  for (const [name, content] of cases) {
    const p = join(dir, `${name}.vmdk`);
    writeFileSync(p, content);
    await assert.rejects(openImage(p, { format: 'vmdk' }), (err: unknown) => {
      assert.ok(err instanceof VmferryError, `${name}: ${String(err)}`);
      assert.equal(err.file, p);
      return true;
    });
  }
});

test('create options: qemu-img names and geometry, unknown ones refused', async () => {
  const dir = tmpDir();
  const size = 10 * 1024 * MiB;
  await assert.rejects(vmdk().create!(join(dir, 'x.vmdk'), size, { options: { cluster_size: '64k' } }), UsageError);
  await assert.rejects(vmdk().create!(join(dir, 'x.vmdk'), size, { options: { subformat: 'bogus' } }), UsageError);
  await assert.rejects(vmdk().create!(join(dir, 'x.vmdk'), size, { options: { compat6: 'on', hwversion: '7' } }), UsageError);
  for (const adapter of ['ide', 'lsilogic', 'buslogic', 'legacyESX']) {
    const opts = { subformat: 'monolithicFlat', adapter_type: adapter, hwversion: '13', toolsversion: '12345' };
    const q = join(dir, `q-${adapter}.vmdk`);
    qemuImg(
      'create',
      '-f',
      'vmdk',
      '-o',
      Object.entries(opts)
        .map(([k, v]) => `${k}=${v}`)
        .join(','),
      q,
      String(size),
    );
    const ours = join(dir, `v-${adapter}.vmdk`);
    const w = await vmdk().create!(ours, size, { options: opts });
    await w.finish();
    const ddb = (p: string) =>
      readFileSync(p, 'latin1')
        .split('\n')
        .filter((l) => /^ddb\.(geometry|adapterType|virtualHWVersion|toolsVersion)/.test(l))
        .sort();
    assert.deepEqual(ddb(ours), ddb(q), adapter);
    assert.match(readFileSync(ours, 'latin1'), /^RW 20971520 FLAT "v-[a-zA-Z]+-flat\.vmdk" 0$/m);
  }
});
