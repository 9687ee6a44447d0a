/**
 * The estimate model: allocated size against qemu-img map, the sampled wire ratio against what a
 * real send put on the wire, and the pre-copy rounds against the closed-form V*(D/R)^i.
 */
import assert from 'node:assert/strict';
import { test } from 'node:test';
import '../../src/formats/index.js';
import { openImage } from '../../src/disk/registry.js';
import { estimateTransfer, parseRate, precopy } from '../../src/plan/estimate.js';
import { sendImage } from '../../src/transfer/client.js';
import { realisticRawImage, unwrittenRanges } from '../helpers/images.js';
import { qemuImg, vmferry } from '../helpers/index.js';
import { localAgent, TOKEN } from '../transfer/support.js';

test('allocated bytes match qemu-img map; the sampled ratio brackets a real send', async () => {
  const src = realisticRawImage();
  const map = JSON.parse(qemuImg('map', '--output=json', '-f', 'raw', src)) as {
    start: number;
    length: number;
    data: boolean;
    zero: boolean;
  }[];
  // qemu-img counts the journal mkfs fallocated as data once its pages are cached; vmferry reads
  // it as the zeros it is (filefrag, from e2fsprogs, names those unwritten extents).
  const unwritten = unwrittenRanges(src);
  const overlap = (s: number, e: number) => unwritten.reduce((n, [a, b]) => n + Math.max(0, Math.min(e, b) - Math.max(s, a)), 0);
  const qemuData = map.filter((e) => e.data && !e.zero).reduce((n, e) => n + e.length - overlap(e.start, e.start + e.length), 0);
  const reader = await openImage(src);
  const est = await estimateTransfer(reader, { bandwidth: 10 * 1024 * 1024, codec: 'zstd', samples: 24 });
  await reader.close();
  assert.equal(est.allocatedBytes, qemuData);
  assert.ok(est.ratio.low <= est.ratio.mean && est.ratio.mean <= est.ratio.high);
  assert.ok(est.ratio.mean > 0.02 && est.ratio.mean < 0.9, `ratio ${est.ratio.mean}`);
  // The real thing: what a send of the same image put on the wire.
  const { agent } = await localAgent();
  try {
    const r = await sendImage(src, { url: `${agent.url}/e.raw`, token: TOKEN, codec: 'zstd' });
    const actual = r.wireBytes;
    // A 24-block sample (of ~60) extrapolated: within 25% of the truth, and the interval, widened
    // by the 4 MiB-chunk vs 1 MiB-sample difference, reaches it.
    assert.ok(Math.abs(est.wireBytes.mean - actual) / actual < 0.25, `estimated ${est.wireBytes.mean}, sent ${actual}`);
    assert.ok(
      est.wireBytes.low * 0.85 <= actual && actual <= est.wireBytes.high * 1.15,
      `${actual} outside ${est.wireBytes.low}..${est.wireBytes.high}`,
    );
    assert.equal(est.readBytes, r.dataBytes, 'the estimate reads the same blocks the sender reads');
  } finally {
    await agent.close();
  }
});

test('pre-copy rounds follow V*(D/R)^i and stop when a round fits the downtime', () => {
  const V = 1000;
  const p = precopy(V, 10, 100, 1, { maxDowntime: 0.05 });
  assert.equal(p.converges, true);
  const want = [1000, 100, 10, 1];
  assert.equal(p.rounds.length, want.length);
  for (const [i, r] of p.rounds.entries()) assert.ok(Math.abs(r.bytes - want[i]!) < 1e-9, `round ${i}: ${r.bytes}`);
  assert.ok(Math.abs(p.downtimeSeconds - 0.01) < 1e-12);
  assert.ok(Math.abs(p.totalBytes - 1111) < 1e-9);
  const n = precopy(V, 150, 100, 1);
  assert.equal(n.converges, false);
  assert.match(n.note, /does not converge/);
  assert.ok(n.rounds[1]!.bytes >= n.rounds[0]!.bytes);
  const edge = precopy(V, 100, 100, 1);
  assert.equal(edge.converges, false, 'D = R never converges');
});

test('rates parse as bytes or bits per second', () => {
  assert.equal(parseRate('10M'), 10 * 1024 * 1024);
  assert.equal(parseRate('100Mbit'), 12.5e6);
  assert.equal(parseRate('1Gbps'), 125e6);
  assert.throws(() => parseRate('fast'), /Invalid rate/);
});

test('vmferry estimate prints the model; --dirty-rate above the bandwidth says it does not converge', () => {
  const src = realisticRawImage();
  const ok = vmferry('estimate', '--bandwidth', '50M', '--rtt', '2', '--dirty-rate', '1M', '--samples', '8', src);
  assert.equal(ok.code, 0, ok.stderr);
  assert.match(ok.stdout, /allocated:/);
  assert.match(ok.stdout, /95% interval/);
  assert.match(ok.stdout, /converges: \d+ pre-copy round/);
  const bad = vmferry('estimate', '--bandwidth', '1M', '--dirty-rate', '100M', '--samples', '8', '--output', 'json', src);
  assert.equal(bad.code, 0, bad.stderr);
  const j = JSON.parse(bad.stdout) as { precopy: { converges: boolean; note: string } };
  assert.equal(j.precopy.converges, false);
  assert.match(j.precopy.note, /does not converge/);
});
