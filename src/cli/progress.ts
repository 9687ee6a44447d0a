import { createRequire } from 'node:module';
import type { CopyProgress } from '../convert/pipeline.js';
import { humanSize } from './common.js';

/**
 * -p: a bar with rate and ETA on a terminal; on anything else a plain line every few seconds
 * (logs and CI stay readable).
 */
export function progressReporter(enabled: boolean, label: string): { update: (p: CopyProgress) => void; stop: () => void } {
  if (!enabled) return { update: () => {}, stop: () => {} };
  const started = Date.now();
  if (process.stderr.isTTY) {
    // Loaded only for a bar on a terminal: it costs about 25 ms of start-up otherwise paid by every run.
    const cliProgress = createRequire(import.meta.url)('cli-progress') as typeof import('cli-progress');
    const bar = new cliProgress.SingleBar(
      {
        stream: process.stderr,
        format: `${label} [{bar}] {percentage}% | {rate}/s | ETA {eta_formatted}`,
        hideCursor: true,
        etaBuffer: 50,
      },
      cliProgress.Presets.shades_classic,
    );
    bar.start(100, 0, { rate: '0 B' });
    return {
      update: (p) => {
        const secs = Math.max(0.001, (Date.now() - started) / 1000);
        bar.update(p.total ? (100 * p.done) / p.total : 100, { rate: humanSize(Math.round(p.done / secs)) });
      },
      stop: () => bar.stop(),
    };
  }
  let last = 0;
  let lastDone = -1;
  const line = (p: CopyProgress) => {
    const secs = Math.max(0.001, (Date.now() - started) / 1000);
    const pct = p.total ? (100 * p.done) / p.total : 100;
    const rate = p.done / secs;
    const eta = rate > 0 ? Math.round((p.total - p.done) / rate) : 0;
    process.stderr.write(
      `${label}: ${pct.toFixed(2)}% (${humanSize(p.done)} of ${humanSize(p.total)}, ${humanSize(Math.round(rate))}/s, ETA ${eta}s)\n`,
    );
    lastDone = p.done;
  };
  let latest: CopyProgress = { done: 0, total: 0 };
  return {
    update: (p) => {
      latest = p;
      const now = Date.now();
      if (now - last >= 2000) {
        last = now;
        line(p);
      }
    },
    stop: () => {
      if (latest.done !== lastDone) line(latest);
    },
  };
}
