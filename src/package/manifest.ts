/**
 * OVF manifests (.mf): one `ALGO(file)= hex` line per file of the package, ALGO being SHA1,
 * SHA256 or SHA512. Parsing, checking against the bytes, and writing.
 */
import { createHash } from 'node:crypto';
import { CorruptImageError, UnsupportedFeatureError } from '../disk/errors.js';
import type { ByteSource } from '../disk/source.js';

export type DigestAlgorithm = 'sha1' | 'sha256' | 'sha512';

export interface ManifestEntry {
  algorithm: DigestAlgorithm;
  file: string;
  digest: string;
}

const HEX_LENGTH: Record<DigestAlgorithm, number> = { sha1: 40, sha256: 64, sha512: 128 };

export function parseManifest(text: string, manifestName: string): ManifestEntry[] {
  const out: ManifestEntry[] = [];
  for (const [i, raw] of text.split(/\r?\n/).entries()) {
    const line = raw.trim();
    if (line === '') continue;
    const m = /^([A-Za-z0-9-]+)\((.+)\)\s*=\s*([0-9A-Fa-f]+)$/.exec(line);
    if (!m)
      throw new CorruptImageError(
        `manifest line ${i + 1} is not 'ALGORITHM(file)= digest': '${line.slice(0, 80)}'`,
        manifestName,
      );
    const algorithm = m[1]!.toLowerCase().replace('-', '') as DigestAlgorithm;
    if (!(algorithm in HEX_LENGTH)) {
      throw new UnsupportedFeatureError(`manifest line ${i + 1} uses digest ${m[1]}, which vmferry does not know`, manifestName);
    }
    const digest = m[3]!.toLowerCase();
    if (digest.length !== HEX_LENGTH[algorithm]) {
      throw new CorruptImageError(
        `manifest line ${i + 1}: a ${m[1]} digest has ${HEX_LENGTH[algorithm]} hex digits, not ${digest.length}`,
        manifestName,
      );
    }
    out.push({ algorithm, file: m[2]!, digest });
  }
  return out;
}

export function formatManifest(entries: ManifestEntry[]): string {
  return entries.map((e) => `${e.algorithm.toUpperCase()}(${e.file})= ${e.digest}\n`).join('');
}

/** Digests of a source's bytes, several algorithms in one pass. */
export async function digestSource(source: ByteSource, algorithms: DigestAlgorithm[]): Promise<Map<DigestAlgorithm, string>> {
  const hashes = new Map(algorithms.map((a) => [a, createHash(a)] as const));
  const chunk = 4 * 1024 * 1024;
  const buf = Buffer.allocUnsafe(Math.min(chunk, Math.max(1, source.size)));
  for (let pos = 0; pos < source.size; pos += chunk) {
    const n = Math.min(chunk, source.size - pos);
    const part = await source.read(pos, n, buf.subarray(0, n));
    for (const h of hashes.values()) h.update(part);
  }
  return new Map([...hashes].map(([a, h]) => [a, h.digest('hex')]));
}

/**
 * Checks every manifest line against the file it names. `lookup` gives the bytes of a file of the
 * package, or undefined when the package has no such file. A mismatch names the file.
 */
export async function verifyManifest(
  entries: ManifestEntry[],
  packageName: string,
  lookup: (file: string) => ByteSource | undefined,
): Promise<string[]> {
  const byFile = new Map<string, ManifestEntry[]>();
  for (const e of entries) byFile.set(e.file, [...(byFile.get(e.file) ?? []), e]);
  const verified: string[] = [];
  for (const [file, list] of byFile) {
    const source = lookup(file);
    if (!source) throw new CorruptImageError(`the manifest lists '${file}', which the package does not hold`, packageName);
    try {
      const digests = await digestSource(source, [...new Set(list.map((e) => e.algorithm))]);
      for (const e of list) {
        const actual = digests.get(e.algorithm)!;
        if (actual !== e.digest) {
          throw new CorruptImageError(
            `member '${file}' does not match the manifest: ${e.algorithm.toUpperCase()} is ${actual}, the manifest says ${e.digest}`,
            packageName,
          );
        }
      }
    } finally {
      await source.close();
    }
    verified.push(file);
  }
  return verified;
}
