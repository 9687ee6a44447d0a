/**
 * vmferry's fuzz harness (issue #5).
 *
 *   npm run fuzz -- --format F --seconds N [--seed S] [--jobs J] [--rss-mib M] [--save DIR]
 *   node dist/scripts/fuzz.js --replay DIR [--json]      (replays saved inputs, used by the tests)
 *
 * Seeds are small valid images made once by qemu-img (plus the small qcow2 files of the shared
 * corpus) into a cache folder. Each input is a seed mutated by a few format-aware mutations (header
 * fields set to boundary values, table entries pointed past EOF / misaligned / duplicated / at
 * metadata, VMDK descriptor lines rewritten, truncation, splices), with checksums fixed up most of
 * the time so the mutation reaches the code behind them. Every input runs info, check, map and a
 * read of the content through the library in a pool of worker processes, under a per-input
 * watchdog and an RSS ceiling. A crash is any error that is not a VmferryError, a broken reader
 * invariant, the death of the worker, a hang, a memory blow-up, or a file opened outside the
 * image's folder. Crashing inputs are saved under test/fuzz-regressions/<format>/<sha1>.bin.
 */
import { type ChildProcess, fork, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import fs, {
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
import { tmpdir } from 'node:os';
import { basename, dirname, join, resolve, sep } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { gunzipSync, gzipSync } from 'node:zlib';
import { patternBuffer } from '../test/helpers/pattern.js';

const here = dirname(fileURLToPath(import.meta.url));
/** The repository root (this file runs as dist/scripts/fuzz.js). */
export const repoRoot = resolve(here, '../..');
const corpusDir = process.env.VMFERRY_CORPUS ?? resolve(repoRoot, '../shared/corpus');
export const regressionsDir = join(repoRoot, 'test/fuzz-regressions');
const KiB = 1024;
const MiB = 1024 * KiB;
const FORMATS = ['raw', 'qcow2', 'vmdk', 'vpc', 'vhdx', 'vdi'] as const;

// ---------------------------------------------------------------------------------------------
// Deterministic randomness

export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0 || 0x9e3779b9;
  }
  /** mulberry32 */
  next(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let t = this.s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  bigU64(): bigint {
    return (BigInt(this.int(2 ** 32)) << 32n) | BigInt(this.int(2 ** 32));
  }
}

// ---------------------------------------------------------------------------------------------
// Seeds

export interface Seed {
  format: string;
  name: string;
  /** Folder holding the main file and its sidecars (backing files, extents). */
  dir: string;
  main: string;
  sidecars: string[];
}

const seedCache = join(tmpdir(), `vmferry-fuzz-seeds-${process.getuid?.() ?? 0}-v1`);

function sh(cmd: string, args: string[]): void {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr || r.error}`);
}

/** A 4 MiB raw disk with data at the start, an odd offset in the middle and the end. */
function baseRaw(path: string, size = 4 * MiB): void {
  const fd = fs.openSync(path, 'w');
  fs.ftruncateSync(fd, size);
  fs.writeSync(fd, patternBuffer(64 * KiB, 1), 0, 64 * KiB, 0);
  fs.writeSync(fd, Buffer.alloc(8 * KiB, 0x5a), 0, 8 * KiB, size / 2 + 512);
  fs.writeSync(fd, patternBuffer(64 * KiB, 2), 0, 64 * KiB, size - 64 * KiB);
  fs.closeSync(fd);
}

interface SeedRecipe {
  format: string;
  name: string;
  main: string;
  /** Writes the main file and its sidecars (every other file in the folder) into `dir`. */
  build(dir: string, raw: string): void;
}

const recipes: SeedRecipe[] = [
  {
    format: 'raw',
    name: 'raw',
    main: 'disk.raw',
    build: (dir) => baseRaw(join(dir, 'disk.raw'), MiB),
  },
  ...(
    [
      ['qcow2-v2', ['-o', 'compat=0.10,cluster_size=4096']],
      ['qcow2-v3-4k', ['-o', 'cluster_size=4096']],
      ['qcow2-zlib', ['-c', '-o', 'cluster_size=4096']],
      ['qcow2-extl2', ['-o', 'extended_l2=on,cluster_size=16384']],
    ] as const
  ).map(
    ([name, args]): SeedRecipe => ({
      format: 'qcow2',
      name,
      main: 'disk.qcow2',
      build: (dir, raw) => sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', ...args, raw, join(dir, 'disk.qcow2')]),
    }),
  ),
  {
    format: 'qcow2',
    name: 'qcow2-backing',
    main: 'top.qcow2',
    build: (dir, raw) => {
      sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096', raw, join(dir, 'base.qcow2')]);
      sh('qemu-img', [
        'create',
        '-f',
        'qcow2',
        '-o',
        'cluster_size=4096',
        '-b',
        'base.qcow2',
        '-F',
        'qcow2',
        join(dir, 'top.qcow2'),
      ]);
      sh('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x33 8k 12k', '-c', 'write -z 1M 64k', join(dir, 'top.qcow2')]);
    },
  },
  {
    format: 'qcow2',
    name: 'corpus-basic-zstd',
    main: 'basic-zstd.qcow2',
    build: (dir) => corpus('qemu/basic-zstd.qcow2.gz', dir),
  },
  {
    format: 'qcow2',
    name: 'corpus-backing-chain',
    main: 'backing-chain-1.qcow2',
    build: (dir) => {
      for (const n of [1, 2, 3]) corpus(`qemu/backing-chain-${n}.qcow2.gz`, dir);
    },
  },
  ...(['monolithicSparse', 'streamOptimized'] as const).map(
    (sub): SeedRecipe => ({
      format: 'vmdk',
      name: `vmdk-${sub}`,
      main: 'disk.vmdk',
      build: (dir, raw) =>
        sh('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', '-o', `subformat=${sub}`, raw, join(dir, 'disk.vmdk')]),
    }),
  ),
  {
    format: 'vmdk',
    name: 'vmdk-monolithicFlat',
    main: 'disk.vmdk',
    build: (dir, raw) => {
      sh('qemu-img', ['convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=monolithicFlat', raw, join(dir, 'disk.vmdk')]);
    },
  },
  ...(['dynamic', 'fixed'] as const).map(
    (sub): SeedRecipe => ({
      format: 'vpc',
      name: `vpc-${sub}`,
      main: 'disk.vhd',
      build: (dir, raw) =>
        sh('qemu-img', ['convert', '-f', 'raw', '-O', 'vpc', '-o', `subformat=${sub}`, raw, join(dir, 'disk.vhd')]),
    }),
  ),
  {
    format: 'vhdx',
    name: 'vhdx-dynamic',
    main: 'disk.vhdx',
    build: (dir, raw) =>
      sh('qemu-img', ['convert', '-f', 'raw', '-O', 'vhdx', '-o', 'block_size=1M,log_size=1M', raw, join(dir, 'disk.vhdx')]),
  },
  {
    format: 'vdi',
    name: 'vdi-dynamic',
    main: 'disk.vdi',
    build: (dir, raw) => sh('qemu-img', ['convert', '-f', 'raw', '-O', 'vdi', raw, join(dir, 'disk.vdi')]),
  },
];

function corpus(rel: string, dir: string): void {
  writeFileSync(join(dir, basename(rel).replace(/\.gz$/, '')), gunzipSync(readFileSync(join(corpusDir, rel))));
}

/** Builds (once) and returns the seeds of a format ('all' for every format). */
export function loadSeeds(format: string): Seed[] {
  mkdirSync(seedCache, { recursive: true });
  const raw = join(seedCache, 'base-4M.raw');
  if (!existsSync(raw)) {
    baseRaw(`${raw}.tmp${process.pid}`);
    renameSync(`${raw}.tmp${process.pid}`, raw);
  }
  const seeds: Seed[] = [];
  for (const r of recipes) {
    if (format !== 'all' && r.format !== format) continue;
    const dir = join(seedCache, r.name);
    if (!existsSync(join(dir, '.done'))) {
      const temp = `${dir}.building-${process.pid}`;
      rmSync(temp, { recursive: true, force: true });
      mkdirSync(temp);
      try {
        r.build(temp, raw);
      } catch (err) {
        process.stderr.write(`fuzz: seed ${r.name} not built: ${(err as Error).message.split('\n')[0]}\n`);
        rmSync(temp, { recursive: true, force: true });
        continue;
      }
      writeFileSync(join(temp, '.done'), '');
      rmSync(dir, { recursive: true, force: true });
      renameSync(temp, dir);
    }
    const sidecars = readdirSync(dir).filter((n) => n !== r.main && n !== '.done');
    seeds.push({ format: r.format, name: r.name, dir, main: r.main, sidecars });
  }
  return seeds;
}

// ---------------------------------------------------------------------------------------------
// Structure: where a format keeps its fields and tables (parsed defensively from the seed)

interface Field {
  off: number;
  size: 1 | 2 | 4 | 8;
  le: boolean;
}
interface Table {
  off: number;
  count: number;
  size: 2 | 4 | 8;
  le: boolean;
  /** Entry value -> byte offset multiplier (512 for sectors; 1 for bytes). */
  unit: number;
  /** Values that make the entry point at this table, the header, etc. */
  kind: 'qcow2-l1' | 'qcow2-l2' | 'qcow2-rc' | 'vmdk-gd' | 'vmdk-gt' | 'vpc-bat' | 'vhdx-bat' | 'vdi-map' | 'plain';
}
interface Structure {
  fields: Field[];
  tables: Table[];
  /** Offsets worth truncating or splicing at. */
  cuts: number[];
  /** A text region (VMDK descriptor): offset, capacity. */
  text?: { off: number; length: number };
}

function u64(buf: Buffer, off: number, le = false): number {
  if (off < 0 || off + 8 > buf.length) return 0;
  const v = le ? buf.readBigUInt64LE(off) : buf.readBigUInt64BE(off);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
}
function u32(buf: Buffer, off: number, le = false): number {
  if (off < 0 || off + 4 > buf.length) return 0;
  return le ? buf.readUInt32LE(off) : buf.readUInt32BE(off);
}
function u16(buf: Buffer, off: number, le = false): number {
  if (off < 0 || off + 2 > buf.length) return 0;
  return le ? buf.readUInt16LE(off) : buf.readUInt16BE(off);
}
const be = (off: number, size: 1 | 2 | 4 | 8): Field => ({ off, size, le: false });
const le = (off: number, size: 1 | 2 | 4 | 8): Field => ({ off, size, le: true });

function tableIn(buf: Buffer, t: Table, max = 1 << 16): Table | undefined {
  if (t.off <= 0 || t.off >= buf.length) return undefined;
  const count = Math.min(t.count, Math.floor((buf.length - t.off) / t.size), max);
  return count > 0 ? { ...t, count } : undefined;
}

function qcow2Structure(buf: Buffer): Structure {
  const s: Structure = { fields: [], tables: [], cuts: [] };
  s.fields.push(
    be(4, 4),
    be(8, 8),
    be(16, 4),
    be(20, 4),
    be(24, 8),
    be(32, 4),
    be(36, 4),
    be(40, 8),
    be(48, 8),
    be(56, 4),
    be(60, 4),
    be(64, 8),
  );
  const version = u32(buf, 4);
  let extStart = 72;
  if (version >= 3) {
    s.fields.push(be(72, 8), be(80, 8), be(88, 8), be(96, 4), be(100, 4), { off: 104, size: 1, le: false });
    extStart = u32(buf, 100) || 104;
  }
  // Header extensions: type, length.
  for (let at = extStart, n = 0; at + 8 <= Math.min(buf.length, 65536) && n < 32; n++) {
    const type = u32(buf, at);
    const len = u32(buf, at + 4);
    s.fields.push(be(at, 4), be(at + 4, 4));
    if (type === 0x6803f857 || type === 0x23852875) {
      // feature table, bitmaps: their inner fields too
      for (let k = 0; k < Math.min(len, 64); k += 8) s.fields.push(be(at + 8 + k, 8));
    }
    if (type === 0) break;
    at += 8 + Math.ceil(len / 8) * 8;
  }
  const clusterBits = u32(buf, 20);
  const cs = clusterBits >= 9 && clusterBits <= 21 ? 2 ** clusterBits : 65536;
  const l1Off = u64(buf, 40);
  const l1 = tableIn(buf, { off: l1Off, count: u32(buf, 36), size: 8, le: false, unit: 1, kind: 'qcow2-l1' });
  if (l1) {
    s.tables.push(l1);
    s.cuts.push(l1Off, l1Off + 8);
    const ext = version >= 3 && (u64(buf, 72) & 16) !== 0;
    for (let i = 0; i < l1.count; i++) {
      const l2 = (u64(buf, l1Off + 8 * i) % 2 ** 56) & ~0x1ff;
      const t = tableIn(buf, {
        off: l2,
        count: (ext ? cs / 16 : cs / 8) * (ext ? 2 : 1),
        size: 8,
        le: false,
        unit: 1,
        kind: 'qcow2-l2',
      });
      if (t && l2 > 0) {
        s.tables.push(t);
        s.cuts.push(l2, l2 + cs / 2);
      }
    }
  }
  const rtOff = u64(buf, 48);
  const rt = tableIn(buf, { off: rtOff, count: (u32(buf, 56) * cs) / 8, size: 8, le: false, unit: 1, kind: 'qcow2-rc' });
  if (rt) {
    s.tables.push(rt);
    s.cuts.push(rtOff);
    for (let i = 0; i < Math.min(rt.count, 8); i++) {
      const rb = u64(buf, rtOff + 8 * i);
      const t = tableIn(buf, { off: rb, count: cs / 2, size: 2, le: false, unit: 1, kind: 'plain' }, 256);
      if (t) s.tables.push(t);
    }
  }
  const snapOff = u64(buf, 64);
  if (snapOff > 0 && snapOff + 40 < buf.length) {
    s.fields.push(
      be(snapOff, 8),
      be(snapOff + 8, 4),
      be(snapOff + 12, 2),
      be(snapOff + 14, 2),
      be(snapOff + 32, 4),
      be(snapOff + 36, 4),
    );
    s.cuts.push(snapOff);
  }
  const bfOff = u64(buf, 8);
  if (bfOff > 0 && bfOff < buf.length) s.text = { off: bfOff, length: Math.min(u32(buf, 16), 1023) };
  s.cuts.push(cs, 72, 104);
  return s;
}

function vmdkSparseHeaderFields(at: number): Field[] {
  return [le(at + 4, 4), le(at + 8, 4), le(at + 12, 8), le(at + 20, 8), le(at + 28, 8), le(at + 36, 8), le(at + 44, 4)].concat([
    le(at + 48, 8),
    le(at + 56, 8),
    le(at + 64, 8),
    { off: at + 72, size: 1, le: true },
    le(at + 77, 2),
  ]);
}

function vmdkStructure(buf: Buffer): Structure {
  const s: Structure = { fields: [], tables: [], cuts: [] };
  if (buf.subarray(0, 4).toString('latin1') !== 'KDMV') {
    // A text descriptor file.
    s.text = { off: 0, length: buf.length };
    return s;
  }
  s.fields.push(...vmdkSparseHeaderFields(0));
  let h = 0;
  if (u64(buf, 56, true) === Number.MAX_SAFE_INTEGER && buf.length >= 1536) {
    // streamOptimized: the real header is the footer, 1024 bytes before the end.
    h = buf.length - 1024;
    s.fields.push(
      ...vmdkSparseHeaderFields(h),
      le(buf.length - 1536, 8),
      le(buf.length - 1536 + 8, 4),
      le(buf.length - 1536 + 12, 4),
    );
    s.cuts.push(h, buf.length - 1536, buf.length - 512);
  }
  const descOff = u64(buf, 28, true) * 512;
  const descLen = u64(buf, 36, true) * 512;
  if (descOff > 0 && descOff < buf.length) s.text = { off: descOff, length: Math.min(descLen, buf.length - descOff, 64 * KiB) };
  const capacity = u64(buf, h + 12, true);
  const grain = u64(buf, h + 20, true) || 128;
  const perGT = u32(buf, h + 44, true) || 512;
  const gdEntries = Math.ceil(capacity / grain / perGT);
  for (const gdSector of [u64(buf, h + 56, true), u64(buf, h + 48, true)]) {
    const gd = tableIn(buf, { off: gdSector * 512, count: gdEntries, size: 4, le: true, unit: 512, kind: 'vmdk-gd' });
    if (!gd) continue;
    s.tables.push(gd);
    s.cuts.push(gd.off);
    for (let i = 0; i < gd.count; i++) {
      const gt = tableIn(buf, {
        off: u32(buf, gd.off + 4 * i, true) * 512,
        count: perGT,
        size: 4,
        le: true,
        unit: 512,
        kind: 'vmdk-gt',
      });
      if (gt) {
        s.tables.push(gt);
        s.cuts.push(gt.off, gt.off + 1024);
      }
    }
  }
  s.cuts.push(512, (u64(buf, h + 64, true) || 1) * 512);
  return s;
}

function vpcFooterFields(at: number): Field[] {
  return [8, 12, 16, 40, 48, 56, 60, 64].map((o) => be(at + o, o === 16 || o === 40 || o === 48 ? 8 : 4));
}

function vpcStructure(buf: Buffer): Structure {
  const s: Structure = { fields: [], tables: [], cuts: [] };
  const end = buf.length - 512;
  s.fields.push(...vpcFooterFields(end));
  if (buf.subarray(0, 8).toString('latin1') === 'conectix') s.fields.push(...vpcFooterFields(0));
  const dyn = u64(buf, end + 16);
  if (dyn > 0 && dyn + 1024 <= buf.length) {
    s.fields.push(be(dyn + 8, 8), be(dyn + 16, 8), be(dyn + 24, 4), be(dyn + 28, 4), be(dyn + 32, 4));
    for (let i = 0; i < 8; i++) {
      const at = dyn + 576 + 24 * i;
      s.fields.push(be(at + 4, 4), be(at + 8, 4), be(at + 16, 8));
    }
    const bat = tableIn(buf, {
      off: u64(buf, dyn + 16),
      count: u32(buf, dyn + 28),
      size: 4,
      le: false,
      unit: 512,
      kind: 'vpc-bat',
    });
    if (bat) {
      s.tables.push(bat);
      s.cuts.push(bat.off, dyn, dyn + 1024);
    }
  }
  s.cuts.push(end, 512);
  return s;
}

const VHDX_BAT = '2dc27766-f623-4200-9d64-115e9bfd4a08';
const VHDX_META = '8b7ca206-4790-4b9a-b8fe-575f050f886e';
function guidAt(buf: Buffer, at: number): string {
  const b = buf.subarray(at, at + 16);
  if (b.length < 16) return '';
  const h = (x: Buffer) => x.toString('hex');
  return `${h(Buffer.from(b.subarray(0, 4)).reverse())}-${h(Buffer.from(b.subarray(4, 6)).reverse())}-${h(
    Buffer.from(b.subarray(6, 8)).reverse(),
  )}-${h(b.subarray(8, 10))}-${h(b.subarray(10, 16))}`;
}

function vhdxStructure(buf: Buffer): Structure {
  const s: Structure = { fields: [], tables: [], cuts: [64 * KiB, 128 * KiB, 192 * KiB, 256 * KiB, 1 * MiB] };
  for (const h of [64 * KiB, 128 * KiB]) s.fields.push(le(h + 8, 8), le(h + 64, 2), le(h + 66, 2), le(h + 68, 4), le(h + 72, 8));
  for (const r of [192 * KiB, 256 * KiB]) {
    s.fields.push(le(r + 8, 4));
    const n = Math.min(u32(buf, r + 8, true), 16);
    for (let i = 0; i < n; i++) {
      const e = r + 16 + 32 * i;
      s.fields.push(le(e + 16, 8), le(e + 24, 4), le(e + 28, 4));
      const guid = guidAt(buf, e);
      const off = u64(buf, e + 16, true);
      const len = u32(buf, e + 24, true);
      if (r !== 192 * KiB) continue;
      if (guid === VHDX_BAT) {
        const t = tableIn(buf, { off, count: len / 8, size: 8, le: true, unit: MiB, kind: 'vhdx-bat' });
        if (t) s.tables.push(t);
        s.cuts.push(off);
      } else if (guid === VHDX_META && off + 32 < buf.length) {
        s.fields.push(le(off + 10, 2));
        s.cuts.push(off);
        const count = Math.min(u16(buf, off + 10, true), 32);
        for (let k = 0; k < count; k++) {
          const m = off + 32 + 32 * k;
          s.fields.push(le(m + 16, 4), le(m + 20, 4), le(m + 24, 4));
          const itemOff = off + u32(buf, m + 16, true);
          const itemLen = u32(buf, m + 20, true);
          if (itemOff + Math.min(itemLen, 64) <= buf.length) {
            for (let q = 0; q < Math.min(itemLen, 16); q += 4) s.fields.push(le(itemOff + q, 4));
            if (itemLen >= 8) s.fields.push(le(itemOff, 8));
          }
        }
      }
    }
  }
  return s;
}

function vdiStructure(buf: Buffer): Structure {
  const s: Structure = { fields: [], tables: [], cuts: [512, 0x200] };
  for (const o of [68, 72, 76, 80, 340, 344, 348, 352, 356, 360, 364, 376, 380, 384, 388]) s.fields.push(le(o, 4));
  s.fields.push(le(368, 8));
  const map = tableIn(buf, { off: u32(buf, 340, true), count: u32(buf, 384, true), size: 4, le: true, unit: 1, kind: 'vdi-map' });
  if (map) {
    s.tables.push(map);
    s.cuts.push(map.off, u32(buf, 344, true));
  }
  return s;
}

function structureOf(format: string, buf: Buffer): Structure {
  try {
    switch (format) {
      case 'qcow2':
        return qcow2Structure(buf);
      case 'vmdk':
        return vmdkStructure(buf);
      case 'vpc':
        return vpcStructure(buf);
      case 'vhdx':
        return vhdxStructure(buf);
      case 'vdi':
        return vdiStructure(buf);
    }
  } catch {
    // a mutated buffer may defeat the parser: fall back to unstructured mutations
  }
  return { fields: [], tables: [], cuts: [] };
}

// ---------------------------------------------------------------------------------------------
// Mutations

function writeField(buf: Buffer, f: Field, value: bigint): void {
  if (f.off < 0 || f.off + f.size > buf.length) return;
  const v = BigInt.asUintN(f.size * 8, value);
  if (f.size === 1) buf[f.off] = Number(v);
  else if (f.size === 2) f.le ? buf.writeUInt16LE(Number(v), f.off) : buf.writeUInt16BE(Number(v), f.off);
  else if (f.size === 4) f.le ? buf.writeUInt32LE(Number(v), f.off) : buf.writeUInt32BE(Number(v), f.off);
  else f.le ? buf.writeBigUInt64LE(v, f.off) : buf.writeBigUInt64BE(v, f.off);
}
function readField(buf: Buffer, f: Field): bigint {
  if (f.off < 0 || f.off + f.size > buf.length) return 0n;
  if (f.size === 1) return BigInt(buf[f.off]!);
  if (f.size === 2) return BigInt(f.le ? buf.readUInt16LE(f.off) : buf.readUInt16BE(f.off));
  if (f.size === 4) return BigInt(f.le ? buf.readUInt32LE(f.off) : buf.readUInt32BE(f.off));
  return f.le ? buf.readBigUInt64LE(f.off) : buf.readBigUInt64BE(f.off);
}

function interesting(rng: Rng, old: bigint, fileSize: number): bigint {
  const size = BigInt(fileSize);
  const choices: bigint[] = [
    0n,
    1n,
    2n,
    0x7fn,
    0x80n,
    0xffn,
    0x1ffn,
    0x200n,
    0x7fffn,
    0xffffn,
    0x10000n,
    0x7fffffffn,
    0x80000000n,
    0xffffffffn,
    0xfffffffen,
    1n << 32n,
    1n << 50n,
    (1n << 53n) + 1n,
    1n << 63n,
    (1n << 64n) - 1n,
    (1n << 64n) - 512n,
    size,
    size - 1n,
    size + 1n,
    size / 512n,
    size / 512n + 1n,
    old + 1n,
    old - 1n,
    old * 2n,
    old << 9n,
    old >> 9n,
    old << 20n,
    rng.bigU64(),
  ];
  return rng.pick(choices);
}

/** A new value for a table entry: past EOF, misaligned, duplicated, at metadata, looping. */
function tableValue(rng: Rng, buf: Buffer, t: Table, i: number, fileSize: number): bigint {
  const entry: Field = { off: t.off + i * t.size, size: t.size as 2 | 4 | 8, le: t.le };
  const old = readField(buf, entry);
  const other = readField(buf, { ...entry, off: t.off + rng.int(t.count) * t.size });
  const unit = BigInt(t.unit);
  const at = (byteOffset: number) => BigInt(Math.floor(byteOffset / t.unit));
  const choice = rng.int(9);
  let v: bigint;
  switch (choice) {
    case 0:
      v = at(fileSize) + BigInt(rng.int(4)); // at or just past EOF
      break;
    case 1:
      v = at(fileSize) + (1n << BigInt(20 + rng.int(20))); // far past EOF
      break;
    case 2:
      v = old + 1n; // misaligned
      break;
    case 3:
      v = other; // duplicated
      break;
    case 4:
      v = at(t.off); // points at the table itself (a loop)
      break;
    case 5:
      v = 0n + BigInt(rng.int(2)); // header
      break;
    case 6:
      v = interesting(rng, old, fileSize);
      break;
    default:
      v = at(rng.int(fileSize)); // anywhere
  }
  if (t.kind === 'qcow2-l1' || t.kind === 'qcow2-l2' || t.kind === 'qcow2-rc') {
    v *= unit;
    if (t.kind !== 'qcow2-rc' && rng.chance(0.7)) v |= 1n << 63n; // COPIED
    if (t.kind === 'qcow2-l2' && rng.chance(0.15)) v |= 1n << 62n; // compressed
    if (t.kind === 'qcow2-l2' && rng.chance(0.1)) v |= 1n; // zero
  } else if (t.kind === 'vhdx-bat') {
    const state = BigInt(rng.pick([0, 1, 2, 3, 6, 7, 6, 6]));
    v = (BigInt.asUintN(44, v) << 20n) | state;
  } else if (t.kind === 'vdi-map') {
    v = rng.pick([v, 0xffffffffn, 0xfffffffen, old, other, BigInt(rng.int(64)), BigInt(t.count), BigInt(t.count + 1)]);
  }
  return v;
}

const DESCRIPTOR_NAMES = [
  '/etc/passwd',
  '../outside.raw',
  '../../etc/passwd',
  'json:{"file":{"filename":"/etc/passwd"}}',
  'nbd://127.0.0.1/x',
  '',
  '.',
  '/dev/zero',
  'disk.vmdk',
  'disk-flat.vmdk',
  'a/../../b',
  'C:\\Windows\\x.vmdk',
  'missing.vmdk',
];

function mutateText(rng: Rng, text: string, selfName: string): string {
  const lines = text.split('\n');
  const extentIdx = lines.map((l, i) => (/^\s*(RW|RDONLY|NOACCESS)\s/.test(l) ? i : -1)).filter((i) => i >= 0);
  const op = rng.int(10);
  const anyLine = () => rng.int(Math.max(lines.length, 1));
  switch (op) {
    case 0:
    case 1: {
      // rewrite one extent line's parts
      const i = extentIdx.length ? rng.pick(extentIdx) : anyLine();
      const name = rng.pick([...DESCRIPTOR_NAMES, selfName]);
      const size = rng.pick(['0', '1', '-1', '4294967295', '18446744073709551615', '9007199254740993', 'x', '8192', '1e9']);
      const type = rng.pick(['FLAT', 'SPARSE', 'ZERO', 'VMFS', 'VMFSSPARSE', 'SESPARSE', 'VMFSRDM', 'VMFSRAW', 'BOGUS', '']);
      const off = rng.pick(['', ' 0', ' 1', ' 4294967296', ' -5', ' 18446744073709551615']);
      const old = lines[i] ?? '';
      const parts = old.split(/\s+/);
      const which = rng.int(4);
      if (which === 0) parts[1] = size;
      else if (which === 1) parts[2] = type;
      else if (which === 2) parts[3] = `"${name}"`;
      else return lines.map((l, k) => (k === i ? `RW ${size} ${type} "${name}"${off}` : l)).join('\n');
      lines[i] = parts.join(' ');
      break;
    }
    case 2: {
      // duplicate extent lines, many times
      const i = extentIdx.length ? rng.pick(extentIdx) : anyLine();
      const n = rng.pick([2, 16, 3000]);
      lines.splice(i, 0, ...Array<string>(n).fill(lines[i] ?? ''));
      break;
    }
    case 3:
      lines.splice(anyLine(), 1);
      break;
    case 4: {
      const t = rng.pick([
        'monolithicSparse',
        'monolithicFlat',
        'twoGbMaxExtentSparse',
        'twoGbMaxExtentFlat',
        'streamOptimized',
        'vmfs',
        'vmfsSparse',
        'seSparse',
        'custom',
        'fullDevice',
        'partitionedDevice',
        '',
        'x'.repeat(300),
      ]);
      const i = lines.findIndex((l) => l.startsWith('createType'));
      lines[i >= 0 ? i : anyLine()] = `createType="${t}"`;
      break;
    }
    case 5: {
      const cid = rng.pick(['ffffffff', 'fffffffe', '0', 'zzzz', '123456789abcdef', '-1']);
      const key = rng.pick(['CID', 'parentCID']);
      const i = lines.findIndex((l) => l.startsWith(`${key}=`));
      lines[i >= 0 ? i : anyLine()] = `${key}=${cid}`;
      if (rng.chance(0.5)) lines.push(`parentFileNameHint="${rng.pick([...DESCRIPTOR_NAMES, selfName])}"`);
      break;
    }
    case 6:
      lines.splice(
        anyLine(),
        0,
        rng.pick([
          'version=99',
          'version=-1',
          'ddb.geometry.cylinders = "4294967295"',
          'encoding="UTF-16"',
          '\0\0\0',
          '\xff\xfe',
          'A'.repeat(70000),
        ]),
      );
      break;
    case 7: {
      // the whole descriptor replaced by a minimal hostile one
      return `# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="${rng.pick(['monolithicFlat', 'vmfs', 'custom'])}"\nRW ${rng.pick(['8', '4294967295', '2048'])} ${rng.pick(['FLAT', 'ZERO', 'VMFS'])} "${rng.pick([...DESCRIPTOR_NAMES, selfName])}" ${rng.pick(['0', '4294967296'])}\n`;
    }
    case 8: {
      const i = anyLine();
      const l = lines[i] ?? '';
      const p = rng.int(l.length + 1);
      lines[i] = l.slice(0, p) + rng.pick(['"', '\\', '=', ' ', '\0', '\n', '#']) + l.slice(p + 1);
      break;
    }
    default: {
      // two extents that overlap / leave gaps
      const i = extentIdx.length ? rng.pick(extentIdx) : anyLine();
      lines.splice(
        i + 1,
        0,
        `RW ${rng.pick(['1', '8', '4096'])} ${rng.pick(['FLAT', 'ZERO', 'SPARSE'])} "${rng.pick(['disk-flat.vmdk', selfName, 'disk.vmdk'])}" ${rng.pick(['0', '1', '7'])}`,
      );
    }
  }
  return lines.join('\n');
}

// CRC-32C (Castagnoli) and the VHD checksum, to fix what a mutation broke so it reaches the code behind.
const CRC32C_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0x82f63b78 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();
export function crc32c(b: Buffer): number {
  let c = 0xffffffff;
  for (let i = 0; i < b.length; i++) c = CRC32C_TABLE[(c ^ b[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}
export function vhdChecksum(b: Buffer, checksumAt: number): number {
  let sum = 0;
  for (let i = 0; i < b.length; i++) if (i < checksumAt || i >= checksumAt + 4) sum = (sum + b[i]!) >>> 0;
  return ~sum >>> 0;
}

function fixChecksums(format: string, buf: Buffer): void {
  if (format === 'vpc' && buf.length >= 512) {
    for (const at of [0, buf.length - 512]) {
      if (buf.subarray(at, at + 8).toString('latin1') !== 'conectix') continue;
      const f = buf.subarray(at, at + 512);
      f.writeUInt32BE(vhdChecksum(f, 64), 64);
    }
    const dyn = u64(buf, buf.length - 512 + 16);
    if (dyn > 0 && dyn + 1024 <= buf.length) {
      const d = buf.subarray(dyn, dyn + 1024);
      d.writeUInt32BE(vhdChecksum(d, 36), 36);
    }
  } else if (format === 'vhdx') {
    for (const [at, len] of [
      [64 * KiB, 4 * KiB],
      [128 * KiB, 4 * KiB],
      [192 * KiB, 64 * KiB],
      [256 * KiB, 64 * KiB],
    ] as const) {
      if (at + len > buf.length) continue;
      const b = buf.subarray(at, at + len);
      b.writeUInt32LE(0, 4);
      b.writeUInt32LE(crc32c(b), 4);
    }
  }
}

export interface Mutated {
  main: Buffer;
  notes: string[];
}

/** One fuzz input: the seed's main file with 1..5 mutations. */
export function mutate(rng: Rng, seed: Seed, seedBuf: Buffer, others: Buffer[]): Mutated {
  let buf = Buffer.from(seedBuf);
  const notes: string[] = [];
  const rounds = 1 + (rng.chance(0.5) ? 0 : rng.int(4));
  for (let r = 0; r < rounds; r++) {
    const s = structureOf(seed.format, buf);
    const size = buf.length;
    const op = rng.int(100);
    if (op < 28 && s.fields.length) {
      const f = rng.pick(s.fields);
      const v = interesting(rng, readField(buf, f), size);
      writeField(buf, f, v);
      notes.push(`field@${f.off}/${f.size}=${v}`);
    } else if (op < 55 && s.tables.length) {
      const t = rng.pick(s.tables);
      const n = rng.chance(0.8) ? 1 : 1 + rng.int(Math.min(t.count, 64));
      for (let k = 0; k < n; k++) {
        const i = rng.int(t.count);
        const v = tableValue(rng, buf, t, i, size);
        writeField(buf, { off: t.off + i * t.size, size: t.size as 2 | 4 | 8, le: t.le }, v);
        if (k === 0) notes.push(`table@${t.off}[${i}]=${v}${n > 1 ? ` (+${n - 1})` : ''}`);
      }
    } else if (op < 67 && s.text) {
      const region = buf.subarray(s.text.off, s.text.off + s.text.length);
      const text = region.toString('latin1').replace(/\0+$/, '');
      const next = Buffer.from(mutateText(rng, text, seed.main), 'latin1');
      notes.push(`text@${s.text.off}`);
      if (s.text.off === 0 && s.text.length === buf.length) buf = next;
      else {
        region.fill(0);
        next.copy(region, 0, 0, Math.min(next.length, region.length));
      }
    } else if (op < 77) {
      // truncate (sometimes extend)
      const cuts = s.cuts.filter((c) => c > 0 && c < size);
      let at = cuts.length && rng.chance(0.6) ? rng.pick(cuts) + rng.pick([0, 0, -1, 1, -512, 512]) : rng.int(size);
      at = Math.max(0, Math.min(at, size + 4096));
      if (rng.chance(0.1)) at = size + rng.pick([1, 511, 4096, 65536]);
      const next = Buffer.alloc(at);
      buf.copy(next, 0, 0, Math.min(at, size));
      buf = next;
      notes.push(`truncate=${at}`);
    } else if (op < 85 && others.length) {
      // splice a piece of another seed (of any format: hidden headers, ambiguous probes)
      const src = rng.pick(others);
      const len = Math.min(rng.pick([8, 64, 512, 4096, 65536]), src.length);
      const from = rng.chance(0.5) ? 0 : rng.int(Math.max(src.length - len, 1));
      const cuts = s.cuts.filter((c) => c >= 0 && c + len <= size);
      const to = cuts.length && rng.chance(0.5) ? rng.pick(cuts) : rng.int(Math.max(size - len, 1));
      src.copy(buf, to, from, from + len);
      notes.push(`splice ${len}@${from}->${to}`);
    } else {
      // bit flips / byte sets, mostly in the first 64 KiB and the last 4 KiB (where headers live)
      const n = 1 + rng.int(8);
      for (let k = 0; k < n && size > 0; k++) {
        const region = rng.int(3);
        const at =
          region === 0
            ? rng.int(Math.min(size, 4096))
            : region === 1
              ? rng.int(Math.min(size, 65536))
              : size - 1 - rng.int(Math.min(size, 4096));
        if (rng.chance(0.5)) buf[at] = buf[at]! ^ (1 << rng.int(8));
        else buf[at] = rng.pick([0, 0xff, 0x7f, 0x80, rng.int(256)]);
      }
      notes.push(`flip x${n}`);
    }
  }
  if (rng.chance(0.8)) fixChecksums(seed.format, buf);
  else notes.push('checksums left broken');
  return { main: buf, notes };
}

// ---------------------------------------------------------------------------------------------
// The worker: runs info, check, map and a read of one input through the library

export type Outcome = 'ok' | 'error' | 'crash' | 'hang' | 'blowup' | 'died' | 'escape';

export interface ExerciseResult {
  outcome: Outcome;
  /** One line per operation: "info: ok", "map: CorruptImageError: ...". */
  ops: string[];
  /** For crashes: the error's name, message and stack. */
  detail?: string;
  peakRss?: number;
  /** Files opened outside the image's folder. */
  escapes?: string[];
}

const READ_ALL_LIMIT = 16 * MiB;
const MAX_EXTENTS = 200_000;

interface Lib {
  VmferryError: new (...args: never[]) => Error;
  openImage(path: string, o: Record<string, unknown>): Promise<import('../src/disk/types.js').DiskReader>;
  probeFile(path: string): Promise<{ driver: import('../src/disk/types.js').FormatDriver }>;
  getDriver(name: string): import('../src/disk/types.js').FormatDriver;
  flatExtents(r: import('../src/disk/types.js').DiskReader): AsyncIterable<{ offset: number; length: number }>;
}

class Invariant extends Error {}

async function readAndCheck(reader: import('../src/disk/types.js').DiskReader, offset: number, length: number): Promise<void> {
  const b = await reader.read(offset, length);
  if (!Buffer.isBuffer(b) || b.length !== length) {
    throw new Invariant(`read(${offset}, ${length}) returned ${Buffer.isBuffer(b) ? b.length : typeof b} bytes`);
  }
}

function checkCovering(what: string, e: { offset: number; length: number }, expect: number): number {
  if (!Number.isSafeInteger(e.offset) || !Number.isSafeInteger(e.length) || e.length <= 0) {
    throw new Invariant(`${what}: extent ${e.offset}+${e.length} is not a positive safe range`);
  }
  if (e.offset !== expect) throw new Invariant(`${what}: extent at ${e.offset}, expected ${expect} (gap or overlap)`);
  return e.offset + e.length;
}

export async function exercise(lib: Lib, path: string, format: string | undefined): Promise<ExerciseResult> {
  const ops: string[] = [];
  let crash: string | undefined;
  const step = async (name: string, fn: () => Promise<void>) => {
    try {
      await fn();
      ops.push(`${name}: ok`);
    } catch (err) {
      if (err instanceof lib.VmferryError && !(err instanceof Invariant)) {
        ops.push(`${name}: ${err.name}: ${err.message.split('\n')[0]}`);
      } else {
        const e = err as Error;
        ops.push(`${name}: CRASH ${e?.name}: ${e?.message}`);
        crash ??= `${name}: ${e?.stack ?? String(err)}`;
      }
    }
  };
  await step('info', async () => {
    const r = await lib.openImage(path, { format, noBacking: true });
    try {
      JSON.stringify(r.details);
      if (!Number.isSafeInteger(r.virtualSize) || r.virtualSize < 0) throw new Invariant(`virtualSize ${r.virtualSize}`);
    } finally {
      await r.close();
    }
  });
  await step('check', async () => {
    const driver = format ? lib.getDriver(format) : (await lib.probeFile(path)).driver;
    if (driver.check) await driver.check(path, {});
  });
  await step('map', async () => {
    const r = await lib.openImage(path, { format });
    try {
      let pos = 0;
      let n = 0;
      for await (const e of lib.flatExtents(r)) {
        pos = checkCovering('map', e, pos);
        if (++n >= MAX_EXTENTS) return;
      }
      if (pos !== r.virtualSize) throw new Invariant(`map covers ${pos} bytes of ${r.virtualSize}`);
    } finally {
      await r.close();
    }
  });
  await step('read', async () => {
    const r = await lib.openImage(path, { format });
    try {
      const size = r.virtualSize;
      if (size <= READ_ALL_LIMIT) {
        for (let pos = 0; pos < size; pos += MiB) await readAndCheck(r, pos, Math.min(MiB, size - pos));
        return;
      }
      // A big virtual size: read what the layer says is data (up to a budget), then the edges.
      let budget = READ_ALL_LIMIT;
      let pos = 0;
      let n = 0;
      for await (const e of r.extents()) {
        pos = checkCovering('extents', e, pos);
        if (++n >= MAX_EXTENTS) break;
        const len = Math.min(e.length, budget, 4 * MiB);
        if (len > 0 && (e.kind === 'data' || n % 16 === 1)) {
          await readAndCheck(r, e.offset, len);
          budget -= len;
        }
      }
      await readAndCheck(r, 0, Math.min(size, 64 * KiB));
      await readAndCheck(r, size - Math.min(size, 64 * KiB), Math.min(size, 64 * KiB));
    } finally {
      await r.close();
    }
  });
  return { outcome: crash ? 'crash' : ops.every((o) => o.endsWith(': ok')) ? 'ok' : 'error', ops, detail: crash };
}

/** Records every file a worker opens, so a read outside the image's folder is caught. */
function watchOpens(): { allowed: string[]; escapes: string[] } {
  const state = { allowed: [] as string[], escapes: [] as string[] };
  const note = (p: unknown) => {
    if (typeof p !== 'string' && !(p instanceof URL) && !Buffer.isBuffer(p)) return;
    let full = resolve(p instanceof URL ? fileURLToPath(p) : p.toString());
    try {
      full = realpathSync(full);
    } catch {
      // not there: the open fails by itself
    }
    if (!state.allowed.some((a) => full === a || full.startsWith(a + sep))) state.escapes.push(full);
  };
  const wrap = <T extends (...a: never[]) => unknown>(obj: Record<string, unknown>, name: string) => {
    const orig = obj[name] as T;
    obj[name] = (...args: Parameters<T>) => {
      note(args[0]);
      return orig(...args);
    };
  };
  const f = fs as unknown as Record<string, unknown>;
  for (const name of ['openSync', 'open', 'readFileSync', 'readFile', 'createReadStream', 'opendirSync']) wrap(f, name);
  const p = fs.promises as unknown as Record<string, unknown>;
  for (const name of ['open', 'readFile']) wrap(p, name);
  syncBuiltinESMExports();
  return state;
}

async function workerMain(): Promise<void> {
  const rssLimit = Number(process.env.VMFERRY_FUZZ_RSS ?? 512 * MiB);
  const watch = watchOpens();
  const lib = (await import(pathToFileURL(join(repoRoot, 'dist/src/index.js')).href)) as Lib;
  let peak = 0;
  setInterval(() => {
    const rss = process.memoryUsage.rss();
    peak = Math.max(peak, rss);
    if (rss > rssLimit) {
      process.send?.({ blowup: rss });
      process.exit(3);
    }
  }, 20).unref();
  const fatal = (err: unknown) => {
    process.send?.({ fatal: (err as Error)?.stack ?? String(err) }, () => process.exit(4));
  };
  process.on('uncaughtException', fatal);
  process.on('unhandledRejection', fatal);
  process.on('message', async (job: { path: string; format?: string }) => {
    const folder = realpathSync(dirname(job.path));
    watch.allowed = [folder, join(repoRoot, 'node_modules'), join(repoRoot, 'dist'), '/proc', '/sys', '/dev/null'];
    watch.escapes = [];
    peak = process.memoryUsage.rss();
    const result = await exercise(lib, job.path, job.format);
    result.peakRss = peak;
    if (watch.escapes.length) {
      result.outcome = 'escape';
      result.escapes = [...new Set(watch.escapes)];
      result.detail = `opened outside ${folder}: ${result.escapes.join(', ')}`;
    }
    process.send?.(result);
  });
  process.send?.({ ready: true });
}

// ---------------------------------------------------------------------------------------------
// The pool: worker processes under a watchdog and an RSS ceiling

interface PoolOptions {
  timeoutMs: number;
  rssLimit: number;
}

/** CPU time (user + system) a process has used, in ms, from /proc. */
function cpuMs(pid: number | undefined): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100; // utime, stime in clock ticks (USER_HZ 100)
}

class Worker {
  child!: ChildProcess;
  private ready!: Promise<void>;
  private stderr = '';
  constructor(private readonly o: PoolOptions) {
    this.spawn();
  }
  private spawn(): void {
    this.stderr = '';
    this.child = fork(fileURLToPath(import.meta.url), ['--worker'], {
      execArgv: ['--max-old-space-size=1024', '--enable-source-maps'],
      env: { ...process.env, VMFERRY_FUZZ_RSS: String(this.o.rssLimit) },
      stdio: ['ignore', 'ignore', 'pipe', 'ipc'],
    });
    this.child.stderr?.on('data', (d: Buffer) => {
      this.stderr = (this.stderr + d.toString()).slice(-4000);
    });
    this.ready = new Promise((res, rej) => {
      this.child.once('message', () => res());
      this.child.once('exit', (c) => rej(new Error(`fuzz worker exited (${c}) before it was ready: ${this.stderr}`)));
    });
    this.ready.catch(() => {}); // awaited (and reported) by the next run()
  }
  async run(path: string, format: string | undefined): Promise<ExerciseResult> {
    let readyTimer: NodeJS.Timeout | undefined;
    const started = await Promise.race([
      this.ready.then(() => true),
      new Promise<false>((res) => {
        readyTimer = setTimeout(() => res(false), 30_000);
      }),
    ]).catch(() => false);
    clearTimeout(readyTimer);
    if (!started) {
      const detail = `worker did not start: ${this.stderr.trim()}`;
      this.child.removeAllListeners('exit');
      this.child.kill('SIGKILL');
      this.spawn();
      return { outcome: 'died', ops: [], detail };
    }
    const child = this.child;
    return new Promise<ExerciseResult>((res) => {
      let done = false;
      const finish = (r: ExerciseResult, restart: boolean) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        clearInterval(rssTimer);
        child.removeAllListeners('message');
        child.removeAllListeners('exit');
        if (restart) {
          child.kill('SIGKILL');
          this.spawn();
        }
        res(r);
      };
      // The watchdog counts the worker's CPU time (the machine may be shared and loaded), with a
      // wall-clock backstop for an input that waits forever without computing.
      const wallLimit = this.o.timeoutMs * 6;
      const timer = setTimeout(
        () => finish({ outcome: 'hang', ops: [], detail: `no answer within ${wallLimit} ms of wall time` }, true),
        wallLimit,
      );
      const cpuAtStart = cpuMs(child.pid);
      // The parent's view of the child's RSS catches blow-ups that block the child's event loop.
      const rssTimer = setInterval(() => {
        try {
          const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'));
          const rss = m ? Number(m[1]) * 1024 : 0;
          if (rss > this.o.rssLimit) finish({ outcome: 'blowup', ops: [], detail: `RSS ${rss} bytes`, peakRss: rss }, true);
          const cpu = cpuMs(child.pid) - cpuAtStart;
          if (cpu > this.o.timeoutMs)
            finish({ outcome: 'hang', ops: [], detail: `still running after ${cpu} ms of CPU time` }, true);
        } catch {
          // the child is gone: 'exit' reports it
        }
      }, 50);
      child.on('message', (m: ExerciseResult & { blowup?: number; fatal?: string }) => {
        if (m.blowup) finish({ outcome: 'blowup', ops: [], detail: `RSS ${m.blowup} bytes`, peakRss: m.blowup }, true);
        else if (m.fatal) finish({ outcome: 'crash', ops: [], detail: `uncaught: ${m.fatal}` }, true);
        else finish(m, false);
      });
      child.on('exit', (code, signal) => {
        setTimeout(
          () => finish({ outcome: 'died', ops: [], detail: `worker died (${code ?? signal}): ${this.stderr.trim()}` }, true),
          20,
        );
      });
      child.send({ path, format });
    });
  }
  close(): void {
    this.child.removeAllListeners('exit');
    this.child.kill('SIGKILL');
  }
}

// ---------------------------------------------------------------------------------------------
// Saving and replaying findings

interface SavedMeta {
  format: string;
  seed: string;
  /** The name the main file had (references inside may depend on it). */
  name: string;
  /** -f to pass, if any. */
  claim?: string;
  sidecars: string[];
  outcome: Outcome;
  detail?: string;
  notes: string[];
}

function signature(r: ExerciseResult): string {
  const d = r.detail ?? '';
  const frame = /\((?:file:\/\/)?[^)]*\/(src\/[^):]+):\d+/.exec(d)?.[1] ?? /at ([^\s(]+)/.exec(d)?.[1] ?? '';
  const head = d
    .split('\n')[0]!
    .replace(/\d+/g, 'N')
    .replace(/'[^']*'/g, "'X'")
    .slice(0, 120);
  return `${r.outcome} ${frame} ${head}`;
}

function saveFinding(outDir: string, seed: Seed, main: Buffer, r: ExerciseResult, notes: string[], claim?: string): string {
  const sha = createHash('sha1').update(main).digest('hex');
  const dir = join(outDir, seed.format);
  mkdirSync(dir, { recursive: true });
  if (main.length <= 256 * KiB) writeFileSync(join(dir, `${sha}.bin`), main);
  else writeFileSync(join(dir, `${sha}.bin.gz`), gzipSync(main, { level: 9 }));
  for (const s of seed.sidecars)
    writeFileSync(join(dir, `${sha}.side.${s}.gz`), gzipSync(readFileSync(join(seed.dir, s)), { level: 9 }));
  const meta: SavedMeta = {
    format: seed.format,
    seed: seed.name,
    name: seed.main,
    claim,
    sidecars: seed.sidecars,
    outcome: r.outcome,
    detail: r.detail?.slice(0, 2000),
    notes,
  };
  writeFileSync(join(dir, `${sha}.json`), `${JSON.stringify(meta, null, 2)}\n`);
  return join(dir, `${sha}.bin`);
}

/** Every saved input under a regressions folder, unpacked into a temp folder, ready to run. */
export function savedInputs(dir = regressionsDir): { id: string; meta: SavedMeta; stage(into: string): string }[] {
  const out: { id: string; meta: SavedMeta; stage(into: string): string }[] = [];
  if (!existsSync(dir)) return out;
  for (const fmt of readdirSync(dir)) {
    const fdir = join(dir, fmt);
    if (!statSync(fdir).isDirectory()) continue;
    for (const f of readdirSync(fdir)) {
      const m = /^([0-9a-f]{40})\.bin(\.gz)?$/.exec(f);
      if (!m) continue;
      const sha = m[1]!;
      const metaPath = join(fdir, `${sha}.json`);
      const meta: SavedMeta = existsSync(metaPath)
        ? JSON.parse(readFileSync(metaPath, 'utf8'))
        : { format: fmt, seed: '?', name: `input.${fmt}`, sidecars: [], outcome: 'crash', notes: [] };
      out.push({
        id: `${fmt}/${sha}`,
        meta,
        stage(into: string): string {
          const raw = readFileSync(join(fdir, f));
          const main = join(into, meta.name);
          writeFileSync(main, m[2] ? gunzipSync(raw) : raw);
          for (const s of meta.sidecars)
            writeFileSync(join(into, s), gunzipSync(readFileSync(join(fdir, `${sha}.side.${s}.gz`))));
          return main;
        },
      });
    }
  }
  return out.sort((a, b) => a.id.localeCompare(b.id));
}

// ---------------------------------------------------------------------------------------------
// Main

interface Args {
  format: string;
  seconds: number;
  seed: number;
  jobs: number;
  rssMiB: number;
  timeoutS: number;
  save: string;
  replay?: string;
  json: boolean;
  max: number;
}

function parseArgs(argv: string[]): Args {
  const a: Args = {
    format: 'all',
    seconds: 60,
    seed: 1,
    jobs: 1,
    rssMiB: 512,
    timeoutS: 10,
    save: regressionsDir,
    json: false,
    max: Infinity,
  };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i]!;
    const v = () => {
      const x = argv[++i];
      if (x === undefined) throw new Error(`${k} needs a value`);
      return x;
    };
    if (k === '--format') a.format = v();
    else if (k === '--seconds') a.seconds = Number(v());
    else if (k === '--seed') a.seed = Number(v());
    else if (k === '--jobs') a.jobs = Math.max(1, Number(v()));
    else if (k === '--rss-mib') a.rssMiB = Number(v());
    else if (k === '--timeout') a.timeoutS = Number(v());
    else if (k === '--save') a.save = resolve(v());
    else if (k === '--replay') a.replay = resolve(v());
    else if (k === '--max-inputs') a.max = Number(v());
    else if (k === '--json') a.json = true;
    else throw new Error(`unknown option ${k}`);
  }
  if (a.format !== 'all' && !(FORMATS as readonly string[]).includes(a.format)) throw new Error(`unknown format ${a.format}`);
  return a;
}

async function replay(a: Args): Promise<number> {
  const inputs = savedInputs(a.replay);
  const worker = new Worker({ timeoutMs: a.timeoutS * 1000, rssLimit: a.rssMiB * MiB });
  const results: { id: string; outcome: Outcome; ops: string[]; detail?: string }[] = [];
  try {
    for (const input of inputs) {
      const dir = mkdtempSync(join(tmpdir(), 'vmferry-replay-'));
      try {
        const path = input.stage(dir);
        const r = await worker.run(path, input.meta.claim);
        results.push({ id: input.id, outcome: r.outcome, ops: r.ops, detail: r.detail?.split('\n').slice(0, 6).join('\n') });
      } finally {
        rmSync(dir, { recursive: true, force: true });
      }
    }
  } finally {
    worker.close();
  }
  const bad = results.filter((r) => r.outcome !== 'ok' && r.outcome !== 'error');
  if (a.json) process.stdout.write(`${JSON.stringify(results)}\n`);
  else {
    for (const r of results)
      process.stdout.write(`${r.outcome.padEnd(7)} ${r.id}${r.detail ? `\n        ${r.detail.split('\n')[0]}` : ''}\n`);
    process.stdout.write(`replayed ${results.length} inputs, ${bad.length} still failing\n`);
  }
  return bad.length ? 1 : 0;
}

async function fuzz(a: Args): Promise<number> {
  const seeds = loadSeeds(a.format);
  if (seeds.length === 0) throw new Error(`no seeds for ${a.format}`);
  const seedBufs = new Map(seeds.map((s) => [s, readFileSync(join(s.dir, s.main))]));
  const allOthers = loadSeeds('all').map((s) => readFileSync(join(s.dir, s.main)).subarray(0, 256 * KiB));
  const rng = new Rng(a.seed);
  const work = mkdtempSync(join(tmpdir(), 'vmferry-fuzz-'));
  const workers = Array.from({ length: a.jobs }, () => new Worker({ timeoutMs: a.timeoutS * 1000, rssLimit: a.rssMiB * MiB }));
  const counts: Record<string, number> = {};
  const bySignature = new Map<string, number>();
  const errorKinds = new Map<string, number>();
  let inputs = 0;
  const started = Date.now();
  const deadline = started + a.seconds * 1000;
  let lastReport = started;
  const saved: string[] = [];

  const one = async (w: Worker, slot: number) => {
    const seed = rng.pick(seeds);
    let m: Mutated;
    try {
      m = mutate(rng, seed, seedBufs.get(seed)!, allOthers);
    } catch (err) {
      process.stderr.write(`fuzz: mutator failed on ${seed.name} (skipped): ${(err as Error).message}\n`);
      return;
    }
    const claim = rng.chance(0.2) ? seed.format : undefined;
    const dir = join(work, `slot${slot}`);
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir);
    for (const s of seed.sidecars) copyFileSync(join(seed.dir, s), join(dir, s));
    const path = join(dir, seed.main);
    writeFileSync(path, m.main);
    const r = await w.run(path, claim);
    inputs++;
    counts[r.outcome] = (counts[r.outcome] ?? 0) + 1;
    for (const op of r.ops) {
      const k = /^(\w+): (\w+)/.exec(op);
      if (k && k[2] !== 'ok') errorKinds.set(`${k[1]} ${k[2]}`, (errorKinds.get(`${k[1]} ${k[2]}`) ?? 0) + 1);
    }
    if (r.outcome !== 'ok' && r.outcome !== 'error') {
      const sig = `${seed.format} ${signature(r)}`;
      const n = (bySignature.get(sig) ?? 0) + 1;
      bySignature.set(sig, n);
      if (n <= 2) {
        const file = saveFinding(a.save, seed, m.main, r, [`seed ${seed.name}`, ...m.notes], claim);
        saved.push(file);
        process.stdout.write(
          `\n[${r.outcome}] ${seed.name} ${m.notes.join('; ')}\n  ${(r.detail ?? '').split('\n').slice(0, 4).join('\n  ')}\n  saved ${file}\n`,
        );
      }
    }
  };
  await Promise.all(
    workers.map(async (w, slot) => {
      while (Date.now() < deadline && inputs < a.max) {
        await one(w, slot);
        if (Date.now() - lastReport > 15000) {
          lastReport = Date.now();
          process.stderr.write(`fuzz: ${inputs} inputs, ${((inputs * 1000) / (Date.now() - started)).toFixed(1)}/s\n`);
        }
      }
    }),
  );
  for (const w of workers) w.close();
  rmSync(work, { recursive: true, force: true });
  const secs = (Date.now() - started) / 1000;
  const bad = (counts.crash ?? 0) + (counts.hang ?? 0) + (counts.blowup ?? 0) + (counts.died ?? 0) + (counts.escape ?? 0);
  const summary = {
    format: a.format,
    seeds: seeds.map((s) => s.name),
    seed: a.seed,
    inputs,
    seconds: Number(secs.toFixed(1)),
    perSecond: Number((inputs / secs).toFixed(2)),
    ok: counts.ok ?? 0,
    cleanErrors: counts.error ?? 0,
    crashes: (counts.crash ?? 0) + (counts.died ?? 0),
    hangs: counts.hang ?? 0,
    blowups: counts.blowup ?? 0,
    escapes: counts.escape ?? 0,
    distinctFindings: bySignature.size,
    saved: saved.length,
  };
  process.stdout.write(
    `\nfuzz ${a.format}: ${inputs} inputs in ${summary.seconds} s (${summary.perSecond}/s): ${summary.ok} ok, ${summary.cleanErrors} clean errors; ` +
      `crashes ${summary.crashes}, hangs ${summary.hangs}, blow-ups ${summary.blowups}, escapes ${summary.escapes} (${bySignature.size} distinct, ${saved.length} saved)\n`,
  );
  for (const [sig, n] of bySignature) process.stdout.write(`  ${n} x ${sig}\n`);
  const top = [...errorKinds].sort((x, y) => y[1] - x[1]).slice(0, 12);
  process.stdout.write(`  clean errors by operation: ${top.map(([k, n]) => `${k} ${n}`).join(', ')}\n`);
  if (a.json) process.stdout.write(`${JSON.stringify(summary)}\n`);
  return bad ? 1 : 0;
}

const isMain = process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url);
if (isMain) {
  if (process.argv.includes('--worker')) {
    void workerMain();
  } else {
    try {
      const a = parseArgs(process.argv.slice(2));
      process.exitCode = a.replay ? await replay(a) : await fuzz(a);
    } catch (err) {
      process.stderr.write(`fuzz: ${(err as Error).message}\n`);
      process.exitCode = 2;
    }
  }
}
