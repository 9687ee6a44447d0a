/**
 * A hostile NBD server (a few lines of node speaking just enough of the protocol) must not make
 * the client hang, allocate what it claims, or write outside the caller's buffer: every bad
 * answer becomes one typed VmferryError naming the URI.
 */
import assert from 'node:assert/strict';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { after, test } from 'node:test';
import { VmferryError } from '../../src/disk/errors.js';
import { NbdDiskReader } from '../../src/transfer/nbd/index.js';
import { tmpDir } from '../helpers/index.js';

type Mode = 'oob-data' | 'huge-chunk' | 'unknown-cookie' | 'huge-size' | 'empty-extent' | 'bad-magic' | 'close-mid-read';

const dir = tmpDir('vmferry-nbd-hostile-');
const servers: Server[] = [];
after(() => {
  for (const s of servers) s.close();
});

function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0, 0);
  return b;
}

function optReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(0x3e889045565a9n, 0);
  h.writeUInt32BE(option, 8);
  h.writeUInt32BE(type, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
}

function structured(flags: number, type: number, cookie: Buffer, payload: Buffer, claimed = payload.length): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(0x668e33ef, 0);
  h.writeUInt16BE(flags, 4);
  h.writeUInt16BE(type, 6);
  cookie.copy(h, 8);
  h.writeUInt32BE(claimed >>> 0, 16);
  return Buffer.concat([h, payload]);
}

async function hostile(mode: Mode): Promise<string> {
  const path = join(dir, `${mode}.sock`);
  const server = createServer((sock: Socket) => {
    let buf = Buffer.alloc(0);
    let phase: 'flags' | 'options' | 'transmission' = 'flags';
    sock.on('error', () => {});
    const head = Buffer.alloc(18);
    head.write('NBDMAGIC', 0, 'latin1');
    head.writeBigUInt64BE(0x49484156454f5054n, 8);
    head.writeUInt16BE(3, 16);
    sock.write(head);
    sock.on('data', (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (phase === 'flags') {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = 'options';
        } else if (phase === 'options') {
          if (buf.length < 16) return;
          const option = buf.readUInt32BE(8);
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          buf = buf.subarray(16 + len);
          if (option === 8) sock.write(optReply(8, 1));
          else if (option === 10) {
            sock.write(optReply(10, 4, Buffer.concat([u32(1), Buffer.from('base:allocation')])));
            sock.write(optReply(10, 1));
          } else if (option === 7) {
            const info = Buffer.alloc(12);
            info.writeUInt16BE(0, 0);
            info.writeBigUInt64BE(mode === 'huge-size' ? 1n << 62n : 1n << 20n, 2);
            info.writeUInt16BE(1, 10);
            sock.write(optReply(7, 3, info));
            sock.write(optReply(7, 1));
            phase = 'transmission';
          } else sock.write(optReply(option, 0x80000001));
        } else {
          if (buf.length < 28) return;
          const type = buf.readUInt16BE(6);
          const cookie = Buffer.from(buf.subarray(8, 16));
          const offset = buf.readBigUInt64BE(16);
          const length = buf.readUInt32BE(24);
          buf = buf.subarray(28);
          if (type === 2) return;
          if (mode === 'bad-magic') sock.write(Buffer.from('HTTP/1.1 400 Bad Request\r\n\r\n'));
          else if (mode === 'unknown-cookie') sock.write(structured(1, 0, Buffer.alloc(8, 0xee), Buffer.alloc(0)));
          else if (mode === 'huge-chunk') sock.write(structured(1, 1, cookie, Buffer.alloc(8), 0xfffffff0));
          else if (mode === 'close-mid-read') {
            sock.write(structured(1, 1, cookie, Buffer.alloc(8), 8 + length).subarray(0, 30));
            sock.end();
          } else if (mode === 'oob-data') {
            const p = Buffer.alloc(8 + length, 0x41);
            p.writeBigUInt64BE(offset + BigInt(length), 0);
            sock.write(structured(1, 1, cookie, p));
          } else if (mode === 'empty-extent') {
            sock.write(structured(1, 5, cookie, Buffer.concat([u32(1), u32(0), u32(0)])));
          }
        }
      }
    });
  });
  servers.push(server);
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return `nbd+unix:///x?socket=${path}`;
}

const typed = (re: RegExp) => (e: Error) => e instanceof VmferryError && re.test(e.message) && (e.file ?? '').includes('socket=');

test('a read chunk outside the request is refused, not copied', async () => {
  const r = await NbdDiskReader.open(await hostile('oob-data'));
  const into = Buffer.alloc(4096 + 64, 0x11);
  await assert.rejects(r.read(0, 4096, into.subarray(0, 4096)), typed(/outside the request/));
  assert.ok(
    into.subarray(4096).every((b) => b === 0x11),
    'nothing written past the caller buffer',
  );
  await r.close();
});

test('a chunk claiming ~4 GiB for a 4 KiB read is refused before any allocation', async () => {
  const r = await NbdDiskReader.open(await hostile('huge-chunk'));
  await assert.rejects(r.read(0, 4096), typed(/reply chunk of \d+ bytes/));
  await r.close();
});

test('a reply for a request never made, a non-NBD reply, a server closing mid-read', async () => {
  for (const [mode, re] of [
    ['unknown-cookie', /unknown request/],
    ['bad-magic', /unknown reply magic/],
    ['close-mid-read', /closed the connection|connection lost/],
  ] as const) {
    const r = await NbdDiskReader.open(await hostile(mode));
    await assert.rejects(r.read(0, 512), typed(re), mode);
    // The connection is dead: later requests fail at once instead of hanging.
    await assert.rejects(r.read(0, 512), (e: Error) => e instanceof VmferryError, mode);
    await r.close();
  }
});

test('an empty block-status extent and an export size past 2^53 are refused', async () => {
  const r = await NbdDiskReader.open(await hostile('empty-extent'));
  await assert.rejects(
    async () => {
      for await (const _ of r.extents()) {
        // walk
      }
    },
    typed(/empty extent/),
  );
  await r.close();
  // 2^62 bytes is past what offsets can address exactly (2^53): refused at the handshake.
  await assert.rejects(NbdDiskReader.open(await hostile('huge-size')), typed(/export size/));
});
