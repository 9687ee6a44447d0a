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
 * --to azure: the disks must be fixed VHDs of a whole number of MiB. The source is sent padded with
 * zeros up to the rounded size (PaddedReader), and since no local file exists to read the footer
 * of, the agent's report stands in for it: the content digest over the whole rounded disk, and the
 * file size, which for a VHD is exactly that size + the 512-byte footer only when it is fixed.
 *
 * A rerun replaces what an earlier run of the same migration put under PREFIX (same file names);
 * a disk transfer interrupted half way resumes from the agent's checkpoint.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { UsageError, VmferryError } from '../disk/errors.js';
import type { DiskReader, Extent, FormatDetails } from '../disk/types.js';
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

export function isRemoteOut(out: string): boolean {
  return /^https?:\/\//i.test(out);
}

/** Parses --out https://HOST:PORT/PREFIX (one path component: the agent's per-VM folder). */
export function parseRemoteOut(out: string): RemoteTarget {
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
  return { url: out, origin: u.origin, prefix };
}

/**
 * The source seen as a disk of `size` bytes: its own content, then zeros. A target that rounds
 * the disk up (Azure: a whole number of MiB) is sent through this, so the agent creates the larger
 * disk, the padding travels as a described zero range, and both content digests cover it (the
 * agent's equal to the sender's then also proves the added bytes read as zeros).
 */
export class PaddedReader implements DiskReader {
  readonly format: string;
  readonly filename: string;
  readonly details: FormatDetails;
  /** Unallocated ranges of the source still fall through its own chain. */
  readonly backing?: DiskReader;

  constructor(
    private readonly inner: DiskReader,
    readonly virtualSize: number,
  ) {
    if (!Number.isSafeInteger(virtualSize) || virtualSize < inner.virtualSize)
      throw new UsageError(`cannot present ${inner.virtualSize} bytes as a disk of ${virtualSize}`, inner.filename);
    this.format = inner.format;
    this.filename = inner.filename;
    this.details = inner.details;
    this.backing = inner.backing;
  }

  async *extents(from = 0, to = this.virtualSize): AsyncGenerator<Extent> {
    const own = this.inner.virtualSize;
    const end = Math.min(to, this.virtualSize);
    let last: Extent | undefined;
    if (from < Math.min(end, own)) {
      for await (const e of this.inner.extents(from, Math.min(end, own))) {
        if (last) yield last;
        last = { ...e };
      }
    }
    const pad = Math.max(from, own);
    if (pad < end) {
      // Extents stay merged: a zero run at the source's end and the padding are one extent.
      if (last && last.kind === 'zero' && last.offset + last.length === pad) last.length += end - pad;
      else {
        if (last) yield last;
        last = { offset: pad, length: end - pad, kind: 'zero' };
      }
    }
    if (last) yield last;
  }

  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    if (offset < 0 || length < 0 || offset + length > this.virtualSize) {
      throw new VmferryError(
        `read of ${length} bytes at ${offset} is outside the virtual size ${this.virtualSize}`,
        this.filename,
      );
    }
    const own = this.inner.virtualSize;
    if (offset + length <= own) return this.inner.read(offset, length, into);
    const out = into ? into.subarray(0, length) : Buffer.allocUnsafe(length);
    const inside = Math.max(0, own - offset);
    if (inside > 0) {
      const head = out.subarray(0, inside);
      const got = await this.inner.read(offset, inside, head);
      // A reader may hand back its own buffer instead of filling the one given.
      if (got.buffer !== head.buffer || got.byteOffset !== head.byteOffset) got.copy(head);
    }
    out.fill(0, inside);
    return out;
  }

  close(): Promise<void> {
    return this.inner.close();
  }
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
