/**
 * `migrate --out https://HOST:PORT/PREFIX`: the result goes to a receiving agent (`vmferry serve`)
 * instead of a local folder. Each disk is sent straight from its source with sendImage, the agent
 * writing the target format (no local conversion copy) as ROOT/PREFIX/NAME-diskN.EXT; the agent
 * reads each written image back and its content digest must equal the one the sender computed
 * while reading the source. The descriptor files are written into a local temp folder as for a
 * local run, rewritten to name the disks where they landed (the agent's ROOT/PREFIX, which the
 * agent reports), and uploaded through the agent's whole-file endpoint, report.json last: a
 * report.json on the agent means the result is complete.
 *
 * --to ova: a tar cannot be built from disks the sender never holds, so the agent receives the
 * package in the OVF standard's unpacked form: NAME.ovf, NAME.mf (SHA-256 of the OVF and of each
 * disk file, as the agent hashed them) and the streamOptimized disks beside them.
 *
 * A rerun replaces what an earlier run of the same migration put under PREFIX (same file names);
 * a disk transfer interrupted half way resumes from the agent's checkpoint.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { UsageError } from '../disk/errors.js';
import type { DiskReader } from '../disk/types.js';
import { formatManifest } from '../package/manifest.js';
import { putFile, type SendResult, sendImage } from '../transfer/client.js';
import type { WireCodec } from '../transfer/protocol.js';
import { nameProblem } from '../transfer/security.js';
import type { TargetDisk } from '../vm/dialect.js';
import type { VmModel } from '../vm/model.js';
import { buildOvf } from '../vm/targets/ova.js';
import type { Staging } from './staging.js';

/** How to reach the agent. */
export interface RemoteOptions {
  token: string;
  /** Pin the agent's certificate (SHA-256). */
  fingerprint?: string;
  codec?: WireCodec;
  streams?: number;
  /** Bytes per second on the wire. */
  rate?: number;
}

export interface RemoteTarget {
  /** The --out URL as given (no credentials in it). */
  url: string;
  /** scheme://host:port */
  origin: string;
  prefix: string;
}

/** Targets whose descriptor writer reads the disk files, so it cannot run without them locally. */
const LOCAL_ONLY: Record<string, string> = {
  azure: 'its descriptor writer checks the fixed VHD files themselves',
};

export function isRemoteOut(out: string): boolean {
  return /^https?:\/\//i.test(out);
}

/** Parses --out https://HOST:PORT/PREFIX (one path component: the agent's per-VM folder). */
export function parseRemoteOut(out: string, target: string): RemoteTarget {
  let u: URL;
  try {
    u = new URL(out);
  } catch {
    throw new UsageError(`--out '${out}' is not a URL (https://HOST:PORT/PREFIX)`);
  }
  if (u.username || u.password) throw new UsageError('--out: give the token with --token-file or VMFERRY_TOKEN, not in the URL');
  if (u.search || u.hash) throw new UsageError(`--out '${out}': no query or fragment`);
  const parts = u.pathname.split('/').filter((p) => p.length > 0);
  if (parts.length !== 1) {
    throw new UsageError(
      `--out '${out}': the path must be exactly one folder name, the VM's folder on the agent (https://HOST:PORT/PREFIX)`,
    );
  }
  let prefix: string;
  try {
    prefix = decodeURIComponent(parts[0]!);
  } catch {
    throw new UsageError(`--out '${out}': the path is not valid percent-encoding`);
  }
  const problem = nameProblem(prefix);
  if (problem) throw new UsageError(`--out '${out}': folder name refused: ${problem}`);
  const why = LOCAL_ONLY[target];
  if (why) throw new UsageError(`--to ${target} writes into a local folder only (${why}); migrate locally, then send the disks`);
  return { url: out, origin: u.origin, prefix };
}

/** The URL of one file under PREFIX on the agent. */
export function remoteFileUrl(t: RemoteTarget, file: string): string {
  return `${t.origin}/${encodeURIComponent(t.prefix)}/${encodeURIComponent(file)}`;
}

const TEMP = /^vmferry-migrate-remote-(\d+)-/;

function processGone(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return false;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'ESRCH';
  }
}

/**
 * A local temp folder for the descriptors (the result itself lands on the agent), named with this
 * process's id; those of killed runs (their process gone) are removed first.
 */
export function openRemoteStaging(t: RemoteTarget): Staging {
  const removed: string[] = [];
  try {
    for (const name of readdirSync(tmpdir())) {
      const m = TEMP.exec(name);
      if (!m || Number(m[1]) === process.pid || !processGone(Number(m[1]))) continue;
      rmSync(join(tmpdir(), name), { recursive: true, force: true });
      removed.push(join(tmpdir(), name));
    }
  } catch {
    // the sweep is best effort
  }
  return {
    outDir: t.url,
    dir: mkdtempSync(join(tmpdir(), `vmferry-migrate-remote-${process.pid}-`)),
    mode: 'files',
    removed,
  };
}

/** Sends one disk, straight from its source, to PREFIX/FILE on the agent in `format` with `options`. */
export async function sendDisk(
  t: RemoteTarget,
  o: RemoteOptions,
  disk: { label: string; open: () => Promise<DiskReader> },
  file: string,
  format: string,
  options: Record<string, string>,
  wantFileSha256: boolean,
  onProgress: (done: number, total: number) => void,
  log?: (line: string) => void,
): Promise<SendResult> {
  return sendImage(disk.label, {
    url: remoteFileUrl(t, file),
    token: o.token,
    targetFormat: format,
    options,
    codec: o.codec,
    streams: o.streams,
    rate: o.rate,
    fingerprint: o.fingerprint,
    overwrite: true,
    openReader: disk.open,
    fileSha256: wantFileSha256,
    onProgress: (p) => onProgress(p.done, p.total),
    log,
  });
}

/**
 * The OVF package in unpacked form for the agent: NAME.ovf and NAME.mf written into `dir`;
 * the disks (already on the agent) described with the file sizes and SHA-256 the agent reported.
 */
export function writeRemoteOvf(
  model: VmModel,
  base: string,
  disks: TargetDisk[],
  sent: Map<number, SendResult>,
  dir: string,
): string[] {
  const ordered = [...disks].sort((a, b) => a.index - b.index);
  const described = ordered.map((d) => ({ ...d, fileSize: sent.get(d.index)!.fileSize ?? 0 }));
  const ovf = Buffer.from(buildOvf(model, described), 'utf8');
  const ovfName = `${base}.ovf`;
  const mfName = `${base}.mf`;
  const entries = [
    { algorithm: 'sha256' as const, file: ovfName, digest: createHash('sha256').update(ovf).digest('hex') },
    ...ordered.map((d) => ({ algorithm: 'sha256' as const, file: d.fileName, digest: sent.get(d.index)!.fileSha256! })),
  ];
  writeFileSync(join(dir, ovfName), ovf);
  writeFileSync(join(dir, mfName), formatManifest(entries));
  return [ovfName, mfName];
}

/** Uploads the local files (descriptors, report.txt, then report.json) into PREFIX on the agent, in order. */
export async function uploadFiles(t: RemoteTarget, o: RemoteOptions, dir: string, files: string[]): Promise<void> {
  for (const f of files) {
    await putFile(readFileSync(join(dir, f)), {
      url: remoteFileUrl(t, f),
      token: o.token,
      fingerprint: o.fingerprint,
      overwrite: true,
    });
  }
}
