/** Tokens, names, certificates and the audit log of the receiving agent. */
import { execFileSync } from 'node:child_process';
import { createHash, randomBytes, timingSafeEqual, X509Certificate } from 'node:crypto';
import {
  appendFileSync,
  closeSync,
  existsSync,
  fsyncSync,
  openSync,
  readFileSync,
  readSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { isIP } from 'node:net';
import { UsageError, VmferryError } from '../disk/errors.js';

/** A bad or missing credential, a refused name, a failed pin: the transfer is not allowed. */
export class TransferRefusedError extends VmferryError {}

/** Reads the token file, or creates it (0600, 256 random bits) when it does not exist. */
export function loadOrCreateToken(path: string): { token: string; created: boolean } {
  if (!existsSync(path)) {
    const token = randomBytes(32).toString('hex');
    writeFileSync(path, `${token}\n`, { mode: 0o600, flag: 'wx' });
    return { token, created: true };
  }
  return { token: readToken(path), created: false };
}

export function readToken(path: string): string {
  let text: string;
  try {
    text = readFileSync(path, 'utf8').trim();
  } catch (err) {
    throw new UsageError(`cannot read the token file: ${(err as Error).message}`, path);
  }
  if (text.length < 16) throw new UsageError('token file holds no token (at least 16 characters)', path);
  return text;
}

/** Constant-time comparison (both sides hashed first, so lengths do not leak either). */
export function tokenMatches(given: string, expected: string): boolean {
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(expected).digest();
  return timingSafeEqual(a, b);
}

/**
 * A file name the agent may create under its root: one path component, no separators, no `..`,
 * not hidden, no control characters. Returns null when acceptable, else the reason.
 */
export function nameProblem(name: string): string | null {
  if (name.length === 0) return 'empty name';
  if (name.length > 200) return 'name longer than 200 characters';
  if (/[/\\]/.test(name)) return 'name contains a path separator';
  if (name.includes('..')) return "name contains '..'";
  if (name.startsWith('.')) return "name starts with '.'";
  if (/[\x00-\x1f\x7f]/.test(name)) return 'name contains control characters';
  return null;
}

/**
 * A name a sender may use on the agent: NAME (a file under ROOT) or PREFIX/NAME (a file under
 * ROOT/PREFIX, the per-VM folder `migrate --out https://HOST:PORT/PREFIX` fills). Each part obeys
 * nameProblem; any other separator, and `..`, are refused. Returns null when acceptable.
 */
export function pathNameProblem(name: string): string | null {
  const parts = name.split('/');
  if (parts.length > 2) return 'name has more than one folder level (PREFIX/NAME at most)';
  if (name.includes('\\')) return 'name contains a path separator';
  for (const p of parts) {
    const problem = nameProblem(p);
    if (problem) return parts.length === 2 ? `${problem} (in '${p}')` : problem;
  }
  return null;
}

export function isLoopback(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '');
  if (h === 'localhost') return true;
  if (isIP(h) === 4) return h.startsWith('127.');
  if (isIP(h) === 6) return h === '::1' || h === '0:0:0:0:0:0:0:1';
  return false;
}

/** SHA-256 fingerprint of a PEM certificate, as colon-separated upper-case hex (openssl's style). */
export function certFingerprint(pem: string | Buffer): string {
  return new X509Certificate(pem).fingerprint256;
}

/** Normalises a fingerprint the user typed (any case, with or without colons). */
export function normaliseFingerprint(text: string): string {
  const hex = text
    .replace(/^sha256[:=]/i, '')
    .replace(/:/g, '')
    .toUpperCase();
  if (!/^[0-9A-F]{64}$/.test(hex))
    throw new UsageError(`--fingerprint must be a SHA-256 fingerprint (64 hex digits), not '${text}'`);
  return hex.match(/../g)!.join(':');
}

/** Generates a self-signed ECDSA P-256 certificate with Debian's openssl, unless both files exist. */
export function ensureCertificate(certPath: string, keyPath: string, hosts: string[]): { generated: boolean } {
  if (existsSync(certPath) && existsSync(keyPath)) return { generated: false };
  if (existsSync(certPath) !== existsSync(keyPath)) {
    throw new UsageError(`only one of ${certPath} and ${keyPath} exists; give both or neither`);
  }
  const san = [...new Set(['localhost', '127.0.0.1', '::1', ...hosts])]
    .filter((h) => h && h !== '0.0.0.0' && h !== '::')
    .map((h) => (isIP(h) ? `IP:${h}` : `DNS:${h}`))
    .join(',');
  try {
    execFileSync(
      'openssl',
      [
        'req',
        '-x509',
        '-newkey',
        'ec',
        '-pkeyopt',
        'ec_paramgen_curve:prime256v1',
        '-nodes',
        '-days',
        '3650',
        '-subj',
        '/CN=vmferry-agent',
        '-addext',
        `subjectAltName=${san}`,
        '-keyout',
        keyPath,
        '-out',
        certPath,
      ],
      { stdio: ['ignore', 'ignore', 'pipe'], umask: 0o077 } as never,
    );
  } catch (err) {
    const e = err as { stderr?: Buffer; message: string };
    throw new UsageError(`cannot generate a certificate with openssl: ${e.stderr?.toString().trim() || e.message}`, certPath);
  }
  return { generated: true };
}

export interface AuditEntry {
  event: string;
  [key: string]: unknown;
}

/**
 * Append-only JSON lines; each line carries `prev`, the SHA-256 of the previous line's text
 * (64 zeros for the first), so removing or editing a line breaks the chain.
 */
export class AuditLog {
  private prev: string;
  private seq: number;
  constructor(readonly path: string) {
    const last = lastLine(path);
    this.prev = last === null ? '0'.repeat(64) : sha256Hex(last);
    let lastSeq = -1;
    try {
      lastSeq = last === null ? -1 : ((JSON.parse(last) as { seq?: number }).seq ?? -1);
    } catch {
      // A damaged last line stays in the chain (verification will point at it); numbering goes on.
    }
    this.seq = lastSeq + 1;
  }

  append(entry: AuditEntry): void {
    const line = JSON.stringify({ seq: this.seq, time: new Date().toISOString(), prev: this.prev, ...entry });
    const fd = openSync(this.path, 'a', 0o600);
    try {
      appendFileSync(fd, `${line}\n`);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    this.prev = sha256Hex(line);
    this.seq++;
  }
}

function sha256Hex(text: string): string {
  return createHash('sha256').update(text).digest('hex');
}

function lastLine(path: string): string | null {
  if (!existsSync(path)) return null;
  const size = statSync(path).size;
  if (size === 0) return null;
  const n = Math.min(size, 1 << 20);
  const buf = Buffer.alloc(n);
  const fd = openSync(path, 'r');
  try {
    readSync(fd, buf, 0, n, size - n);
  } finally {
    closeSync(fd);
  }
  const lines = buf
    .toString('utf8')
    .split('\n')
    .filter((l) => l.length > 0);
  return lines.length ? lines[lines.length - 1]! : null;
}

/** Checks the whole chain; returns the entries, or the first line number that breaks it. */
export function verifyAuditLog(path: string): { ok: boolean; entries: Record<string, unknown>[]; brokenAt?: number } {
  const lines = readFileSync(path, 'utf8')
    .split('\n')
    .filter((l) => l.length > 0);
  const entries: Record<string, unknown>[] = [];
  let prev = '0'.repeat(64);
  for (let i = 0; i < lines.length; i++) {
    let e: Record<string, unknown>;
    try {
      e = JSON.parse(lines[i]!) as Record<string, unknown>;
    } catch {
      return { ok: false, entries, brokenAt: i + 1 };
    }
    if (e.prev !== prev || e.seq !== i) return { ok: false, entries, brokenAt: i + 1 };
    entries.push(e);
    prev = sha256Hex(lines[i]!);
  }
  return { ok: true, entries };
}
