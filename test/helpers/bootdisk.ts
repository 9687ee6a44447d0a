/**
 * Real bootable Linux disks built from Debian's own packages, for the migrate boot tests:
 * Debian's kernel (linux-image-amd64's vmlinuz) and a tiny initramfs (busybox-static + an /init
 * that prints a marker line on the serial console, saying which firmware booted it, then powers
 * off). Two variants:
 *  - bios: MBR with syslinux's mbr.bin in sector 0 and one active FAT16 partition holding syslinux
 *    (installed with `syslinux --install` on the partition image, spliced in at 1 MiB);
 *  - uefi: GPT with an EFI system partition (FAT32) holding EFI/BOOT/BOOTX64.EFI, a standalone
 *    GRUB (grub-mkstandalone) with its grub.cfg embedded.
 * Packages come from Debian's archive only (apt-get download; dpkg-deb). Disks are cached between
 * runs like test/helpers/images.ts does.
 */
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { run, runOk } from './index.js';

const MiB = 1024 * 1024;
const cacheDir = join(tmpdir(), `vmferry-fixtures-${process.getuid?.() ?? 0}`);

export type BootFirmware = 'bios' | 'uefi';

export interface BootDisk {
  /** The raw disk image. */
  path: string;
  firmware: BootFirmware;
  /** The guest prints `${marker} firmware=bios|uefi` on ttyS0 once /init runs. */
  marker: string;
  size: number;
}

/** The marker: unique enough never to appear in a kernel or firmware log by chance. */
export const BOOT_MARKER = 'VMFERRY-BOOT-MARKER-5c1e0f7a9d';

export const OVMF_CODE = '/usr/share/OVMF/OVMF_CODE_4M.fd';
export const OVMF_VARS = '/usr/share/OVMF/OVMF_VARS_4M.fd';

const have = (cmd: string) => run('sh', ['-c', `command -v ${cmd}`]).code === 0;

/** Tools (and the packages holding them) the boot tests need and this machine lacks. */
export function missingBootTools(firmware: BootFirmware): string[] {
  const need: [string, string][] = [
    ['qemu-system-x86_64', 'qemu-system-x86'],
    ['apt-get', 'apt'],
    ['dpkg-deb', 'dpkg'],
    ['sfdisk', 'fdisk'],
    ['mkfs.fat', 'dosfstools'],
    ['mcopy', 'mtools'],
  ];
  if (firmware === 'bios') need.push(['syslinux', 'syslinux']);
  else need.push(['grub-mkstandalone', 'grub-efi-amd64-bin']);
  const missing = need.filter(([cmd]) => !have(cmd)).map(([, pkg]) => pkg);
  if (firmware === 'bios' && !existsSync('/usr/lib/syslinux/mbr/mbr.bin')) missing.push('syslinux-common');
  if (firmware === 'uefi' && !existsSync('/usr/lib/grub/x86_64-efi/linux.mod')) missing.push('grub-efi-amd64-bin');
  if (firmware === 'uefi' && !(existsSync(OVMF_CODE) && existsSync(OVMF_VARS))) missing.push('ovmf');
  return missing;
}

function cached(name: string, build: (path: string) => void): string {
  mkdirSync(cacheDir, { recursive: true });
  const path = join(cacheDir, name);
  if (!existsSync(path)) {
    const temp = `${path}.building-${process.pid}`;
    try {
      build(temp);
    } catch (err) {
      rmSync(temp, { recursive: true, force: true });
      throw err;
    }
    runOk('mv', [temp, path]);
  }
  return path;
}

/** Downloads one Debian package (from the configured Debian archive) into the cache; returns the .deb. */
function debianPackage(pkg: string): string {
  const folder = cached(`deb-${pkg}`, (tmp) => {
    mkdirSync(tmp, { recursive: true });
    runOk('apt-get', ['download', '-q', pkg], { cwd: tmp });
  });
  const deb = readdirSync(folder).find((f) => f.endsWith('.deb'));
  if (!deb) throw new Error(`apt-get download ${pkg} left no .deb in ${folder}`);
  return join(folder, deb);
}

/** linux-image-amd64 is a metapackage: the kernel is the versioned package it depends on. */
function kernelPackageName(): string {
  const out = runOk('apt-cache', ['depends', 'linux-image-amd64']);
  const m = /Depends:\s*(linux-image-[0-9][^\s]*-amd64)/.exec(out);
  if (!m) throw new Error(`cannot find the kernel package linux-image-amd64 depends on:\n${out}`);
  return m[1]!;
}

/** Debian's kernel image (vmlinuz) and static busybox, unpacked from their packages. */
function kernelAndBusybox(): { vmlinuz: string; busybox: string } {
  const folder = cached('boot-parts', (tmp) => {
    mkdirSync(tmp, { recursive: true });
    const kernelDeb = debianPackage(kernelPackageName());
    const bbDeb = debianPackage('busybox-static');
    const x = join(tmp, 'x');
    mkdirSync(x);
    // Only the kernel image is needed: extract boot/vmlinuz-* from the package's file system tar.
    runOk('sh', ['-c', 'dpkg-deb --fsys-tarfile "$1" | tar -x -C "$2" --wildcards "./boot/vmlinuz-*"', 'sh', kernelDeb, x]);
    const kernel = readdirSync(join(x, 'boot')).find((f) => f.startsWith('vmlinuz-'));
    if (!kernel) throw new Error(`no vmlinuz in ${kernelDeb}`);
    runOk('mv', [join(x, 'boot', kernel), join(tmp, 'vmlinuz')]);
    const bb = join(tmp, 'bb');
    runOk('dpkg-deb', ['-x', bbDeb, bb]);
    runOk('mv', [join(bb, 'bin', 'busybox'), join(tmp, 'busybox')]);
    rmSync(x, { recursive: true, force: true });
    rmSync(bb, { recursive: true, force: true });
  });
  return { vmlinuz: join(folder, 'vmlinuz'), busybox: join(folder, 'busybox') };
}

/** A newc cpio archive (the kernel's initramfs format). */
function cpioNewc(entries: { name: string; mode: number; data?: Buffer; rdev?: [number, number] }[]): Buffer {
  const parts: Buffer[] = [];
  const pad4 = (n: number) => Buffer.alloc((4 - (n % 4)) % 4);
  let ino = 1;
  const header = (name: string, mode: number, size: number, rdev: [number, number]) => {
    const hex = (v: number) => v.toString(16).padStart(8, '0');
    const nameBytes = Buffer.from(`${name}\0`);
    const h = Buffer.from(
      `070701${hex(ino++)}${hex(mode)}${hex(0)}${hex(0)}${hex(1)}${hex(0)}${hex(size)}${hex(0)}${hex(0)}${hex(rdev[0])}${hex(rdev[1])}${hex(nameBytes.length)}${hex(0)}`,
    );
    parts.push(h, nameBytes, pad4(h.length + nameBytes.length));
  };
  for (const e of entries) {
    const data = e.data ?? Buffer.alloc(0);
    header(e.name, e.mode, data.length, e.rdev ?? [0, 0]);
    parts.push(data, pad4(data.length));
  }
  header('TRAILER!!!', 0, 0, [0, 0]);
  return Buffer.concat(parts);
}

function initramfs(busybox: Buffer): Buffer {
  const init = `#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null
/bin/busybox mount -t sysfs sysfs /sys
if [ -d /sys/firmware/efi ]; then fw=uefi; else fw=bios; fi
echo "${BOOT_MARKER} firmware=$fw" > /dev/ttyS0
/bin/busybox poweroff -f
`;
  const dir = 0o040755;
  return gzipSync(
    cpioNewc([
      { name: 'bin', mode: dir },
      { name: 'bin/busybox', mode: 0o100755, data: busybox },
      { name: 'dev', mode: dir },
      { name: 'dev/console', mode: 0o020600, rdev: [5, 1] },
      { name: 'dev/ttyS0', mode: 0o020600, rdev: [4, 64] },
      { name: 'proc', mode: dir },
      { name: 'sys', mode: dir },
      { name: 'init', mode: 0o100755, data: Buffer.from(init) },
    ]),
  );
}

const KERNEL_ARGS = 'console=ttyS0 quiet panic=-1';

function fatImage(path: string, bytes: number, fatBits: 16 | 32, hiddenSectors: number, label: string): void {
  runOk('mkfs.fat', ['-C', '-F', String(fatBits), '-h', String(hiddenSectors), '-n', label, path, String(bytes / 1024)]);
}

function mtools(args: string[]): void {
  runOk(args[0]!, args.slice(1), { env: { ...process.env, MTOOLS_SKIP_CHECK: '1' } });
}

function splice(disk: string, part: string, offset: number): void {
  runOk('dd', [`if=${part}`, `of=${disk}`, 'bs=1M', `seek=${offset / MiB}`, 'conv=notrunc,sparse', 'status=none']);
}

function buildBios(out: string, vmlinuz: string, initrd: string, work: string): void {
  const size = 48 * MiB;
  runOk('truncate', ['-s', String(size), out]);
  runOk('sfdisk', ['--quiet', out], { input: 'label: dos\nstart=2048, type=6, bootable\n' });
  const part = join(work, 'part.img');
  fatImage(part, size - MiB, 16, 2048, 'VMFBIOS');
  writeFileSync(
    join(work, 'syslinux.cfg'),
    `DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /vmlinuz\n  APPEND initrd=/initrd.img ${KERNEL_ARGS}\n`,
  );
  mtools(['mcopy', '-i', part, vmlinuz, '::/vmlinuz']);
  mtools(['mcopy', '-i', part, initrd, '::/initrd.img']);
  mtools(['mcopy', '-i', part, join(work, 'syslinux.cfg'), '::/syslinux.cfg']);
  runOk('syslinux', ['--install', part]);
  splice(out, part, MiB);
  // syslinux's MBR boot code: the first 440 bytes (the partition table after them stays).
  runOk('dd', ['if=/usr/lib/syslinux/mbr/mbr.bin', `of=${out}`, 'bs=440', 'count=1', 'conv=notrunc', 'status=none']);
}

function buildUefi(out: string, vmlinuz: string, initrd: string, work: string): void {
  const size = 64 * MiB;
  runOk('truncate', ['-s', String(size), out]);
  const espSectors = (size - 2 * MiB) / 512;
  runOk('sfdisk', ['--quiet', out], { input: `label: gpt\nstart=2048, size=${espSectors}, type=uefi, name="EFI System"\n` });
  const cfg = join(work, 'grub.cfg');
  writeFileSync(
    cfg,
    `set timeout=0\nsearch --no-floppy --file --set=root /vmferry-boot\nlinux /vmlinuz ${KERNEL_ARGS}\ninitrd /initrd.img\nboot\n`,
  );
  const efi = join(work, 'BOOTX64.EFI');
  runOk('grub-mkstandalone', [
    '-O',
    'x86_64-efi',
    '-o',
    efi,
    '--modules=part_gpt fat linux search search_fs_file normal',
    '--locales=',
    '--themes=',
    '--fonts=',
    `boot/grub/grub.cfg=${cfg}`,
  ]);
  const part = join(work, 'esp.img');
  fatImage(part, espSectors * 512, 32, 2048, 'VMFESP');
  writeFileSync(join(work, 'vmferry-boot'), 'vmferry boot test\n');
  mtools(['mmd', '-i', part, '::/EFI', '::/EFI/BOOT']);
  mtools(['mcopy', '-i', part, efi, '::/EFI/BOOT/BOOTX64.EFI']);
  mtools(['mcopy', '-i', part, vmlinuz, '::/vmlinuz']);
  mtools(['mcopy', '-i', part, initrd, '::/initrd.img']);
  mtools(['mcopy', '-i', part, join(work, 'vmferry-boot'), '::/vmferry-boot']);
  splice(out, part, MiB);
}

/** A bootable raw disk of the given variant (built once, then cached). */
export function bootDisk(firmware: BootFirmware): BootDisk {
  const path = cached(`boot-${firmware}-v1.raw`, (out) => {
    const { vmlinuz, busybox } = kernelAndBusybox();
    const work = mkdtempSync(join(tmpdir(), 'vmferry-bootdisk-'));
    try {
      const initrd = join(work, 'initrd.img');
      writeFileSync(initrd, initramfs(readFileSync(busybox)));
      if (firmware === 'bios') buildBios(out, vmlinuz, initrd, work);
      else buildUefi(out, vmlinuz, initrd, work);
    } finally {
      rmSync(work, { recursive: true, force: true });
    }
  });
  return { path, firmware, marker: BOOT_MARKER, size: firmware === 'bios' ? 48 * MiB : 64 * MiB };
}
