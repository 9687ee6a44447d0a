/**
 * What the network and strangers can do: no token, a wrong token, path-escaping names, replayed
 * and truncated requests (each refused, audited, nothing written outside ROOT); a proxy that flips
 * bits in transit (re-sends, never a wrong result); 20 concurrent senders into one agent.
 */
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { dirname, join } from 'node:path';
import { test } from 'node:test';
import { sendImage } from '../../src/transfer/client.js';
import { chunkDigest, encodeChunk, PROTOCOL_VERSION } from '../../src/transfer/protocol.js';
import { verifyAuditLog } from '../../src/transfer/security.js';
import { realisticRawImage, sparseRawImage } from '../helpers/images.js';
import { identical, localAgent, prng, TOKEN } from './support.js';

const MiB = 1024 * 1024;

function raw(
  url: string,
  method: string,
  path: string,
  body: Buffer,
  headers: Record<string, string>,
): Promise<{ status: number; body: Record<string, string> }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      new URL(path, url),
      { method, headers: { 'content-length': String(body.length), ...headers } },
      (res) => {
        const parts: Buffer[] = [];
        res.on('data', (d: Buffer) => parts.push(d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(Buffer.concat(parts).toString() || '{}') }));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

const auth = { authorization: `Bearer ${TOKEN}` };

test('no token, wrong token, escaping names, replayed and truncated requests are refused and audited', async () => {
  const { agent, root, base } = await localAgent();
  try {
    const begin = Buffer.from(
      JSON.stringify({
        version: PROTOCOL_VERSION,
        format: 'raw',
        options: {},
        virtualSize: 4 * MiB,
        sourceKey: 'k',
        source: 'test',
      }),
    );
    let r = await raw(agent.url, 'POST', '/v1/a.raw/begin', begin, {});
    assert.equal(r.status, 401);
    assert.match(r.body.error, /no bearer token/);
    r = await raw(agent.url, 'POST', '/v1/a.raw/begin', begin, { authorization: 'Bearer not-the-token-at-all' });
    assert.equal(r.status, 401);
    assert.match(r.body.error, /wrong token/);
    for (const name of ['..%2F..%2Fescape.raw', '.hidden', 'a%5Cb.raw', 'x..y']) {
      r = await raw(agent.url, 'POST', `/v1/${name}/begin`, begin, auth);
      assert.equal(r.status, 400, name);
      assert.match(r.body.error, /refused name/, name);
    }
    // A literal ../ in the path never reaches a handler as a name either.
    r = await raw(agent.url, 'POST', '/v1/../../escape.raw/begin', begin, auth);
    assert.ok(r.status === 404 || r.status === 400, `status ${r.status}`);

    // A real session, one chunk, then the same chunk again: a replay.
    r = await raw(agent.url, 'POST', '/v1/a.raw/begin', begin, auth);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    const session = r.body.session as string;
    const data = Buffer.alloc(MiB, 7);
    const pieces = [{ d: [0, MiB] as [number, number], runs: [['d', MiB]] as ['d', number][] }];
    const meta = { session, start: 0, end: MiB, pieces, codec: 'none' as const, rawLength: MiB };
    const body = Buffer.concat(encodeChunk({ ...meta, digest: chunkDigest(meta, data) }, data));
    r = await raw(agent.url, 'PUT', '/v1/a.raw/chunk', body, auth);
    assert.equal(r.status, 200, JSON.stringify(r.body));
    r = await raw(agent.url, 'PUT', '/v1/a.raw/chunk', body, auth);
    assert.equal(r.status, 409);
    assert.match(r.body.error, /replayed/);
    // A chunk whose body is cut short of what its header declares.
    const short = body.subarray(0, body.length - 1000);
    r = await raw(agent.url, 'PUT', '/v1/a.raw/chunk', short, auth);
    assert.ok(r.status === 400 || r.status === 422, `status ${r.status}`);
    // A request whose connection ends before its Content-Length arrived.
    await new Promise<void>((resolve) => {
      const port = Number(new URL(agent.url).port);
      const s = net.connect(port, '127.0.0.1', () => {
        s.end(
          `PUT /v1/a.raw/chunk HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${TOKEN}\r\nContent-Length: 100000\r\n\r\n${'x'.repeat(100)}`,
        );
      });
      s.on('close', () => resolve());
      s.on('error', () => resolve());
      s.resume();
    });
    await new Promise((r2) => setTimeout(r2, 200));
    const audit = verifyAuditLog(agent.auditPath);
    assert.ok(audit.ok, `audit chain broken at line ${audit.brokenAt}`);
    const reasons = audit.entries.filter((e) => e.event === 'refused').map((e) => String(e.reason));
    for (const want of [/no bearer token/, /wrong token/, /separator/, /'\.\.'/, /starts with '\.'/, /replayed/, /truncated/]) {
      assert.ok(
        reasons.some((x) => want.test(x)),
        `audit has ${want}: ${reasons.join(' | ')}`,
      );
    }
    // Nothing escaped: the test folder holds only the root, and the root only hidden agent files.
    assert.deepEqual(readdirSync(base), ['root']);
    assert.deepEqual(
      readdirSync(root).filter((n) => !n.startsWith('.')),
      [],
    );
    assert.deepEqual(
      readdirSync(dirname(base)).filter((n) => n === 'escape.raw'),
      [],
    );
  } finally {
    await agent.close();
  }
});

test('the audit chain detects an edited line', async () => {
  const { agent } = await localAgent();
  await raw(agent.url, 'POST', '/v1/x/begin', Buffer.from('{}'), {});
  await agent.close();
  const { readFileSync, writeFileSync } = await import('node:fs');
  const lines = readFileSync(agent.auditPath, 'utf8').split('\n');
  assert.ok(verifyAuditLog(agent.auditPath).ok);
  lines[1] = lines[1]!.replace('no bearer token', 'all fine');
  writeFileSync(agent.auditPath, lines.join('\n'));
  const v = verifyAuditLog(agent.auditPath);
  assert.equal(v.ok, false);
  assert.equal(v.brokenAt, 3);
});

/** An HTTP proxy that flips one random bit in some chunk bodies on their way to the agent. */
async function flippingProxy(
  target: string,
  seed: number,
  probability: number,
): Promise<{ url: string; flips: () => number; close: () => Promise<void> }> {
  const rnd = prng(seed);
  let flips = 0;
  const server = http.createServer((req, res) => {
    const parts: Buffer[] = [];
    req.on('data', (d: Buffer) => parts.push(d));
    req.on('end', () => {
      const body = Buffer.concat(parts);
      if (req.url?.endsWith('/chunk') && body.length > 0 && rnd() < probability) {
        const at = Math.floor(rnd() * body.length);
        body[at] = body[at]! ^ (1 << Math.floor(rnd() * 8));
        flips++;
      }
      const up = http.request(new URL(req.url!, target), { method: req.method, headers: req.headers }, (ur) => {
        res.writeHead(ur.statusCode ?? 502, ur.headers);
        ur.pipe(res);
      });
      up.on('error', () => res.destroy());
      up.end(body);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const port = (server.address() as net.AddressInfo).port;
  return {
    url: `http://127.0.0.1:${port}`,
    flips: () => flips,
    close: () =>
      new Promise((r) => {
        server.close(() => r());
        server.closeAllConnections();
      }),
  };
}

test('a proxy flipping bits in transit causes re-sends, never a wrong result', async () => {
  const { agent, root } = await localAgent();
  const src = sparseRawImage(64 * MiB, 'sparse-64M-transfer.raw');
  try {
    let totalFlips = 0;
    let totalResent = 0;
    for (const [seed, codec, image] of [
      [1, 'zstd', realisticRawImage()],
      [2, 'none', src],
      [3, 'zlib', src],
    ] as const) {
      const proxy = await flippingProxy(agent.url, seed, 0.5);
      try {
        const r = await sendImage(image, {
          url: `${proxy.url}/flip-${seed}.qcow2`,
          token: TOKEN,
          targetFormat: 'qcow2',
          codec,
          maxAttempts: 30,
        });
        assert.ok(identical(image, join(root, `flip-${seed}.qcow2`), 'qcow2'), `seed ${seed}`);
        assert.equal(r.resentChunks, proxy.flips(), 'every flipped chunk was re-sent, nothing else');
        totalFlips += proxy.flips();
        totalResent += r.resentChunks;
      } finally {
        await proxy.close();
      }
    }
    assert.ok(totalFlips > 0, 'the proxy did flip bits');
    assert.equal(totalResent, totalFlips);
    const damaged = verifyAuditLog(agent.auditPath).entries.filter((e) => e.event === 'chunk-damaged' || e.event === 'refused');
    assert.ok(damaged.length > 0);
  } finally {
    await agent.close();
  }
});

test('20 concurrent senders into one agent (at most 6 at once) all finish identical', async () => {
  const { agent, root } = await localAgent({ maxTransfers: 6 });
  const src = sparseRawImage(64 * MiB, 'sparse-64M-transfer.raw');
  const formats = ['raw', 'qcow2', 'vmdk', 'vpc', 'vhdx', 'vdi'];
  try {
    const results = await Promise.all(
      Array.from({ length: 20 }, (_, i) =>
        sendImage(src, {
          url: `${agent.url}/many-${i}.img`,
          token: TOKEN,
          targetFormat: formats[i % formats.length],
          streams: 2,
        }),
      ),
    );
    assert.equal(new Set(results.map((r) => r.digest)).size, 1, 'one content digest for all');
    for (let i = 0; i < 20; i++) {
      assert.ok(identical(src, join(root, `many-${i}.img`), formats[i % formats.length]), `sender ${i}`);
    }
    const audit = verifyAuditLog(agent.auditPath);
    assert.ok(audit.ok);
    assert.equal(audit.entries.filter((e) => e.event === 'complete').length, 20);
  } finally {
    await agent.close();
  }
});
