/**
 * `serve --max-file-size`: a declared virtual size over the limit is refused at begin; a target
 * whose written bytes pass the limit (format metadata on top of dense data) is abandoned mid-way;
 * both with a clear error to the sender, an audit line, and nothing left in ROOT. At or under the
 * limit the transfer completes and qemu-img compare finds it identical.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { sendImage } from '../../src/transfer/client.js';
import { verifyAuditLog } from '../../src/transfer/security.js';
import { patternBuffer, qemuImg, tmpDir } from '../helpers/index.js';
import { exited, identical, localAgent, sendChild, serveChild, TOKEN } from './support.js';

const MiB = 1024 * 1024;

/** 8 MiB of incompressible data, every block allocated. */
function denseImage(): string {
  const path = join(tmpDir('vmferry-limits-src-'), 'dense.raw');
  writeFileSync(path, patternBuffer(8 * MiB, 7));
  return path;
}

/** ROOT holds nothing but the agent's own bookkeeping (audit log, token/cert folder, an empty partial folder). */
function assertRootClean(root: string): void {
  const own = ['.vmferry-audit.log', '.vmferry-partial', '.vmferry-agent'];
  const left = readdirSync(root).filter((f) => !own.includes(f));
  assert.deepEqual(left, [], `left in ROOT: ${left.join(', ')}`);
  const partial = readdirSync(join(root, '.vmferry-partial'));
  assert.deepEqual(partial, [], `left in the partial folder: ${partial.join(', ')}`);
}

function auditEvents(root: string): { event: string; reason?: string; name?: string }[] {
  const path = join(root, '.vmferry-audit.log');
  verifyAuditLog(path);
  return readFileSync(path, 'utf8')
    .trim()
    .split('\n')
    .map((l) => JSON.parse(l) as { event: string; reason?: string; name?: string });
}

test('a declared virtual size over --max-file-size is refused at begin, audited, nothing written', async () => {
  const src = denseImage();
  const { agent, root } = await localAgent({ maxFileSize: 8 * MiB - 1 });
  try {
    await assert.rejects(sendImage(src, { url: `${agent.url}/big.raw`, token: TOKEN, codec: 'none' }), (err: Error) =>
      /declared virtual size 8388608 exceeds the agent's --max-file-size of 8388607 bytes/.test(err.message),
    );
    const refused = auditEvents(root).filter((e) => e.event === 'refused');
    assert.equal(refused.length, 1);
    assert.equal(refused[0]!.name, 'big.raw');
    assert.match(refused[0]!.reason!, /exceeds the agent's --max-file-size/);
    assertRootClean(root);
  } finally {
    await agent.close();
  }
});

test('written bytes over the limit (qcow2 metadata on top of 8 MiB of data) abandon the transfer; raw at the limit passes', async () => {
  const src = denseImage();
  // Independent evidence that the qcow2 of this image is larger than 8 MiB: qemu-img's own.
  const ref = join(tmpDir('vmferry-limits-ref-'), 'ref.qcow2');
  qemuImg('convert', '-f', 'raw', '-O', 'qcow2', src, ref);
  assert.ok(statSync(ref).size > 8 * MiB, `qemu-img's qcow2 is ${statSync(ref).size} bytes`);

  const { agent, root } = await localAgent({ maxFileSize: 8 * MiB });
  try {
    await assert.rejects(
      sendImage(src, { url: `${agent.url}/over.qcow2`, token: TOKEN, codec: 'none', targetFormat: 'qcow2' }),
      (err: Error) => {
        // The refusal comes after chunks were written (the agent counted the bytes it wrote)...
        assert.match(
          err.message,
          /over\.qcow2: the written image reached \d+ bytes, over the agent's --max-file-size of 8388608/,
        );
        // ...yet the same send would be refused again, so the line must not suggest resuming.
        assert.doesNotMatch(err.message, /resume/);
        return true;
      },
    );
    const refused = auditEvents(root).filter((e) => e.event === 'refused' && e.name === 'over.qcow2');
    assert.equal(refused.length, 1, 'one audit line for the abandoned transfer');
    assertRootClean(root);

    // Raw of the same image is exactly 8 MiB: allowed, and identical to the source.
    const r = await sendImage(src, { url: `${agent.url}/fits.raw`, token: TOKEN, codec: 'none' });
    assert.equal(r.fileSize, 8 * MiB);
    assert.ok(identical(src, join(root, 'fits.raw'), 'raw'));
  } finally {
    await agent.close();
  }
});

test('vmferry serve --max-file-size: the sender gets one clear line, no stack trace', async () => {
  const src = denseImage();
  const dir = tmpDir('vmferry-limits-cli-');
  const root = join(dir, 'root');
  const tokenFile = join(dir, 'token');
  writeFileSync(tokenFile, `${TOKEN}\n`);
  mkdirSync(root);
  const served = await serveChild(root, tokenFile, ['--max-file-size', '4M']);
  try {
    const r = await sendChild(['-c', 'none', src, `${served.url}/cli.raw`], { VMFERRY_TOKEN: TOKEN });
    assert.notEqual(r.code, 0);
    const lines = r.stderr.trim().split('\n');
    assert.equal(lines.length, 1, r.stderr);
    assert.match(lines[0]!, /exceeds the agent's --max-file-size of 4194304 bytes/);
    assert.doesNotMatch(r.stderr, /\n\s+at /);
    assertRootClean(root);
  } finally {
    served.child.kill('SIGTERM');
    await exited(served.child);
  }
});
