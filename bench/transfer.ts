/**
 * Transfer benchmark (run by hand: `node dist/bench/transfer.js [IMAGE] [RATE...]`): for each
 * bandwidth limit, `vmferry estimate`'s prediction next to a measured loopback send with --rate.
 * Prints, never asserts. Target: within 15%.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import '../src/formats/index.js';
import { openImage } from '../src/disk/registry.js';
import { estimateTransfer, parseRate } from '../src/plan/estimate.js';
import { startAgent } from '../src/transfer/agent.js';
import { sendImage } from '../src/transfer/client.js';
import type { WireCodec } from '../src/transfer/protocol.js';
import { realisticRawImage } from '../test/helpers/images.js';

async function main(): Promise<void> {
  const args = process.argv.slice(2);
  const image = args[0] && !/^\d/.test(args[0]) ? args.shift()! : realisticRawImage();
  const rates = (args.length ? args : ['4M', '8M', '16M']).map(parseRate);
  const codecs: WireCodec[] = ['zstd', 'none'];
  const base = mkdtempSync(join(tmpdir(), 'vmferry-bench-transfer-'));
  const root = join(base, 'root');
  mkdirSync(root);
  const token = 'bench-token-0123456789abcdef';
  const agent = await startAgent({ host: '127.0.0.1', port: 0, root, token });
  console.log(`image ${image}`);
  console.log('codec  rate(MiB/s)  estimate(s) [95%]        measured(s)  error   wire(MiB) est/actual');
  try {
    let n = 0;
    for (const codec of codecs) {
      for (const rate of rates) {
        const reader = await openImage(image);
        const est = await estimateTransfer(reader, { bandwidth: rate, codec, rtt: 0.0002, streams: 4 });
        await reader.close();
        const r = await sendImage(image, { url: `${agent.url}/b${n++}.raw`, token, codec, rate, streams: 4 });
        const e = est.seconds!;
        const err = (e.mean - r.seconds) / r.seconds;
        console.log(
          `${codec.padEnd(6)} ${(rate / 1048576).toFixed(1).padStart(11)}  ${e.mean.toFixed(2).padStart(6)} [${e.low.toFixed(2)}..${e.high.toFixed(2)}]`.padEnd(
            45,
          ) +
            `${r.seconds.toFixed(2).padStart(9)}  ${(err * 100).toFixed(1).padStart(5)}%   ${(est.wireBytes.mean / 1048576).toFixed(1)}/${(r.wireBytes / 1048576).toFixed(1)}  (${est.limitedBy})`,
        );
      }
    }
  } finally {
    await agent.close();
    rmSync(base, { recursive: true, force: true });
  }
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
