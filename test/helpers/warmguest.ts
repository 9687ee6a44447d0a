/**
 * A Linux guest for the warm-migration tests, built on bootdisk.ts's BIOS disk (Debian kernel,
 * busybox initramfs, syslinux): the initramfs is replaced by one that loads Debian's virtio and
 * ACPI power-button modules (the .ko files from the same linux-image package) and then
 *  - on the source VM (SMBIOS serial `vmferry-warm-source`): keeps writing records to the disk
 *    past the FAT partition (RECORD_BASE): record i is a 4 KiB header `WREC <i> <sha256>` followed
 *    by 60 KiB of random data whose SHA-256 the header names, data first, each dd with
 *    conv=fsync; after a record is on disk it prints `WARM-REC <i> <sha256>` on ttyS0. An ACPI
 *    power-button press makes it print WARM-POWERDOWN, sync and power off;
 *  - anywhere else (the migrated VM): reads every record back, checks each checksum, prints
 *    `WARM-TARGET records=N ok=K bad=B` on ttyS0 and halts.
 * Raw records on the boot disk (not a file system) keep the guest simple and the check exact.
 */
import {
  closeSync,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { bootDisk } from './bootdisk.js';
import { patternBuffer, runOk, sha256 } from './index.js';

const MiB = 1024 * 1024;
const cacheDir = join(tmpdir(), `vmferry-fixtures-${process.getuid?.() ?? 0}`);

/** Where the records start on the disk (past the 48 MiB boot disk's partition). */
export const RECORD_BASE = 48 * MiB;
export const RECORD_SIZE = 64 * 1024;
export const RECORD_AREA = 32 * MiB;
/** Incompressible data after the records, so copying the disk takes a measurable time. */
export const BALLAST = 48 * MiB;
export const WARM_DISK_SIZE = RECORD_BASE + RECORD_AREA + BALLAST;
export const SOURCE_SERIAL = 'vmferry-warm-source';

const MODULES = [
  'virtio_ring',
  'virtio',
  'virtio_pci_modern_dev',
  'virtio_pci_legacy_dev',
  'virtio_pci',
  'virtio_blk',
  'evdev',
  'button',
];

function cpio(entries: { name: string; mode: number; data?: Buffer; rdev?: [number, number] }[]): Buffer {
  const parts: Buffer[] = [];
  const pad = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  let ino = 1;
  const add = (name: string, mode: number, data: Buffer, rdev: [number, number]) => {
    const hex = (v: number) => v.toString(16).padStart(8, '0');
    const nb = Buffer.from(`${name}\0`);
    const h = Buffer.from(
      `070701${hex(ino++)}${hex(mode)}${hex(0)}${hex(0)}${hex(1)}${hex(0)}${hex(data.length)}${hex(0)}${hex(0)}${hex(rdev[0])}${hex(rdev[1])}${hex(nb.length)}${hex(0)}`,
    );
    parts.push(h, nb, pad(h.length + nb.length), data, pad(data.length));
  };
  for (const e of entries) add(e.name, e.mode, e.data ?? Buffer.alloc(0), e.rdev ?? [0, 0]);
  add('TRAILER!!!', 0, Buffer.alloc(0), [0, 0]);
  return Buffer.concat(parts);
}

function initScript(): string {
  const base = RECORD_BASE / 4096;
  const count = RECORD_AREA / RECORD_SIZE;
  return `#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /tmp
/bin/busybox --install -s
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for m in ${MODULES.join(' ')}; do insmod /lib/modules/$m.ko 2>/dev/null; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
serial=$(cat /sys/class/dmi/id/product_serial 2>/dev/null)
if [ "$serial" = "${SOURCE_SERIAL}" ]; then
  for ev in /dev/input/event*; do
    if grep -q "Power Button" /sys/class/input/$(basename $ev)/device/name 2>/dev/null; then
      ( dd if=$ev of=/dev/null bs=24 count=1 2>/dev/null; echo WARM-POWERDOWN > /dev/ttyS0; sync; poweroff -f ) &
    fi
  done
  echo "WARM-READY disk=$([ -b /dev/vda ] && echo vda)" > /dev/ttyS0
  i=0
  while [ $i -lt ${count} ]; do
    dd if=/dev/urandom of=/tmp/d bs=4096 count=15 2>/dev/null
    sum=$(sha256sum /tmp/d | cut -d' ' -f1)
    dd if=/tmp/d of=/dev/vda bs=4096 seek=$((${base} + i * 16 + 1)) conv=notrunc,fsync 2>/dev/null
    echo "WREC $i $sum" > /tmp/h
    dd if=/tmp/h of=/dev/vda bs=4096 count=1 seek=$((${base} + i * 16)) conv=notrunc,sync,fsync 2>/dev/null
    echo "WARM-REC $i $sum" > /dev/ttyS0
    i=$((i+1))
    sleep 0.2
  done
  echo WARM-FULL > /dev/ttyS0
  while true; do sleep 60; done
else
  i=0; ok=0; bad=0
  while [ $i -lt ${count} ]; do
    set -- $(dd if=/dev/vda bs=4096 count=1 skip=$((${base} + i * 16)) 2>/dev/null | head -c 100 | head -n 1)
    [ "$1" = "WREC" ] && [ "$2" = "$i" ] || break
    sum=$(dd if=/dev/vda bs=4096 count=15 skip=$((${base} + i * 16 + 1)) 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$sum" = "$3" ]; then ok=$((ok+1)); else bad=$((bad+1)); fi
    i=$((i+1))
  done
  echo "WARM-TARGET records=$i ok=$ok bad=$bad" > /dev/ttyS0
  while true; do sleep 60; done
fi
`;
}

/** Debian's .ko files for MODULES, from the kernel package bootdisk.ts downloaded. */
function modules(): Map<string, Buffer> {
  const debDir = readdirSync(cacheDir).find((d) => d.startsWith('deb-linux-image-'));
  if (!debDir) throw new Error('the kernel package is not in the fixture cache (bootDisk builds it)');
  const deb = join(cacheDir, debDir, readdirSync(join(cacheDir, debDir)).find((f) => f.endsWith('.deb'))!);
  const work = mkdtempSync(join(tmpdir(), 'vmferry-kmod-'));
  try {
    const list = runOk('dpkg-deb', ['-c', deb])
      .split('\n')
      .map((l) => l.split(/\s+/).pop() ?? '')
      .filter((p) => MODULES.some((m) => p.endsWith(`/${m}.ko`)));
    runOk('sh', [
      '-c',
      'deb=$1; dir=$2; shift 2; dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir" "$@"',
      'sh',
      deb,
      work,
      ...list,
    ]);
    const out = new Map<string, Buffer>();
    for (const p of list) {
      const name = p.split('/').pop()!.replace(/\.ko$/, '');
      out.set(name, readFileSync(join(work, p)));
    }
    for (const m of MODULES) if (!out.has(m)) throw new Error(`module ${m}.ko not found in ${deb}`);
    return out;
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

/** The warm guest's disk as raw (cached); copy it before use. */
export function warmGuestDisk(): string {
  const path = join(cacheDir, 'warm-guest-v2.raw');
  if (existsSync(path)) return path;
  const boot = bootDisk('bios');
  const busybox = readFileSync(join(cacheDir, 'boot-parts', 'busybox'));
  const mods = modules();
  const dir = 0o040755;
  const initrd = gzipSync(
    cpio([
      { name: 'bin', mode: dir },
      { name: 'bin/busybox', mode: 0o100755, data: busybox },
      { name: 'dev', mode: dir },
      { name: 'dev/console', mode: 0o020600, rdev: [5, 1] },
      { name: 'dev/ttyS0', mode: 0o020600, rdev: [4, 64] },
      { name: 'proc', mode: dir },
      { name: 'sys', mode: dir },
      { name: 'lib', mode: dir },
      { name: 'lib/modules', mode: dir },
      ...MODULES.map((m) => ({ name: `lib/modules/${m}.ko`, mode: 0o100644, data: mods.get(m)! })),
      { name: 'init', mode: 0o100755, data: Buffer.from(initScript()) },
    ]),
  );
  mkdirSync(cacheDir, { recursive: true });
  const work = mkdtempSync(join(tmpdir(), 'vmferry-warmguest-'));
  try {
    const tmp = join(work, 'disk.raw');
    copyFileSync(boot.path, tmp);
    runOk('truncate', ['-s', String(WARM_DISK_SIZE), tmp]);
    const fd = openSync(tmp, 'r+');
    writeSync(fd, patternBuffer(BALLAST, 77), 0, BALLAST, RECORD_BASE + RECORD_AREA);
    closeSync(fd);
    const rd = join(work, 'initrd.img');
    writeFileSync(rd, initrd);
    runOk('mcopy', ['-o', '-i', `${tmp}@@${MiB}`, rd, '::/initrd.img'], { env: { ...process.env, MTOOLS_SKIP_CHECK: '1' } });
    runOk('mv', [tmp, path]);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
  return path;
}

export interface GuestRecord {
  index: number;
  sha256: string;
  /** The data's checksum matches the header's. */
  ok: boolean;
}

/** Records as stored in a raw disk image's bytes (the content of the record area). */
export function recordsIn(area: Buffer): GuestRecord[] {
  const out: GuestRecord[] = [];
  for (let i = 0; (i + 1) * RECORD_SIZE <= area.length; i++) {
    const at = i * RECORD_SIZE;
    const header = area.subarray(at, at + 100).toString('latin1');
    const m = /^WREC (\d+) ([0-9a-f]{64})\n/.exec(header);
    if (!m || Number(m[1]) !== i) break;
    out.push({ index: i, sha256: m[2]!, ok: sha256(area.subarray(at + 4096, at + RECORD_SIZE)) === m[2] });
  }
  return out;
}

/** `WARM-REC i sum` lines the source guest printed: records it had fully written. */
export function recordsReported(serialLog: string): Map<number, string> {
  const out = new Map<number, string>();
  for (const m of serialLog.matchAll(/WARM-REC (\d+) ([0-9a-f]{64})/g)) out.set(Number(m[1]), m[2]!);
  return out;
}
