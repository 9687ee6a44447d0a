/**
 * QEMU target: NAME.sh, a POSIX sh script that runs qemu-system-x86_64 with the VM's machine,
 * memory, CPUs, disks (if=none drives + one -device per bus), NICs (user networking), OVMF pflash
 * with a private copy of the VARS template for UEFI, and a serial console on stdio. Arguments given
 * to the script come last, so `NAME.sh -display none -serial file:out.txt` overrides: when the
 * caller names a -serial, the script adds none of its own.
 *
 * Environment: QEMU (binary), ACCEL (default kvm:tcg), OVMF_CODE, OVMF_VARS (template paths).
 */
import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetDisk, TargetWriter } from '../dialect.js';
import { safeVmName, type VmModel } from '../model.js';
import { diskFor, mib, shQuote, writeOutputs } from './files.js';
import { controllerIndexes, KVM_NIC, KVM_SCSI, kvmProfile, needsPiix, OVMF } from './libvirt.js';

export function qemuScript(model: VmModel, disks: TargetDisk[], outDir: string): string {
  const name = safeVmName(model.name);
  const piix = needsPiix(model);
  const uefi = model.firmware === 'uefi';
  const secure = uefi && model.secureBoot === true && !piix;
  const ctls = controllerIndexes(model);
  const args: string[] = [];
  const arg = (...a: string[]) => args.push(a.join(' '));

  arg('-name', shQuote(name));
  arg('-machine', `${piix ? 'pc' : 'q35'}${secure ? ',smm=on' : ''},accel="$ACCEL"`);
  if (secure) arg('-global', 'driver=cfi.pflash01,property=secure,value=on');
  arg('-m', `${mib(model.memory)}M`);
  const cores =
    model.coresPerSocket && model.coresPerSocket >= 1 && model.cpus % model.coresPerSocket === 0 ? model.coresPerSocket : 1;
  arg('-smp', `${model.cpus},sockets=${model.cpus / cores},cores=${cores},threads=1`);
  arg('-nodefaults');
  if (uefi) {
    arg('-drive', 'if=pflash,format=raw,unit=0,readonly=on,file="$(qopt "$OVMF_CODE")"');
    arg('-drive', 'if=pflash,format=raw,unit=1,file="$(qopt "$VARS")"');
  }
  // Controllers.
  for (const [id, c] of ctls) {
    if (c.bus === 'scsi') {
      const m = KVM_SCSI[c.model ?? 'virtio-scsi'];
      if (!m)
        throw new UnsupportedFeatureError(
          `SCSI controller model '${c.model}' is not supported by QEMU here; map it first`,
          outDir,
        );
      arg('-device', `${m.qemu},id=${shQuote(id)}`);
    } else if (c.bus === 'sata') {
      arg('-device', `ich9-ahci,id=${shQuote(id)}`);
    }
  }
  const busArg = (controller: string | undefined, bus: string, unit: number | undefined, what: string): string => {
    const c = controller ? ctls.get(controller) : undefined;
    if (!c)
      throw new UnsupportedFeatureError(`${what} names controller '${controller}', which the model does not define`, outDir);
    const u = unit ?? 0;
    if (bus === 'ide') return `bus=ide.${c.index & 1},unit=${u}`;
    if (bus === 'sata') return `bus=${controller}.${u}`;
    // SCSI: virtio-scsi addresses targets, the LSI HBAs too (one LUN each).
    return `bus=${controller}.0,scsi-id=${u}`;
  };
  model.disks.forEach((d, i) => {
    const td = diskFor(disks, i, outDir);
    const id = `disk${i}`;
    arg('-drive', `if=none,id=${id},format=${td.format},file="$HEREQ"/${shQuote(td.fileName)}`);
    const boot = d.bootOrder !== undefined ? `,bootindex=${Math.max(1, Math.round(d.bootOrder))}` : '';
    switch (d.bus) {
      case 'virtio':
        arg('-device', `virtio-blk-pci,drive=${id}${boot}`);
        break;
      case 'nvme':
        arg('-device', `nvme,drive=${id},serial=vmferry${i}${boot}`);
        break;
      case 'ide':
      case 'sata':
        arg('-device', `ide-hd,drive=${id},${busArg(d.controller, d.bus, d.unit, `disk ${i}`)}${boot}`);
        break;
      case 'scsi':
        arg('-device', `scsi-hd,drive=${id},${busArg(d.controller, d.bus, d.unit, `disk ${i}`)}${boot}`);
        break;
    }
  });
  model.cdroms.forEach((c, i) => {
    const id = `cd${i}`;
    arg('-drive', `if=none,id=${id},media=cdrom,readonly=on${c.path ? `,file=${shQuote(c.path.replace(/,/g, ',,'))}` : ''}`);
    if (c.bus === 'ide' || c.bus === 'sata')
      arg('-device', `ide-cd,drive=${id},${busArg(c.controller, c.bus, c.unit, `cdrom ${i}`)}`);
    else if (c.bus === 'scsi') arg('-device', `scsi-cd,drive=${id},${busArg(c.controller, c.bus, c.unit, `cdrom ${i}`)}`);
    else throw new UnsupportedFeatureError(`cdrom ${i} cannot sit on ${c.bus}`, outDir);
  });
  model.nics.forEach((n, i) => {
    const m = KVM_NIC[n.model];
    if (!m) throw new UnsupportedFeatureError(`nic ${i} model '${n.model}' is not supported by QEMU here; map it first`, outDir);
    arg('-netdev', `user,id=net${i}`);
    arg('-device', `${m.qemu},id=nic${i},netdev=net${i}${n.mac ? `,mac=${n.mac}` : ''}`);
  });
  arg('-vga', 'std');
  arg('-nographic');

  const lines = [
    '#!/bin/sh',
    `# ${name}: QEMU launch script written by vmferry (from ${model.sourcePlatform}).`,
    '# Extra qemu-system-x86_64 options may follow on the command line; they come last and win.',
    '# When they name a -serial, the default serial console on stdio is left out.',
    'set -eu',
    'HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)',
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a shell parameter expansion, not a template
    'QEMU=${QEMU:-qemu-system-x86_64}',
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a shell parameter expansion, not a template
    'ACCEL=${ACCEL:-kvm:tcg}',
    '# QEMU option values double their commas.',
    "qopt() { printf '%s' \"$1\" | sed 's/,/,,/g'; }",
    'HEREQ=$(qopt "$HERE")',
  ];
  if (uefi) {
    lines.push(
      `OVMF_CODE=\${OVMF_CODE:-${secure ? OVMF.codeSecure : OVMF.code}}`,
      `OVMF_VARS=\${OVMF_VARS:-${secure ? OVMF.varsSecure : OVMF.vars}}`,
      `VARS="$HERE"/${shQuote(`${name}_VARS.fd`)}`,
      '# The VM keeps its own copy of the UEFI variable store next to this script.',
      '[ -f "$VARS" ] || cp "$OVMF_VARS" "$VARS"',
    );
  }
  lines.push(
    'serial_given=no',
    'for a in "$@"; do',
    '  if [ "$a" = -serial ]; then serial_given=yes; fi',
    'done',
    'if [ "$serial_given" = no ]; then set -- -serial mon:stdio "$@"; fi',
    'exec "$QEMU" \\',
    ...args.map((a) => `  ${a} \\`),
    '  "$@"',
    '',
  );
  return lines.join('\n');
}

export const qemuTarget: TargetWriter = {
  profile: kvmProfile('qemu'),
  write: async (model, disks, outDir) => {
    const name = safeVmName(model.name);
    return writeOutputs(outDir, [{ name: `${name}.sh`, content: qemuScript(model, disks, outDir), executable: true }]);
  },
};
