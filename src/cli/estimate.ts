import { UsageError } from '../disk/errors.js';
import { openImage } from '../disk/registry.js';
import { estimateTransfer, parseModel, parseRate } from '../plan/estimate.js';
import { WIRE_CODECS, type WireCodec } from '../transfer/protocol.js';
import { humanSize, openingOptions, outputMode, outputOption, parse, positionals, printJson, stdout } from './common.js';

export const usage =
  'vmferry estimate [-f FMT] [--bandwidth RATE] [--rtt MS] [-c zstd|zlib|none] [--streams N] [--model start=S,tls=S,sender=RATE,agent=RATE,verify=RATE,sync=RATE] [--dirty-rate RATE] [--max-downtime MS] [--samples N] SRC';

export async function estimateCommand(args: string[]): Promise<number> {
  const { values, positionals: pos } = parse(
    args,
    {
      ...openingOptions,
      ...outputOption,
      format: { type: 'string', short: 'f' },
      bandwidth: { type: 'string' },
      rtt: { type: 'string' },
      compress: { type: 'string', short: 'c' },
      level: { type: 'string' },
      streams: { type: 'string' },
      model: { type: 'string' },
      'dirty-rate': { type: 'string' },
      'max-downtime': { type: 'string' },
      samples: { type: 'string' },
    },
    usage,
  );
  const [src] = positionals(pos, 1, usage, ['SRC']);
  const mode = outputMode(values.output);
  const codec = (values.compress ?? 'zstd') as WireCodec;
  if (!WIRE_CODECS.includes(codec)) throw new UsageError(`-c must be one of ${WIRE_CODECS.join(', ')}`);
  const num = (v: string | undefined, what: string) => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isFinite(n) || n < 0) throw new UsageError(`${what} must be a non-negative number, not '${v}'`);
    return n;
  };
  const reader = await openImage(src!, {
    format: values.format,
    allowExternalFiles: values['allow-external-files'],
    ignoreParentId: values['ignore-parent-id'],
  });
  try {
    const est = await estimateTransfer(reader, {
      bandwidth: values.bandwidth ? parseRate(values.bandwidth) : undefined,
      rtt: (num(values.rtt, '--rtt') ?? 0) / 1000,
      codec,
      level: num(values.level, '--level'),
      streams: num(values.streams, '--streams'),
      model: values.model !== undefined ? parseModel(values.model) : undefined,
      dirtyRate:
        values['dirty-rate'] !== undefined ? (values['dirty-rate'] === '0' ? 0 : parseRate(values['dirty-rate'])) : undefined,
      maxDowntime: values['max-downtime'] !== undefined ? num(values['max-downtime'], '--max-downtime')! / 1000 : undefined,
      samples: num(values.samples, '--samples'),
    });
    if (mode === 'json') {
      printJson(est);
      return 0;
    }
    const pct = (x: number) => `${(x * 100).toFixed(1)}%`;
    const lines = [
      `virtual size:     ${humanSize(est.virtualSize)}`,
      `allocated:        ${humanSize(est.allocatedBytes)} (${humanSize(est.readBytes)} read in 1 MiB blocks)`,
      `wire ratio (${est.codec}): ${pct(est.ratio.mean)} (95% interval ${pct(est.ratio.low)}..${pct(est.ratio.high)}, ${est.samples} samples of 1 MiB)`,
      `on the wire:      ${humanSize(Math.round(est.wireBytes.mean))} (${humanSize(Math.round(est.wireBytes.low))}..${humanSize(Math.round(est.wireBytes.high))})`,
    ];
    if (est.seconds) {
      lines.push(
        `transfer time:    ${est.seconds.mean.toFixed(1)} s (${est.seconds.low.toFixed(1)}..${est.seconds.high.toFixed(1)} s) at ${humanSize(Math.round(est.bandwidth!))}/s, limited by ${est.limitedBy}`,
      );
      const t = est.terms!;
      const m = est.model;
      const s = (x: number) => `${x.toFixed(2)} s`;
      const r = (x: number) => `${humanSize(Math.round(x))}/s`;
      lines.push(
        `  start and handshakes ${s(t.fixed)}; chunk flow ${s(t.flow)} = max(network ${s(t.network)} at ${r(t.effectiveBandwidth)}, sender CPU ${s(t.sender)} at ${r(m.senderBytesPerSecond)}, agent CPU ${s(t.agent)} at ${r(m.agentBytesPerSecond)})`,
        `  pipeline fill ${s(t.fill)}; agent fsync ${s(t.sync)} at ${r(m.syncBytesPerSecond)}; agent read-back digest ${s(t.verify)} at ${r(m.verifyBytesPerSecond)}`,
      );
    }
    if (est.precopy) {
      const p = est.precopy;
      lines.push(`warm migration:   ${p.note}`);
      for (const r of p.rounds) lines.push(`  round ${r.round}: ${humanSize(Math.round(r.bytes))} in ${r.seconds.toFixed(2)} s`);
      lines.push(
        `  total ${humanSize(Math.round(p.totalBytes))} of guest data (${humanSize(Math.round(p.totalWireBytes))} on the wire) in ${p.totalSeconds.toFixed(1)} s; cutover downtime ${p.downtimeSeconds.toFixed(3)} s`,
      );
    }
    stdout().write(`${lines.join('\n')}\n`);
    return 0;
  } finally {
    await reader.close();
  }
}
