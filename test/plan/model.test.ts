/**
 * The transfer-time model's terms against closed-form arithmetic written out here: fixed costs
 * (start, TLS handshakes and round trips), the request window, the CPU ceilings, pipeline fill,
 * fsync and read-back; and estimateTransfer end to end on an image whose sizes are known by
 * construction, with every measured term overridden.
 */
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import '../../src/formats/index.js';
import { openImage } from '../../src/disk/registry.js';
import { type CostModel, estimateTransfer, parseModel, transferTime } from '../../src/plan/estimate.js';
import { patternBuffer, tmpDir } from '../helpers/index.js';

const MiB = 1024 * 1024;
const near = (a: number, b: number, what: string) =>
  assert.ok(Math.abs(a - b) < 1e-9 * Math.max(1, Math.abs(b)), `${what}: ${a} != ${b}`);

const model: CostModel = {
  startSeconds: 0.25,
  tlsSeconds: 0.004,
  senderBytesPerSecond: 100e6,
  agentBytesPerSecond: 200e6,
  verifyBytesPerSecond: 500e6,
  syncBytesPerSecond: 200e6,
};

test("network-bound: fixed + wire/B + one chunk of fill + the last checkpoint's fsync + read-back", () => {
  const t = transferTime(
    { readBytes: 400e6, writtenBytes: 300e6, wireBytes: 200e6, chunks: 100, bandwidth: 20e6, rtt: 0, streams: 4 },
    model,
  );
  // 1 pin check + 4 stream handshakes at 4 ms, no round-trip time.
  near(t.fixed, 0.25 + 5 * 0.004, 'fixed');
  // Headers take 66 of every 1514 bytes on the link (Ethernet, IP, TCP with timestamps).
  const goodput = (20e6 * 1448) / 1514;
  near(t.effectiveBandwidth, goodput, 'window wider than the link');
  near(t.network, 200e6 / goodput, 'network');
  near(t.sender, 4, 'sender');
  near(t.agent, 2, 'agent');
  assert.equal(t.limitedBy, 'network');
  near(t.fill, 4e6 / 100e6 + 4e6 / 200e6, 'fill');
  // The agent flushed at each 64 MiB checkpoint on the way; only the data after the last one is left.
  near(t.sync, (64 * MiB) / 200e6, 'sync');
  near(t.verify, 400e6 / 500e6, 'verify');
  near(t.total, 0.27 + 200e6 / goodput + 0.06 + (64 * MiB) / 200e6 + 0.8, 'total');
  const spaced = transferTime(
    {
      readBytes: 400e6,
      writtenBytes: 300e6,
      wireBytes: 200e6,
      chunks: 100,
      bandwidth: 20e6,
      rtt: 0,
      streams: 4,
      checkpointBytes: 16e6,
    },
    model,
  );
  near(spaced.sync, 16e6 / 200e6, 'sync with --checkpoint-every 16M');
});

test('a long round trip narrows the window: streams x chunk / (RTT + chunk/B)', () => {
  const t = transferTime(
    { readBytes: 40e6, writtenBytes: 40e6, wireBytes: 40e6, chunks: 10, bandwidth: 100e6, rtt: 0.5, streams: 2 },
    model,
  );
  const window = (2 * 4e6) / (0.5 + 4e6 / 100e6);
  near(t.effectiveBandwidth, window, 'window');
  near(t.network, 40e6 / window, 'network');
  // 3 handshakes each a round trip, then begin and finish.
  near(t.fixed, 0.25 + 3 * (0.004 + 0.5) + 2 * 0.5, 'fixed');
  assert.equal(t.limitedBy, 'network');
});

test('a slow core caps the flow: sender CPU beats a fast link', () => {
  const t = transferTime(
    { readBytes: 1e9, writtenBytes: 1e9, wireBytes: 0.3e9, chunks: 239, bandwidth: 1e9, rtt: 0, streams: 4 },
    { ...model, senderBytesPerSecond: 50e6 },
  );
  assert.equal(t.limitedBy, 'sender-cpu');
  near(t.flow, 1e9 / 50e6, 'flow');
  const slowAgent = transferTime(
    { readBytes: 1e9, writtenBytes: 1e9, wireBytes: 0.3e9, chunks: 239, bandwidth: 1e9, rtt: 0, streams: 4 },
    { ...model, agentBytesPerSecond: 40e6 },
  );
  assert.equal(slowAgent.limitedBy, 'agent-cpu');
  near(slowAgent.flow, 25, 'flow');
});

test('--model parses seconds and rates, refuses unknown keys', () => {
  assert.deepEqual(parseModel('start=0.3,sync=150M,tls=0.01'), {
    startSeconds: 0.3,
    syncBytesPerSecond: 150 * MiB,
    tlsSeconds: 0.01,
  });
  assert.deepEqual(parseModel('agent=800Mbit'), { agentBytesPerSecond: 100e6 });
  assert.throws(() => parseModel('speed=3'), /not one of start, tls, sender, agent, verify, sync/);
  assert.throws(() => parseModel('start=-1'), /must be seconds/);
});

test('estimateTransfer with every term given: 8 MiB of incompressible data, computed by hand', async () => {
  const src = join(tmpDir('vmferry-model-'), 'dense8.raw');
  writeFileSync(src, patternBuffer(8 * MiB, 3));
  const reader = await openImage(src);
  try {
    const est = await estimateTransfer(reader, { bandwidth: 2 * MiB, codec: 'none', rtt: 0.01, streams: 4, model });
    // Sizes by construction: 8 MiB, no zero grain, sent as is, two 4 MiB chunks.
    assert.equal(est.readBytes, 8 * MiB);
    assert.equal(est.writtenBytes, 8 * MiB);
    assert.equal(est.wireBytes.mean, 8 * MiB);
    assert.equal(est.requests, 4);
    const R = 8 * MiB;
    const fixed = 0.25 + (1 + 2) * (0.004 + 0.01) + 2 * 0.01;
    const window = (4 * 4 * MiB) / (0.01 + (4 * MiB) / (2 * MiB));
    const network = R / Math.min((2 * MiB * 1448) / 1514, window);
    const fill = (4 * MiB) / 100e6 + (4 * MiB) / 200e6;
    const want = fixed + Math.max(network, R / 100e6, R / 200e6) + fill + R / 200e6 + R / 500e6;
    near(est.seconds!.mean, want, 'seconds');
    assert.equal(est.limitedBy, 'network');
  } finally {
    await reader.close();
  }
});
