/**
 * The NBD client against qemu-nbd, an independent NBD server: every format qemu-nbd decodes reads
 * through vmferry's client exactly as qemu-img reads the file (SHA-256 of the whole content, and
 * the data ranges of the extent map against `qemu-img map` of the file); the CLI takes nbd:// and
 * nbd+unix:// names (info, map, convert checked by qemu-img compare); dirty bitmaps come through
 * the qemu:dirty-bitmap meta context; TLS with an x509 server; refusals are one typed line.
 */
import assert from 'node:assert/strict';
import { closeSync, openSync, readSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import '../../src/formats/index.js';
import { VmferryError } from '../../src/disk/errors.js';
import { openImage } from '../../src/disk/registry.js';
import type { DiskReader } from '../../src/disk/types.js';
import { NbdDiskReader } from '../../src/transfer/nbd/index.js';
import { parseNbdUri } from '../../src/transfer/nbd/uri.js';
import { sparseRawImage } from '../helpers/images.js';
import { qemuImg, runOk, sha256OfReader, sha256ViaQemu, tmpDir, vmferry } from '../helpers/index.js';
import { startQemuNbd } from './support.js';

const MiB = 1024 * 1024;
const FORMATS = ['raw', 'qcow2', 'vmdk', 'vpc', 'vhdx', 'vdi'];

/** Data ranges of a map (merged), from qemu-img map --output=json. */
function qemuDataRanges(file: string, format: string): [number, number][] {
  const map = JSON.parse(qemuImg('map', '--output=json', '-f', format, file)) as {
    start: number;
    length: number;
    data: boolean;
  }[];
  return merge(map.filter((e) => e.data).map((e) => [e.start, e.length] as [number, number]));
}

function merge(ranges: [number, number][]): [number, number][] {
  const out: [number, number][] = [];
  for (const [s, l] of ranges) {
    const last = out[out.length - 1];
    if (last && last[0] + last[1] === s) last[1] += l;
    else out.push([s, l]);
  }
  return out;
}

async function ourDataRanges(r: DiskReader): Promise<[number, number][]> {
  const out: [number, number][] = [];
  for await (const e of r.extents()) if (e.kind === 'data') out.push([e.offset, e.length]);
  return merge(out);
}

describe('NBD client vs qemu-nbd', () => {
  const dir = tmpDir('vmferry-nbd-');
  const source = sparseRawImage(64 * MiB, 'sparse-64M-nbd.raw');
  const files: Record<string, string> = {};

  before(() => {
    for (const f of FORMATS) {
      files[f] = join(dir, `disk.${f}`);
      qemuImg('convert', '-f', 'raw', '-O', f, source, files[f]!);
    }
  });

  for (const format of FORMATS) {
    test(`${format}: content and data map through qemu-nbd equal qemu-img's reading of the file`, async () => {
      const server = await startQemuNbd(files[format]!, format, { socket: join(dir, `${format}.sock`) });
      try {
        const reader = await openImage(server.uri);
        try {
          assert.ok(reader instanceof NbdDiskReader);
          assert.equal(
            reader.virtualSize,
            JSON.parse(qemuImg('info', '--output=json', '-f', format, files[format]!))['virtual-size'],
          );
          assert.equal(await sha256OfReader(reader, 3 * MiB + 512), await sha256ViaQemu(files[format]!, format));
          const ours = await ourDataRanges(reader);
          assert.deepEqual(ours, qemuDataRanges(files[format]!, format));
          // qemu's vhdx driver reports no block status (all data), and qemu-img map says so too
          if (format !== 'vhdx') assert.ok(ours.length >= 3, `data at start, middle and end: ${JSON.stringify(ours)}`);
          // unaligned reads that straddle data and holes, against the raw source file's bytes
          for (const [at, n] of [
            [MiB - 100, 300],
            [32 * MiB + 3 * MiB + 500, 4200],
            [64 * MiB - 7, 7],
          ] as const) {
            const want = Buffer.alloc(n);
            const fd = openSync(source, 'r');
            readSync(fd, want, 0, n, at);
            closeSync(fd);
            assert.ok((await reader.read(at, n)).equals(want), `read of ${n} at ${at}`);
          }
        } finally {
          await reader.close();
        }
      } finally {
        await server.stop();
      }
    });
  }

  test('TCP nbd://127.0.0.1:PORT/EXPORT: CLI info, map and convert (qemu-img compare)', async () => {
    const server = await startQemuNbd(files.qcow2!, 'qcow2', { tcp: true, exportName: 'vm disk' });
    try {
      const uri = server.uri.replace('vm disk', 'vm%20disk');
      const info = vmferry('info', '--output=json', uri);
      assert.equal(info.code, 0, info.stderr);
      assert.equal(JSON.parse(info.stdout)['virtual-size'], 64 * MiB);
      const map = vmferry('map', '--output=json', uri);
      assert.equal(map.code, 0, map.stderr);
      const out = join(dir, 'from-nbd.qcow2');
      const conv = vmferry('convert', '-O', 'qcow2', uri, out);
      assert.equal(conv.code, 0, conv.stderr);
      runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', source, out]);
      runOk('qemu-img', ['check', out]);
    } finally {
      await server.stop();
    }
  });

  test('vmferry convert nbd+unix:///?socket=... out.qcow2 (default export name) equals the source', async () => {
    const sock = join(dir, 'default.sock');
    const server = await startQemuNbd(files.vmdk!, 'vmdk', { socket: sock, exportName: '' });
    try {
      const out = join(dir, 'default.qcow2');
      const conv = vmferry('convert', '-O', 'qcow2', `nbd+unix:///?socket=${sock}`, out);
      assert.equal(conv.code, 0, conv.stderr);
      runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', source, out]);
    } finally {
      await server.stop();
    }
  });

  test('qemu:dirty-bitmap:NAME context lists exactly the ranges written while the bitmap recorded', async () => {
    const img = join(dir, 'bitmap.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', img, '16M');
    runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 0 2M', img]);
    qemuImg('bitmap', '--add', img, 'b0');
    runOk('qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 1M 64k', '-c', 'write -P 2 5M 200k', '-c', 'write -P 3 15M 4k', img]);
    const server = await startQemuNbd(img, 'qcow2', { socket: join(dir, 'bitmap.sock'), extra: ['-B', 'b0'] });
    try {
      const reader = await NbdDiskReader.open(server.uri, { dirtyBitmap: 'b0' });
      try {
        const dirty = [];
        for await (const d of reader.dirtyExtents()) dirty.push([d.offset, d.length]);
        // 64 KiB granularity: [1M, +64K), [5M, 5M+256K) (200K rounded up), [15M, +64K)
        assert.deepEqual(dirty, [
          [MiB, 64 * 1024],
          [5 * MiB, 256 * 1024],
          [15 * MiB, 64 * 1024],
        ]);
      } finally {
        await reader.close();
      }
      await assert.rejects(NbdDiskReader.open(server.uri, { dirtyBitmap: 'nope' }), /does not offer the dirty bitmap 'nope'/);
    } finally {
      await server.stop();
    }
  });

  describe('TLS', () => {
    const pki = join(dir, 'pki');
    before(() => {
      runOk('mkdir', ['-p', pki]);
      const ext = join(pki, 'ext.cnf');
      writeFileSync(
        ext,
        'basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n',
      );
      const o = (...a: string[]) => runOk('openssl', a, { cwd: pki });
      o(
        'req',
        '-x509',
        '-newkey',
        'rsa:2048',
        '-nodes',
        '-keyout',
        'ca-key.pem',
        '-out',
        'ca-cert.pem',
        '-subj',
        '/CN=vmferry test CA',
        '-days',
        '2',
        '-addext',
        'basicConstraints=critical,CA:TRUE',
        '-addext',
        'keyUsage=critical,keyCertSign,cRLSign',
      );
      o('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'server-key.pem', '-out', 'server.csr', '-subj', '/CN=localhost');
      o(
        'x509',
        '-req',
        '-in',
        'server.csr',
        '-CA',
        'ca-cert.pem',
        '-CAkey',
        'ca-key.pem',
        '-CAcreateserial',
        '-out',
        'server-cert.pem',
        '-days',
        '2',
        '-extfile',
        ext,
      );
    });

    test('nbds:// with the CA reads the export; plain nbd:// is told TLS is required; a wrong CA is refused', async () => {
      const server = await startQemuNbd(files.raw!, 'raw', {
        tcp: true,
        uriScheme: 'nbds',
        query: `tls-ca=${join(pki, 'ca-cert.pem')}&tls-servername=localhost`,
        extra: ['--object', `tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir=${pki}`, '--tls-creds', 'tls0'],
      });
      try {
        const reader = await openImage(server.uri);
        try {
          assert.equal((reader.details.formatSpecific?.data as { tls?: boolean } | undefined)?.tls, true);
          assert.equal(await sha256OfReader(reader), await sha256ViaQemu(source, 'raw'));
        } finally {
          await reader.close();
        }
        const plain = server.uri.replace(/^nbds:/, 'nbd:').replace(/\?.*$/, '');
        await assert.rejects(
          openImage(plain),
          (e: Error) => e instanceof VmferryError && /requires TLS.*nbds:\/\//.test(e.message),
        );
        const wrongCa = server.uri.replace(/tls-ca=[^&]*/, `tls-ca=${join(pki, 'server-cert.pem')}`);
        await assert.rejects(
          openImage(wrongCa),
          (e: Error) => e instanceof VmferryError && /TLS handshake failed/.test(e.message),
        );
      } finally {
        await server.stop();
      }
    });
  });

  test('refusals: unknown export, nothing listening, a non-NBD peer, bad URIs — one typed line each', async () => {
    const server = await startQemuNbd(files.raw!, 'raw', { socket: join(dir, 'named.sock'), exportName: 'a' });
    try {
      await assert.rejects(
        openImage(server.uri.replace('///a?', '///b?')),
        (e: Error) => e instanceof VmferryError && /no export 'b'/.test(e.message),
      );
    } finally {
      await server.stop();
    }
    await assert.rejects(
      openImage(`nbd+unix:///x?socket=${join(dir, 'absent.sock')}`),
      (e: Error) => e instanceof VmferryError && /cannot connect/.test(e.message),
    );
    const r = vmferry('info', `nbd+unix:///x?socket=${join(dir, 'absent.sock')}`);
    assert.notEqual(r.code, 0);
    assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
    assert.throws(() => parseNbdUri('nbd+unix:///x'), /socket=PATH/);
    assert.throws(() => parseNbdUri('nbd:///x'), /need a host/);
    assert.deepEqual(parseNbdUri('nbd://[::1]:10810/e%2Fx'), { host: '::1', port: 10810, exportName: 'e/x', tls: undefined });
    const f = vmferry('convert', '-f', 'qcow2', `nbd+unix:///x?socket=${join(dir, 'absent.sock')}`, join(dir, 'x.raw'));
    assert.match(f.stderr, /read as raw guest bytes/);
  });

  after(() => {});
});
