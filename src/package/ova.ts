/**
 * OVA packages: a tar whose first member is the OVF descriptor, then the files it references,
 * then optionally the manifest (.mf) and a certificate (.cert).
 * Reading indexes the tar in place; writing streams the members into an atomic sink.
 */
import { createHash } from 'node:crypto';
import { once } from 'node:events';
import { createReadStream, statSync } from 'node:fs';
import { pack as tarPack } from 'tar-stream';
import { CorruptImageError, ioError } from '../disk/errors.js';
import { AtomicFileSink } from '../disk/sink.js';
import { FileSource, readExact } from '../disk/source.js';
import { formatManifest, type ManifestEntry, parseManifest, verifyManifest } from './manifest.js';
import { indexTar, memberSource, type TarMember } from './tar.js';

export interface OvaIndex {
  path: string;
  size: number;
  members: TarMember[];
  /** The OVF descriptor member (the first .ovf). */
  ovf: TarMember;
  ovfText: string;
  manifest?: TarMember;
  certificate?: TarMember;
  /** Members whose digests the manifest lists and that matched. */
  verified: string[];
}

const MAX_OVF_BYTES = 64 * 1024 * 1024;

/** True when the bytes start like a tar archive (ustar magic or a valid old-style header). */
export function looksLikeTar(head: Buffer): boolean {
  if (head.length < 512) return false;
  const magic = head.subarray(257, 262).toString('latin1');
  return magic === 'ustar';
}

/** Indexes an OVA in place, reads its descriptor and checks its manifest against the members. */
export async function openOva(path: string, options: { verify?: boolean } = {}): Promise<OvaIndex> {
  const file = FileSource.open(path);
  try {
    const members = await indexTar(file);
    const ovf = members.find((m) => /\.ovf$/i.test(m.name));
    if (!ovf) throw new CorruptImageError('is not an OVA package: the archive holds no .ovf descriptor', path);
    if (ovf.size > MAX_OVF_BYTES)
      throw new CorruptImageError(`OVF descriptor '${ovf.name}' is ${ovf.size} bytes, too large`, path);
    const ovfText = (await readExact(file, ovf.offset, ovf.size, 'OVF descriptor')).toString('utf8');
    const manifest = members.find((m) => /\.mf$/i.test(m.name));
    const certificate = members.find((m) => /\.cert$/i.test(m.name));
    let verified: string[] = [];
    if (manifest && options.verify !== false) {
      if (manifest.size > MAX_OVF_BYTES) throw new CorruptImageError(`manifest '${manifest.name}' is too large`, path);
      const text = (await readExact(file, manifest.offset, manifest.size, 'manifest')).toString('utf8');
      const entries = parseManifest(text, `${path}/${manifest.name}`);
      verified = await verifyManifest(entries, path, (name) => {
        const m = members.find((x) => x.name === name);
        return m ? memberSource(file, m) : undefined;
      });
    }
    return { path, size: file.size, members, ovf, ovfText, manifest, certificate, verified };
  } finally {
    await file.close();
  }
}

export interface OvaFile {
  /** Name inside the archive. */
  name: string;
  /** Either the bytes, or a file to copy. */
  data?: Buffer;
  path?: string;
}

/**
 * Writes `out` as a tar of `files` in the given order (the OVF first), followed by a manifest
 * `manifestName` with SHA256 lines of every file. Atomic: the archive appears only when complete.
 */
export async function writeOva(out: string, files: OvaFile[], manifestName: string): Promise<ManifestEntry[]> {
  const sink = new AtomicFileSink(out);
  const pack = tarPack();
  let position = 0;
  const drain = (async () => {
    for await (const chunk of pack as AsyncIterable<Buffer>) {
      await sink.write(chunk, position);
      position += chunk.length;
    }
  })();
  // Never resolves; rejects when writing the archive fails, so no producer waits forever.
  const drainFailed = drain.then(
    () => new Promise<never>(() => {}),
    (err) => Promise.reject(err),
  );
  drainFailed.catch(() => undefined);
  const guard = <T>(p: Promise<T>) => Promise.race([p, drainFailed]);
  const entries: ManifestEntry[] = [];
  const mtime = new Date();
  const addBuffer = (name: string, data: Buffer) =>
    guard(
      new Promise<void>((resolve, reject) => {
        pack.entry({ name, size: data.length, mode: 0o644, mtime, uname: 'vmferry', gname: 'vmferry' }, data, (err) =>
          err ? reject(err) : resolve(),
        );
      }),
    );
  try {
    for (const f of files) {
      const hash = createHash('sha256');
      if (f.data) {
        hash.update(f.data);
        await addBuffer(f.name, f.data);
      } else {
        const path = f.path!;
        let size: number;
        try {
          size = statSync(path).size;
        } catch (err) {
          throw ioError(err, path);
        }
        let done: () => void = () => {};
        let failed: (e: Error) => void = () => {};
        const finished = new Promise<void>((resolve, reject) => {
          done = resolve;
          failed = reject;
        });
        const entry = pack.entry({ name: f.name, size, mode: 0o644, mtime, uname: 'vmferry', gname: 'vmferry' }, (err) =>
          err ? failed(err) : done(),
        );
        let copied = 0;
        try {
          for await (const chunk of createReadStream(path)) {
            const buf = chunk as Buffer;
            hash.update(buf);
            copied += buf.length;
            if (!entry.write(buf)) await guard(once(entry, 'drain'));
          }
        } catch (err) {
          throw ioError(err, path);
        }
        if (copied !== size) throw new CorruptImageError(`changed size while being packaged (${size} -> ${copied} bytes)`, path);
        entry.end(() => undefined);
        await guard(finished);
      }
      entries.push({ algorithm: 'sha256', file: f.name, digest: hash.digest('hex') });
    }
    await addBuffer(manifestName, Buffer.from(formatManifest(entries)));
    pack.finalize();
    await drain;
    if (position === 0) throw new CorruptImageError('wrote an empty archive', out);
    await sink.commit();
    return entries;
  } catch (err) {
    pack.destroy();
    await drain.catch(() => undefined);
    await sink.abort();
    throw err;
  }
}
