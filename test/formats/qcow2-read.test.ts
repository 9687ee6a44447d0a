/** Reading qcow2 images made by qemu-img / qemu-io and the corpus, checked against qemu and README hashes. */
import assert from 'node:assert/strict';
import { closeSync, copyFileSync, openSync, readFileSync, readSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { copyDisk } from '../../src/convert/pipeline.js';
import { collectExtents } from '../../src/disk/chain.js';
import {
  CorruptImageError,
  MissingFileError,
  UnsafeReferenceError,
  UnsupportedFeatureError,
  VmferryError,
} from '../../src/disk/errors.js';
import { qcow2Driver } from '../../src/formats/qcow2/index.js';
import { sparseRawImage } from '../helpers/images.js';
import { corpusFile, qemuImg, run, sha256, sha256File, sha256OfReader, sha256ViaQemu, tmpDir } from '../helpers/index.js';
import { dataRanges, MIXED_SIZE, merge, mixedRaw, open, qemuDataRanges, qemuIo } from './qcow2-helpers.js';

const dir = tmpDir('vmferry-qcow2-read-');
const mixed = mixedRaw(dir);

describe('qcow2 images written by qemu-img', () => {
  const variants: [string, string[]][] = [
    ['cluster_size=512', ['-o', 'cluster_size=512']],
    ['cluster_size=4096', ['-o', 'cluster_size=4096']],
    ['default 64K', []],
    ['cluster_size=2M', ['-o', 'cluster_size=2M']],
    ['compat=0.10', ['-o', 'compat=0.10']],
    ['compat=0.10 -c', ['-c', '-o', 'compat=0.10,cluster_size=4096']],
    ['-c zlib', ['-c']],
    ['-c zstd', ['-c', '-o', 'compression_type=zstd']],
    ['-c zlib 512', ['-c', '-o', 'cluster_size=512']],
    ['-c zstd 2M', ['-c', '-o', 'compression_type=zstd,cluster_size=2M']],
    ['extended_l2=on', ['-o', 'extended_l2=on']],
    ['extended_l2=on 32K -c', ['-c', '-o', 'extended_l2=on,cluster_size=32768']],
    ['refcount_bits=1', ['-o', 'refcount_bits=1']],
  ];
  for (const [name, args] of variants) {
    test(name, async () => {
      const img = join(dir, `q-${name.replace(/[^a-z0-9]+/gi, '_')}.qcow2`);
      qemuImg('convert', '-f', 'raw', '-O', 'qcow2', ...args, mixed.path, img);
      const r = await open(img);
      try {
        assert.equal(r.format, 'qcow2');
        assert.equal(r.virtualSize, MIXED_SIZE);
        assert.equal(await sha256OfReader(r), mixed.sha);
        // The allocation map agrees with qemu-img map's data ranges.
        assert.deepEqual(dataRanges(await collectExtents(r.extents())), qemuDataRanges(img));
        const info = JSON.parse(qemuImg('info', '--output=json', img));
        assert.equal(r.details.clusterSize, info['cluster-size']);
        assert.deepEqual(r.details.formatSpecific, info['format-specific']);
      } finally {
        await r.close();
      }
    });
  }

  test('extended L2 subclusters written by qemu-io (partial clusters, zeroed subclusters)', async () => {
    const img = join(dir, 'subclusters.qcow2');
    qemuImg('create', '-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=64k', img, '8M');
    qemuIo(
      img,
      'write -P 0x61 0 2k',
      'write -P 0x62 6k 4k',
      'write -P 0x63 130k 1k',
      'write -z 4M 64k',
      'write -P 0x64 4196352 2k',
    );
    const r = await open(img);
    try {
      assert.equal(await sha256OfReader(r), await sha256ViaQemu(img));
      assert.deepEqual(dataRanges(await collectExtents(r.extents())), qemuDataRanges(img));
      const piece = await r.read(6 * 1024, 4096);
      assert.ok(piece.every((b) => b === 0x62));
    } finally {
      await r.close();
    }
  });
});

describe('backing chains', () => {
  test('a chain of three made by qemu-img and qemu-io reads as qemu reads it', async () => {
    const base = join(dir, 'base.qcow2');
    const mid = join(dir, 'mid.qcow2');
    const top = join(dir, 'top.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', mixed.path, base);
    qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', mid);
    qemuIo(mid, 'write -P 0x11 1M 64k', 'write -z 0 4k', 'write -P 0x12 10487296 1000');
    qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=4096', '-b', 'mid.qcow2', '-F', 'qcow2', top);
    qemuIo(top, 'write -P 0x21 1052672 8k', 'write -z 2M 1M', 'write -P 0x22 18M 2M');
    const r = await open(top);
    try {
      assert.equal(await sha256OfReader(r), await sha256ViaQemu(top));
      assert.equal(r.details.backingFilename, 'mid.qcow2');
      assert.equal(r.details.backingFormat, 'qcow2');
      assert.equal(r.details.fullBackingFilename, mid);
      assert.equal(r.backing?.backing?.filename, base);
    } finally {
      await r.close();
    }
    // This layer alone: its own allocation is what qemu-img map reports at depth 0.
    const alone = await open(top, { noBacking: true });
    try {
      assert.equal(alone.backing, undefined);
      assert.equal(alone.details.backingFilename, 'mid.qcow2');
      const map = JSON.parse(qemuImg('map', '--output=json', top)) as {
        start: number;
        length: number;
        data: boolean;
        depth: number;
      }[];
      const own = merge(map.filter((m) => m.depth === 0 && m.data).map((m) => [m.start, m.start + m.length] as [number, number]));
      assert.ok(own.length > 0);
      assert.deepEqual(dataRanges(await collectExtents(alone.extents())), own);
    } finally {
      await alone.close();
    }
    // A backing override (qemu-img -B style): read the top layer over the base instead of mid.
    const over = await open(top, { backingFile: 'base.qcow2', backingFormat: 'qcow2' });
    try {
      const expected = join(dir, 'top-over-base.qcow2');
      copyFileSync(top, expected);
      qemuImg('rebase', '-u', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', expected);
      assert.equal(await sha256OfReader(over), await sha256ViaQemu(expected));
    } finally {
      await over.close();
    }
  });

  test('a missing backing file is a MissingFileError naming the image', async () => {
    const img = join(dir, 'orphan.qcow2');
    qemuImg('create', '-f', 'qcow2', '-u', '-b', 'nowhere.qcow2', '-F', 'qcow2', img, '1M');
    await assert.rejects(open(img), (e: unknown) => e instanceof MissingFileError && e.file === img);
  });

  test('a backing file outside the folder is refused unless allowed', async () => {
    const sub = tmpDir('vmferry-qcow2-sub-');
    const img = join(sub, 'escape.qcow2');
    qemuImg('create', '-f', 'qcow2', '-b', join(dir, 'base.qcow2'), '-F', 'qcow2', img);
    await assert.rejects(open(img), (e: unknown) => e instanceof UnsafeReferenceError && e.file === img);
    const r = await open(img, { allowExternalFiles: true });
    assert.equal(await sha256OfReader(r), mixed.sha);
    await r.close();
  });
});

describe('internal snapshots', () => {
  test('active layer and snapshots by name and by id read as qemu-img convert -l reads them', async () => {
    const img = join(dir, 'snaps.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', mixed.path, img);
    qemuImg('snapshot', '-c', 'first', img);
    qemuIo(img, 'write -P 0x31 0 128k', 'write -z 2M 64k');
    qemuImg('snapshot', '-c', 'second snap', img);
    qemuIo(img, 'write -P 0x32 5M 1M');
    const info = JSON.parse(qemuImg('info', '--output=json', img));
    const viaQemu = async (spec: string) => {
      const out = join(dir, `snap-${sha256(Buffer.from(spec)).slice(0, 8)}.raw`);
      qemuImg('convert', '-f', 'qcow2', '-O', 'raw', '-l', spec, img, out);
      return sha256File(out);
    };
    const active = await open(img);
    try {
      assert.equal(await sha256OfReader(active), await sha256ViaQemu(img));
      const snaps = active.details.snapshots ?? [];
      assert.deepEqual(
        snaps.map((s) => [s.id, s.name, s.dateSec, s.dateNsec, s.vmStateSize, s.vmClockNsec]),
        info.snapshots.map((s: Record<string, number | string>) => [
          s.id,
          s.name,
          s['date-sec'],
          s['date-nsec'],
          s['vm-state-size'],
          Number(s['vm-clock-sec']) * 1e9 + Number(s['vm-clock-nsec']),
        ]),
      );
    } finally {
      await active.close();
    }
    for (const [opt, spec] of [
      ['first', 'snapshot.name=first'],
      ['1', 'snapshot.id=1'],
      ['second snap', 'snapshot.name=second snap'],
      ['2', 'snapshot.id=2'],
    ]) {
      const r = await open(img, { snapshot: opt });
      try {
        assert.equal(await sha256OfReader(r), await viaQemu(spec!), `snapshot ${opt}`);
      } finally {
        await r.close();
      }
    }
    await assert.rejects(open(img, { snapshot: 'nope' }), (e: unknown) => e instanceof VmferryError && e.file === img);
  });
});

describe('a 1 TiB virtual image with scattered data', () => {
  test('extents and data pieces match the sparse raw source', async () => {
    const TiB = 2 ** 40;
    const raw = sparseRawImage(TiB);
    const img = join(dir, 'tib.qcow2');
    qemuImg('convert', '-f', 'raw', '-O', 'qcow2', raw, img);
    const r = await open(img);
    try {
      assert.equal(r.virtualSize, TiB);
      const extents = await collectExtents(r.extents());
      const ours = dataRanges(extents);
      assert.deepEqual(ours, qemuDataRanges(img));
      const fd = openSync(raw, 'r');
      try {
        for (const [s, e] of ours) {
          const want = Buffer.alloc(e - s);
          readRaw(fd, want, s);
          assert.ok((await r.read(s, e - s)).equals(want), `data at ${s}`);
        }
      } finally {
        closeSync(fd);
      }
      // Reads across the holes are zeros.
      assert.ok((await r.read(TiB / 4, 1 << 20)).every((b) => b === 0));
      assert.equal(qemuImg('compare', '-f', 'raw', '-F', 'qcow2', raw, img).trim(), 'Images are identical.');
    } finally {
      await r.close();
    }
  });
});

/** Reads exactly `into.length` bytes of the raw source at `at`. */
function readRaw(fd: number, into: Buffer, at: number): void {
  let done = 0;
  while (done < into.length) {
    const n = readSync(fd, into, done, into.length - done, at + done);
    assert.ok(n > 0, 'raw source ended early');
    done += n;
  }
}

describe('the corpus', () => {
  const cdir = tmpDir('vmferry-qcow2-corpus-');
  const files = [
    'basic.qcow2',
    'basic-zstd.qcow2',
    'backing-chain-1.qcow2',
    'backing-chain-2.qcow2',
    'backing-chain-3.qcow2',
    'snapshot.qcow2',
    'data-file.qcow2',
    'data-file.bin',
  ];
  for (const f of files) corpusFile(`qemu/${f}.gz`, cdir);
  const at = (f: string) => join(cdir, f);
  const BASIC = '3c86a52ad19ebbe34acffb812d276817ddca56522eb72de2b984d70ffb20582f';

  const cases: [string, string][] = [
    ['basic.qcow2', BASIC],
    ['basic-zstd.qcow2', BASIC],
    ['backing-chain-1.qcow2', '186334af67c1acb54b08ded0b6a419571000755d4c810c8b768a30281e2ab074'],
    ['snapshot.qcow2', '9acca8e8c22201155389f65abbf6bc9723edc7384ead80503839f49dcc56d767'],
  ];
  for (const [f, sha] of cases) {
    test(`${f} has the README's content hash`, async () => {
      const r = await open(at(f));
      try {
        assert.equal(r.virtualSize, 536870912);
        assert.equal(await sha256OfReader(r), sha);
      } finally {
        await r.close();
      }
    });
  }

  test('backing-chain-3.qcow2 (the base) alone has its hash', async () => {
    const r = await open(at('backing-chain-3.qcow2'));
    try {
      assert.equal(r.backing, undefined);
      assert.equal(await sha256OfReader(r), '4a57a3a5c273c7c1144743ecafc7b23181f6e23c8abad104493a63a3599bd276');
    } finally {
      await r.close();
    }
  });

  test('snapshot.qcow2 lists its two snapshots and reads each (by id and by name) as qemu does', async () => {
    const img = at('snapshot.qcow2');
    const r = await open(img);
    const names = r.details.snapshots?.map((s) => [s.id, s.name]);
    await r.close();
    assert.deepEqual(names, [
      ['1', "you can't see me"],
      ['2', 'confused'],
    ]);
    // qemu extracts each snapshot; vmferry copies its own view of it; qemu-img compare judges both.
    for (const [want, spec] of [
      ['1', 'snapshot.id=1'],
      ['confused', 'snapshot.name=confused'],
    ] as const) {
      const byQemu = join(cdir, `q-${want}.qcow2`);
      const byUs = join(cdir, `v-${want}.qcow2`);
      qemuImg('convert', '-f', 'qcow2', '-O', 'qcow2', '-l', spec, img, byQemu);
      const s = await open(img, { snapshot: want });
      const w = await qcow2Driver.create!(byUs, s.virtualSize, { options: {} });
      await copyDisk(s, w);
      await w.finish();
      await s.close();
      assert.equal(qemuImg('compare', '-f', 'qcow2', '-F', 'qcow2', byQemu, byUs).trim(), 'Images are identical.');
      // ...and the snapshot differs from the active layer, so the test can tell them apart.
      assert.notEqual(run('qemu-img', ['compare', '-q', img, byUs]).code, 0);
    }
  });

  test('data-file.qcow2 is refused without allowExternalFiles and correct with it', async () => {
    await assert.rejects(
      open(at('data-file.qcow2')),
      (e: unknown) => e instanceof UnsafeReferenceError && e.file === at('data-file.qcow2') && /data-file\.bin/.test(e.message),
    );
    const r = await open(at('data-file.qcow2'), { allowExternalFiles: true });
    try {
      assert.equal(await sha256OfReader(r), BASIC);
      assert.equal(r.details.formatSpecific?.data['data-file'], 'data-file.bin');
      assert.deepEqual(r.details.extraFiles, [at('data-file.bin')]);
    } finally {
      await r.close();
    }
  });
});

describe('bad input is a typed error naming the file', () => {
  const bdir = tmpDir('vmferry-qcow2-bad-');
  const good = join(bdir, 'good.qcow2');
  qemuImg('convert', '-f', 'raw', '-O', 'qcow2', mixed.path, good);
  const variant = (name: string, patch: (buf: Buffer) => Buffer) => {
    const p = join(bdir, name);
    writeFileSync(p, patch(Buffer.from(readFileSync(good))));
    return p;
  };

  test('truncated header', async () => {
    const p = variant('short.qcow2', (b) => b.subarray(0, 50));
    await assert.rejects(open(p, { format: 'qcow2' }), (e: unknown) => e instanceof CorruptImageError && e.file === p);
  });

  test('truncated data: reads past the end fail, the header still opens', async () => {
    const p = join(bdir, 'cut.qcow2');
    copyFileSync(good, p);
    truncateSync(p, 4 * 65536);
    const r = await open(p);
    try {
      await assert.rejects(sha256OfReader(r), (e: unknown) => e instanceof CorruptImageError && e.file === p);
    } finally {
      await r.close();
    }
  });

  test('wrong magic', async () => {
    const p = variant('magic.qcow2', (b) => {
      b.write('QFJ', 0, 'latin1');
      return b;
    });
    // Probing no longer sees qcow2; naming the format gives the mismatch.
    await assert.rejects(open(p, { format: 'qcow2' }), (e: unknown) => e instanceof VmferryError && e.file === p);
    await assert.rejects(
      qcow2Driver.open(p, {}),
      (e: unknown) => e instanceof CorruptImageError && e.file === p && /magic/.test(e.message),
    );
  });

  test('an L1 table beyond the limits or the file', async () => {
    const huge = variant('l1huge.qcow2', (b) => {
      b.writeUInt32BE(0x10000000, 36);
      return b;
    });
    await assert.rejects(open(huge), (e: unknown) => e instanceof CorruptImageError && e.file === huge && /L1/.test(e.message));
    const past = variant('l1past.qcow2', (b) => {
      b.writeBigUInt64BE(1n << 40n, 40);
      return b;
    });
    await assert.rejects(open(past), (e: unknown) => e instanceof CorruptImageError && e.file === past);
  });

  test('a virtual size the L1 table cannot cover, and an absurd size', async () => {
    const big = variant('bigsize.qcow2', (b) => {
      b.writeBigUInt64BE(1n << 50n, 24);
      return b;
    });
    await assert.rejects(open(big), (e: unknown) => e instanceof CorruptImageError && e.file === big && /L1/.test(e.message));
    const absurd = variant('absurd.qcow2', (b) => {
      b.writeBigUInt64BE(1n << 62n, 24);
      return b;
    });
    await assert.rejects(open(absurd), (e: unknown) => e instanceof CorruptImageError && e.file === absurd);
  });

  test('an unknown incompatible feature bit is named', async () => {
    const p = variant('bit.qcow2', (b) => {
      b.writeBigUInt64BE(1n << 9n, 72);
      return b;
    });
    await assert.rejects(
      open(p),
      (e: unknown) => e instanceof UnsupportedFeatureError && e.file === p && /bit 9/.test(e.message),
    );
  });

  test('encryption is a clear unsupported feature', async () => {
    const p = variant('crypt.qcow2', (b) => {
      b.writeUInt32BE(2, 32);
      return b;
    });
    await assert.rejects(
      open(p),
      (e: unknown) => e instanceof UnsupportedFeatureError && e.file === p && /encrypt/.test(e.message),
    );
  });

  test('the dirty bit is readable and reported; the corrupt bit still reads', async () => {
    const dirty = variant('dirty.qcow2', (b) => {
      b.writeBigUInt64BE(1n, 72);
      return b;
    });
    const r = await open(dirty);
    assert.equal(r.details.dirtyFlag, true);
    assert.equal(await sha256OfReader(r), mixed.sha);
    await r.close();
    const corrupt = variant('corrupt.qcow2', (b) => {
      b.writeBigUInt64BE(2n, 72);
      return b;
    });
    const c = await open(corrupt);
    assert.equal(c.details.formatSpecific?.data.corrupt, true);
    assert.equal(await sha256OfReader(c), mixed.sha);
    await c.close();
  });

  test('an L2 entry pointing at an unaligned offset', async () => {
    const p = join(bdir, 'l2bad.qcow2');
    copyFileSync(good, p);
    const head = readFileSync(p).subarray(0, 72);
    const l1 = Number(head.readBigUInt64BE(40));
    const buf = readFileSync(p);
    const l2 = Number(buf.readBigUInt64BE(l1) & 0x00fffffffffffe00n);
    const fd = openSync(p, 'r+');
    const entry = Buffer.alloc(8);
    entry.writeBigUInt64BE((1n << 63n) | 0x10200n);
    writeSync(fd, entry, 0, 8, l2);
    closeSync(fd);
    const r = await open(p);
    await assert.rejects(r.read(0, 512), (e: unknown) => e instanceof CorruptImageError && e.file === p);
    await r.close();
  });
});
