/**
 * Loopback sends of the realistic GPT+ext4 image and a sparse one into every target format,
 * judged by qemu-img compare against the source; TLS with a pinned certificate on one of them.
 */
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { after, before, test } from 'node:test';
import { startAgent } from '../../src/transfer/agent.js';
import { sendImage } from '../../src/transfer/client.js';
import { certFingerprint, ensureCertificate, verifyAuditLog } from '../../src/transfer/security.js';
import { realisticRawImage, sparseRawImage } from '../helpers/images.js';
import { tmpDir } from '../helpers/index.js';
import { identical, localAgent, qemuInfoFormat, TOKEN } from './support.js';

const FORMATS = ['raw', 'qcow2', 'vmdk', 'vpc', 'vhdx', 'vdi'];
let ctx: Awaited<ReturnType<typeof localAgent>>;
before(async () => {
  ctx = await localAgent();
});
after(async () => {
  await ctx.agent.close();
});

for (const fmt of FORMATS) {
  test(`realistic and sparse images arrive identical as ${fmt}`, async () => {
    const realistic = realisticRawImage();
    const sparse = sparseRawImage(1024 * 1024 * 1024, 'sparse-1G-transfer.raw');
    const r1 = await sendImage(realistic, { url: `${ctx.agent.url}/real-${fmt}.img`, token: TOKEN, targetFormat: fmt });
    const out1 = join(ctx.root, `real-${fmt}.img`);
    assert.equal(qemuInfoFormat(out1), fmt === 'vpc' ? 'vpc' : fmt);
    assert.ok(identical(realistic, out1, fmt), `qemu-img compare: realistic as ${fmt}`);
    // Only allocated data travels, compressed: far less than the 256 MiB virtual size.
    assert.ok(r1.dataBytes < 80 * 1024 * 1024, `data sent ${r1.dataBytes}`);
    assert.ok(r1.wireBytes < r1.dataBytes, `zstd shrank the data (${r1.wireBytes} < ${r1.dataBytes})`);

    const r2 = await sendImage(sparse, {
      url: `${ctx.agent.url}/sparse-${fmt}.img`,
      token: TOKEN,
      targetFormat: fmt,
      codec: 'none',
    });
    const out2 = join(ctx.root, `sparse-${fmt}.img`);
    assert.ok(identical(sparse, out2, fmt), `qemu-img compare: sparse as ${fmt}`);
    // 3 MiB + 4 KiB of data in a 1 GiB disk: the holes are described, not sent (data is read in
    // blocks of max(1 MiB, the target's block size), its zero 4 KiB grains are not sent).
    assert.ok(r2.dataBytes <= 10 * 1024 * 1024, `sparse data read ${r2.dataBytes}`);
    assert.ok(r2.wireBytes <= 4 * 1024 * 1024, `sparse wire bytes ${r2.wireBytes}`);
    assert.equal(r2.resentChunks, 0);
  });
}

test('the agent leaves only finished images in its root, and the audit chain verifies', () => {
  const names = readdirSync(ctx.root).filter((n) => !n.startsWith('.'));
  assert.equal(names.length, FORMATS.length * 2);
  assert.deepEqual(readdirSync(join(ctx.root, '.vmferry-partial')), []);
  const audit = verifyAuditLog(ctx.agent.auditPath);
  assert.ok(audit.ok);
  assert.equal(audit.entries.filter((e) => e.event === 'complete').length, FORMATS.length * 2);
});

test('TLS 1.3 with a generated certificate: pinned fingerprint works, a wrong pin or no pin is refused', async () => {
  const dir = tmpDir('vmferry-tls-');
  const root = join(dir, 'root');
  execFileSync('mkdir', [root]);
  ensureCertificate(join(dir, 'cert.pem'), join(dir, 'key.pem'), ['127.0.0.1']);
  const cert = readFileSync(join(dir, 'cert.pem'));
  const agent = await startAgent({
    host: '127.0.0.1',
    port: 0,
    root,
    token: TOKEN,
    tls: { cert, key: readFileSync(join(dir, 'key.pem')) },
  });
  try {
    assert.match(agent.url, /^https:/);
    const src = sparseRawImage(64 * 1024 * 1024, 'sparse-64M-transfer.raw');
    const fp = certFingerprint(cert);
    const r = await sendImage(src, { url: `${agent.url}/tls.qcow2`, token: TOKEN, targetFormat: 'qcow2', fingerprint: fp });
    assert.ok(identical(src, join(root, 'tls.qcow2'), 'qcow2'));
    assert.ok(r.chunks > 0);
    // openssl's own view of the fingerprint agrees with the one we pin.
    const viaOpenssl = execFileSync('openssl', [
      'x509',
      '-noout',
      '-fingerprint',
      '-sha256',
      '-in',
      join(dir, 'cert.pem'),
    ]).toString();
    assert.ok(viaOpenssl.trim().endsWith(fp), `${viaOpenssl} vs ${fp}`);
    const wrong = fp.replace(/^../, fp.startsWith('00') ? '11' : '00');
    await assert.rejects(
      sendImage(src, { url: `${agent.url}/wrong-pin.raw`, token: TOKEN, fingerprint: wrong }),
      /does not match the pinned/,
    );
    await assert.rejects(sendImage(src, { url: `${agent.url}/no-pin.raw`, token: TOKEN }), /not trusted.*--fingerprint/);
    assert.deepEqual(
      readdirSync(root).filter((n) => !n.startsWith('.')),
      ['tls.qcow2'],
    );
  } finally {
    await agent.close();
  }
});
