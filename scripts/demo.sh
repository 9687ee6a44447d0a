#!/usr/bin/env bash
# Sets vmferry up and runs its main job on a small sample: a disk image with a real file system,
# converted raw -> qcow2 -> VMDK (streamOptimized) -> VHDX -> raw, checked identical at every step.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -d node_modules ] || npm ci --no-audit --no-fund
[ -f dist/cli/main.cjs ] || npm run build --silent

work=$(mktemp -d /tmp/vmferry-demo-XXXXXX)
trap 'rm -rf "$work"' EXIT
vmferry=./bin/vmferry

# A 64 MiB sample disk: a file system image filled from this machine's files, if mke2fs is there.
$vmferry create -f raw "$work/sample.raw" 64M >/dev/null
if command -v mke2fs >/dev/null 2>&1; then
  mke2fs -q -F -t ext4 -d "$PWD/src" "$work/sample.raw" 65536k
else
  head -c 8M /dev/urandom | dd of="$work/sample.raw" bs=1M seek=4 conv=notrunc status=none
fi

step() {
  echo
  echo "== $*"
  "$@"
}
step $vmferry convert -p -O qcow2 "$work/sample.raw" "$work/sample.qcow2"
step $vmferry convert -p -O vmdk -o subformat=streamOptimized "$work/sample.qcow2" "$work/sample.vmdk"
step $vmferry convert -p -O vhdx "$work/sample.vmdk" "$work/sample.vhdx"
step $vmferry convert -p -O raw "$work/sample.vhdx" "$work/roundtrip.raw"
step $vmferry info "$work/sample.vmdk"
step $vmferry compare "$work/sample.raw" "$work/roundtrip.raw"
echo
ls -ls "$work" | sed 1d
