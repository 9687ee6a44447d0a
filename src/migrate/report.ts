/** The human summary of a migration (printed by the CLI and saved as report.txt). */
import type { MigrateReport } from './migrate.js';

function size(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = bytes;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${i === 0 ? v : Number(v.toPrecision(3))} ${units[i]}`;
}

export function humanSummary(r: MigrateReport): string {
  const lines: string[] = [];
  const m = r.targetModel;
  lines.push(`vmferry migrate: ${r.name} (${r.sourceReader}) -> ${r.target} in ${r.outDir}`);
  lines.push(
    `  ${m.cpus} CPU${m.cpus === 1 ? '' : 's'}${m.coresPerSocket ? ` (${m.coresPerSocket} per socket)` : ''}, ${size(m.memory)} memory, ${m.firmware.toUpperCase()}${m.secureBoot ? ' with secure boot' : ''}${m.generation ? `, Generation ${m.generation}` : ''}`,
  );
  lines.push('');
  lines.push('Disks:');
  for (const d of r.disks) {
    lines.push(`  disk${d.index}: ${d.source} (${d.sourceFormat}, ${size(d.virtualSize)}, ${size(d.allocatedBytes)} of data)`);
    lines.push(
      `         -> ${d.target} (${d.targetFormat}, ${size(d.targetFileBytes)} on disk, ${d.convertSeconds.toFixed(2)} s), content ${d.digestAlgorithm ? 'digest on the agent' : 'SHA-256'} ${d.verified ? 'verified' : 'NOT verified'}: ${d.targetSha256}`,
    );
    const t = d.partitionTable;
    if (t) {
      lines.push(
        `         partitions: ${t.scheme === 'none' ? 'none' : `${t.scheme.toUpperCase()}, ${t.partitions.length} partition${t.partitions.length === 1 ? '' : 's'}`}; ${t.bootReason}`,
      );
    }
  }
  lines.push('');
  lines.push('Device mappings:');
  if (r.mappings.length === 0) lines.push('  (none: every device is kept as it was)');
  for (const n of r.mappings) lines.push(`  ${n.from} -> ${n.to}: ${n.why}`);
  if (r.warnings.length > 0) {
    lines.push('');
    lines.push('Warnings:');
    for (const w of r.warnings) lines.push(`  ${w}`);
  }
  if (r.unmapped.length > 0) {
    lines.push('');
    lines.push(`Source settings not carried (${r.unmapped.length}; listed under "unmapped" in report.json)`);
  }
  lines.push('');
  const t = r.totals;
  lines.push(
    `Sizes: ${size(t.virtualSize)} virtual, ${size(t.allocatedBytes)} of data, source files ${size(t.sourceFileBytes)}, target files ${size(t.targetFileBytes)} (ratio ${t.compressionRatio.toFixed(2)} of the data)`,
  );
  lines.push(`Time: ${r.stages.map((s) => `${s.stage} ${s.seconds.toFixed(2)} s`).join(', ')}; total ${r.seconds.toFixed(2)} s`);
  lines.push(`Files: ${r.files.join(', ')}, report.json`);
  return `${lines.join('\n')}\n`;
}
