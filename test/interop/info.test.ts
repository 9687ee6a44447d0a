/**
 * `vmferry info --output=json` agrees with `qemu-img info --output=json` on virtual-size, format,
 * cluster-size, backing-filename and the snapshot list, for images qemu-img makes.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { test } from 'node:test';
import { qemuImg, tmpDir, vmferry } from '../helpers/index.js';

interface Case {
  name: string;
  make: (dir: string) => string;
  /**
   * qemu-img's -f, where qemu cannot probe the format: a fixed VHD has no header at offset 0, so
   * qemu-img calls it raw unless told; vmferry finds its footer.
   */
  qemuFormat?: string;
}

const MiB = 1024 * 1024;

function created(fmt: string, opts: string, size = 64 * MiB, name = `${fmt}.img`) {
  return (dir: string) => {
    const path = join(dir, name);
    qemuImg('create', '-q', '-f', fmt, ...(opts ? ['-o', opts] : []), path, String(size));
    return path;
  };
}

const cases: Case[] = [
  { name: 'raw', make: created('raw', '') },
  ...[512, 4096, 65536, 2 * MiB].map((cs) => ({ name: `qcow2 cluster ${cs}`, make: created('qcow2', `cluster_size=${cs}`) })),
  { name: 'qcow2 compat 0.10', make: created('qcow2', 'compat=0.10') },
  { name: 'qcow2 zstd', make: created('qcow2', 'compression_type=zstd') },
  { name: 'qcow2 extended_l2', make: created('qcow2', 'extended_l2=on,cluster_size=128k') },
  { name: 'qcow2 1 TiB', make: created('qcow2', '', 2 ** 40) },
  {
    name: 'qcow2 backing chain of three',
    make: (dir) => {
      qemuImg('create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '64M');
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', join(dir, 'mid.qcow2'));
      qemuImg('create', '-q', '-f', 'qcow2', '-b', 'mid.qcow2', '-F', 'qcow2', join(dir, 'top.qcow2'));
      return join(dir, 'top.qcow2');
    },
  },
  {
    name: 'qcow2 with internal snapshots',
    make: (dir) => {
      const p = join(dir, 'snap.qcow2');
      qemuImg('create', '-q', '-f', 'qcow2', p, '64M');
      qemuImg('snapshot', '-c', 'first', p);
      qemuImg('snapshot', '-c', 'second one', p);
      return p;
    },
  },
  ...['monolithicSparse', 'monolithicFlat', 'twoGbMaxExtentSparse', 'twoGbMaxExtentFlat', 'streamOptimized'].map((sf) => ({
    name: `vmdk ${sf}`,
    make: created('vmdk', `subformat=${sf}`, 64 * MiB, `${sf}.vmdk`),
  })),
  { name: 'vpc dynamic', make: created('vpc', 'subformat=dynamic') },
  { name: 'vpc fixed', make: created('vpc', 'subformat=fixed'), qemuFormat: 'vpc' },
  { name: 'vhdx dynamic', make: created('vhdx', 'subformat=dynamic') },
  { name: 'vhdx fixed', make: created('vhdx', 'subformat=fixed') },
  { name: 'vdi dynamic', make: created('vdi', '') },
  { name: 'vdi static', make: created('vdi', 'static=on') },
];

const FIELDS = ['virtual-size', 'format', 'cluster-size', 'backing-filename', 'backing-filename-format'] as const;

function snapshots(info: Record<string, unknown>) {
  const list = (info.snapshots as Record<string, unknown>[] | undefined) ?? [];
  return list.map((s) => ({
    id: s.id,
    name: s.name,
    'vm-state-size': s['vm-state-size'],
    'date-sec': s['date-sec'],
    'vm-clock-nsec': s['vm-clock-nsec'],
  }));
}

for (const c of cases) {
  test(`info --output=json agrees with qemu-img: ${c.name}`, () => {
    const dir = tmpDir();
    const path = c.make(dir);
    const theirs = JSON.parse(qemuImg('info', ...(c.qemuFormat ? ['-f', c.qemuFormat] : []), '--output=json', path)) as Record<
      string,
      unknown
    >;
    const r = vmferry('info', '--output=json', path);
    assert.equal(r.code, 0, r.stderr);
    const ours = JSON.parse(r.stdout) as Record<string, unknown>;
    for (const f of FIELDS) assert.deepEqual(ours[f], theirs[f], `${f}: ours ${ours[f]} vs qemu-img ${theirs[f]}`);
    assert.deepEqual(snapshots(ours), snapshots(theirs));
  });
}
