/**
 * Tar archives as OVA packages use them. Reading: an index of the members (name, offset of the
 * data, size) built from the 512-byte headers alone, so a member is read in place through a
 * SliceSource without unpacking anything. ustar, GNU long names ('L') and pax headers ('x', 'g':
 * path and size) are understood. Writing: tar-stream, streamed into an atomic sink.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../disk/errors.js';
import { type ByteSource, readExact, SliceSource } from '../disk/source.js';

export const BLOCK = 512;
/** Refuse absurd metadata records (long names, pax headers) before allocating for them. */
const MAX_META_BYTES = 1024 * 1024;
/** An OVA holds a handful of members; a malformed archive must not make us loop forever. */
const MAX_MEMBERS = 100_000;

export interface TarMember {
  name: string;
  /** Offset of the member's data in the archive. */
  offset: number;
  size: number;
  /** Offset of the member's (first) header block. */
  headerOffset: number;
}

function cString(buf: Buffer, start: number, length: number): string {
  const raw = buf.subarray(start, start + length);
  const nul = raw.indexOf(0);
  return raw.subarray(0, nul < 0 ? raw.length : nul).toString('utf8');
}

/** A numeric header field: octal text, or GNU base-256 when the top bit of the first byte is set. */
function numberField(buf: Buffer, start: number, length: number, what: string, archive: string): number {
  const field = buf.subarray(start, start + length);
  if (field[0]! & 0x80) {
    let v = 0n;
    for (let i = 1; i < field.length; i++) v = (v << 8n) | BigInt(field[i]!);
    v |= BigInt(field[0]! & 0x3f) << BigInt(8 * (field.length - 1));
    if (field[0]! & 0x40 || v > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new CorruptImageError(`tar header ${what} is out of range`, archive);
    }
    return Number(v);
  }
  const text = field.toString('latin1').replace(/\0.*$/s, '').trim();
  if (text === '') return 0;
  if (!/^[0-7]+$/.test(text)) throw new CorruptImageError(`tar header ${what} '${text}' is not an octal number`, archive);
  const v = Number.parseInt(text, 8);
  if (!Number.isSafeInteger(v)) throw new CorruptImageError(`tar header ${what} is out of range`, archive);
  return v;
}

function checksumOk(block: Buffer, archive: string): boolean {
  const stored = numberField(block, 148, 8, 'checksum', archive);
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const b = i >= 148 && i < 156 ? 0x20 : block[i]!;
    unsigned += b;
    signed += b > 127 ? b - 256 : b;
  }
  return stored === unsigned || stored === signed;
}

/** pax extended header records: "LEN key=value\n". */
function parsePax(data: Buffer, archive: string): Map<string, string> {
  const out = new Map<string, string>();
  let pos = 0;
  while (pos < data.length) {
    if (data[pos] === 0) break;
    const space = data.indexOf(0x20, pos);
    if (space < 0) throw new CorruptImageError('malformed pax header record', archive);
    const len = Number.parseInt(data.subarray(pos, space).toString('latin1'), 10);
    if (!Number.isSafeInteger(len) || len <= space - pos || pos + len > data.length) {
      throw new CorruptImageError('malformed pax header record length', archive);
    }
    const record = data.subarray(space + 1, pos + len - 1).toString('utf8');
    const eq = record.indexOf('=');
    if (eq > 0) out.set(record.slice(0, eq), record.slice(eq + 1));
    pos += len;
  }
  return out;
}

function isZeroBlock(block: Buffer): boolean {
  for (let i = 0; i < block.length; i++) if (block[i] !== 0) return false;
  return true;
}

/** The regular-file members of a tar archive, in archive order, read from the headers only. */
export async function indexTar(source: ByteSource): Promise<TarMember[]> {
  const archive = source.name;
  const members: TarMember[] = [];
  let pos = 0;
  let longName: string | undefined;
  let pax = new Map<string, string>();
  let globalPax = new Map<string, string>();
  let headerStart = -1;
  let count = 0;
  while (pos + BLOCK <= source.size) {
    if (++count > MAX_MEMBERS) throw new CorruptImageError('tar archive has too many entries', archive);
    const block = await readExact(source, pos, BLOCK, 'tar header');
    if (isZeroBlock(block)) break;
    if (!checksumOk(block, archive)) {
      throw new CorruptImageError(`tar header at offset ${pos} has a bad checksum (not a tar archive, or damaged)`, archive);
    }
    if (headerStart < 0) headerStart = pos;
    const type = String.fromCharCode(block[156]!);
    const size = numberField(block, 124, 12, 'size', archive);
    const dataOffset = pos + BLOCK;
    if (dataOffset + size > source.size) {
      throw new CorruptImageError(
        `tar member at offset ${pos} claims ${size} bytes, past the end of the archive (${source.size} bytes); the archive is truncated`,
        archive,
      );
    }
    const next = dataOffset + Math.ceil(size / BLOCK) * BLOCK;
    const meta = async (what: string) => {
      if (size > MAX_META_BYTES) throw new CorruptImageError(`tar ${what} record of ${size} bytes is too large`, archive);
      return readExact(source, dataOffset, size, `tar ${what}`);
    };
    if (type === 'L') {
      longName = cString(await meta('long name'), 0, size);
    } else if (type === 'x') {
      pax = parsePax(await meta('pax header'), archive);
    } else if (type === 'g') {
      globalPax = new Map([...globalPax, ...parsePax(await meta('pax global header'), archive)]);
    } else {
      if (type === '0' || type === '\0' || type === '7') {
        const magic = block.subarray(257, 263).toString('latin1');
        const prefix = magic.startsWith('ustar') ? cString(block, 345, 155) : '';
        const shortName = cString(block, 0, 100);
        const name = pax.get('path') ?? longName ?? globalPax.get('path') ?? (prefix ? `${prefix}/${shortName}` : shortName);
        let memberSize = size;
        const paxSize = pax.get('size');
        if (paxSize !== undefined) {
          memberSize = Number(paxSize);
          if (!Number.isSafeInteger(memberSize) || memberSize < 0 || dataOffset + memberSize > source.size) {
            throw new CorruptImageError(`tar pax size '${paxSize}' for '${name}' lies outside the archive`, archive);
          }
        }
        members.push({ name, offset: dataOffset, size: memberSize, headerOffset: headerStart });
        pos = dataOffset + Math.ceil(memberSize / BLOCK) * BLOCK;
        longName = undefined;
        pax = new Map();
        headerStart = -1;
        continue;
      }
      if (type === 'S') throw new UnsupportedFeatureError('GNU sparse tar members are not supported', archive);
      // directories, links, devices: no data of interest
      longName = undefined;
      pax = new Map();
      headerStart = -1;
    }
    pos = next;
  }
  if (pos + BLOCK > source.size && pos < source.size) {
    throw new CorruptImageError('tar archive ends in the middle of a header block', archive);
  }
  return members;
}

/** A member as positioned reads over the archive, named `archive/member` in messages. */
export function memberSource(archive: ByteSource, member: TarMember): SliceSource {
  return new SliceSource(archive, member.offset, member.size, `${archive.name}/${member.name}`);
}
