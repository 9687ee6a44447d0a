#!/usr/bin/env bash
# The whole test suite, on a fresh Debian/Ubuntu machine: installs the test oracles when missing,
# installs the project, builds, lints, runs every test against qemu-img, libyal and the corpus.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
have() { command -v "$1" >/dev/null 2>&1; }
pyhas() { /usr/bin/python3 -c "import $1" >/dev/null 2>&1; }
have qemu-img || missing+=(qemu-utils)
have xmllint || missing+=(libxml2-utils)
have virt-xml-validate || missing+=(libvirt-clients)
have vmdkinfo || missing+=(libvmdk-utils)
have vhdiinfo || missing+=(libvhdi-utils)
have qcowinfo || missing+=(libqcow-utils)
pyhas pyvmdk || missing+=(python3-libvmdk)
pyhas pyvhdi || missing+=(python3-libvhdi)
pyhas pyqcow || missing+=(python3-libqcow)
have sfdisk || missing+=(fdisk)
have mke2fs || missing+=(e2fsprogs)
have make || missing+=(make)
have g++ || missing+=(g++)
have qemu-system-x86_64 || missing+=(qemu-system-x86)
[ -f /usr/share/OVMF/OVMF_CODE_4M.fd ] || missing+=(ovmf)
have syslinux || missing+=(syslinux)
[ -f /usr/lib/syslinux/mbr/mbr.bin ] || missing+=(syslinux-common)
have mcopy || missing+=(mtools)
have mkfs.fat || missing+=(dosfstools)
[ -f /usr/lib/grub/x86_64-efi/linux.mod ] || missing+=(grub-efi-amd64-bin)
have grub-mkstandalone || missing+=(grub-common)
have strace || missing+=(strace)
have openssl || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  echo "test.sh: installing test oracles: ${missing[*]}"
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund
fi
npm run build --silent
npx biome check .
node --test --test-concurrency=2 dist/test/
