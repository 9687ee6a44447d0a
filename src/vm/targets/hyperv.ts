/**
 * Hyper-V target: the disks (VHDX for a Generation 2 VM, VHD for Generation 1) and NAME.ps1, which
 * creates the VM with New-VM -Generation, sets processors, memory, firmware (secure boot with the
 * Windows or the UEFI CA template), attaches the disks and DVD drives, and adds the network
 * adapters with their MAC addresses. The generation follows the firmware: UEFI -> 2, BIOS -> 1.
 *
 * The static profile names VHDX; `hypervProfileFor(model)` gives the per-VM profile (VHD for
 * Generation 1), which migrate should use for the disk conversion.
 */
import { UnsupportedFeatureError } from '../../disk/errors.js';
import type { TargetDisk, TargetProfile, TargetWriter } from '../dialect.js';
import { safeVmName, type VmModel } from '../model.js';
import { diskFor, psQuote, writeOutputs } from './files.js';

export const hypervProfile: TargetProfile = {
  target: 'hyperv',
  firmware: ['bios', 'uefi'],
  diskBuses: ['scsi', 'ide'],
  scsiModels: ['hyperv-scsi'],
  nicModels: ['hyperv'],
  diskFormat: 'vhdx',
  diskOptions: { subformat: 'dynamic' },
  diskExtension: 'vhdx',
};

/**
 * The profile for one VM: Generation 2 (UEFI) gets dynamic VHDX, Generation 1 (BIOS) dynamic VHD
 * with force_size, so the disk keeps its exact size instead of growing to a CHS geometry.
 */
export function hypervProfileFor(model: Pick<VmModel, 'firmware'>): TargetProfile {
  if (model.firmware === 'uefi') return hypervProfile;
  return { ...hypervProfile, diskFormat: 'vpc', diskOptions: { subformat: 'dynamic', force_size: 'on' }, diskExtension: 'vhd' };
}

export function hypervScript(model: VmModel, disks: TargetDisk[], outDir: string): string {
  const name = safeVmName(model.name);
  const gen = model.firmware === 'uefi' ? 2 : 1;
  const memory = Math.ceil(model.memory / (2 * 1024 * 1024)) * 2 * 1024 * 1024;
  const L: string[] = [];
  const p = (s: string) => L.push(s);
  p(`# ${name}: creates the Hyper-V VM (Generation ${gen}) from the disks in this folder. Written by vmferry.`);
  p('# Run in an elevated PowerShell on the Hyper-V host. The disks are used where they are;');
  p('# copy this folder to the VM storage location first if it should live elsewhere.');
  p('param(');
  p("  [string]$SwitchName = 'Default Switch',");
  p('  [string]$VmPath = $PSScriptRoot');
  p(')');
  p("$ErrorActionPreference = 'Stop'");
  p(`$vm = New-VM -Name ${psQuote(name)} -Generation ${gen} -MemoryStartupBytes ${memory} -NoVHD -Path $VmPath`);
  p(`Set-VMProcessor -VM $vm -Count ${model.cpus}`);
  p(`Set-VMMemory -VM $vm -DynamicMemoryEnabled $false -StartupBytes ${memory}`);
  // New-VM gives a Generation 1 VM a network adapter already: start from none.
  p('Get-VMNetworkAdapter -VM $vm | Remove-VMNetworkAdapter');

  // Controllers: Generation 2 has SCSI controller 0; more (and any on Generation 1) are added.
  const scsiIds = model.controllers.filter((c) => c.bus === 'scsi').map((c) => c.id);
  const scsiNumber = (id: string | undefined): number => {
    const n = id ? scsiIds.indexOf(id) : -1;
    return Math.max(n, 0);
  };
  const needScsi = Math.max(
    0,
    ...[...model.disks, ...model.cdroms].filter((d) => d.bus === 'scsi').map((d) => scsiNumber(d.controller) + 1),
  );
  if (needScsi > 4)
    throw new UnsupportedFeatureError(`Hyper-V has at most 4 SCSI controllers; this VM needs ${needScsi}`, outDir);
  for (let n = gen === 2 ? 1 : 0; n < needScsi; n++) p('Add-VMScsiController -VM $vm');
  const ideNumber = (id: string | undefined): number => Number(/(\d+)$/.exec(id ?? '')?.[1] ?? '0');
  const place = (bus: string, controller: string | undefined, unit: number | undefined, what: string): string => {
    if (bus === 'scsi')
      return `-ControllerType SCSI -ControllerNumber ${scsiNumber(controller)} -ControllerLocation ${unit ?? 0}`;
    if (bus === 'ide') {
      if (gen === 2)
        throw new UnsupportedFeatureError(`${what} is on IDE, which a Generation 2 VM does not have; map it first`, outDir);
      const n = ideNumber(controller);
      if (n > 1 || (unit ?? 0) > 1)
        throw new UnsupportedFeatureError(`${what} is at IDE ${n}:${unit}; Hyper-V has IDE 0-1, locations 0-1`, outDir);
      return `-ControllerType IDE -ControllerNumber ${n} -ControllerLocation ${unit ?? 0}`;
    }
    throw new UnsupportedFeatureError(`${what} is on ${bus}, which Hyper-V does not have; map it first`, outDir);
  };
  let bootDisk: string | undefined;
  let bootRank = Number.POSITIVE_INFINITY;
  model.disks.forEach((d, i) => {
    const td = diskFor(disks, i, outDir);
    const where = place(d.bus, d.controller, d.unit, `disk ${i}`);
    p(`$disk${i} = Add-VMHardDiskDrive -VM $vm ${where} -Path (Join-Path $PSScriptRoot ${psQuote(td.fileName)}) -Passthru`);
    const rank = d.bootOrder ?? 1e9 + i;
    if (rank < bootRank) {
      bootRank = rank;
      bootDisk = `$disk${i}`;
    }
  });
  model.cdroms.forEach((c, i) => {
    const where = place(c.bus, c.controller, c.unit, `cdrom ${i}`)
      .replace('-ControllerType SCSI ', '')
      .replace('-ControllerType IDE ', '');
    p(`Add-VMDvdDrive -VM $vm ${where}`);
  });
  if (gen === 2) {
    const linux = model.guest.family !== 'windows';
    if (model.secureBoot) {
      p(
        `Set-VMFirmware -VM $vm -EnableSecureBoot On -SecureBootTemplate ${linux ? 'MicrosoftUEFICertificateAuthority' : 'MicrosoftWindows'}${bootDisk ? ` -FirstBootDevice ${bootDisk}` : ''}`,
      );
    } else {
      p(`Set-VMFirmware -VM $vm -EnableSecureBoot Off${bootDisk ? ` -FirstBootDevice ${bootDisk}` : ''}`);
    }
  } else {
    p("Set-VMBios -VM $vm -StartupOrder @('IDE', 'CD', 'LegacyNetworkAdapter', 'Floppy')");
  }
  model.nics.forEach((n, i) => {
    if (n.model !== 'hyperv')
      throw new UnsupportedFeatureError(`nic ${i} model '${n.model}' is not a Hyper-V adapter; map it first`, outDir);
    p(`Add-VMNetworkAdapter -VM $vm -Name ${psQuote(`nic${i}`)} -SwitchName $SwitchName`);
    if (n.mac) {
      p(
        `Set-VMNetworkAdapter -VMName ${psQuote(name)} -Name ${psQuote(`nic${i}`)} -StaticMacAddress ${psQuote(n.mac.replace(/:/g, '').toUpperCase())}`,
      );
    }
  });
  p(`Write-Host "VM ${name} created (Generation ${gen}); start it with: Start-VM -Name '${name}'"`);
  return `${L.join('\r\n')}\r\n`;
}

export const hypervTarget: TargetWriter = {
  profile: hypervProfile,
  write: async (model, disks, outDir) => {
    const name = safeVmName(model.name);
    // Generation 2 reads only VHDX; Generation 1 reads both (VHD is what hypervProfileFor picks).
    for (const d of disks) {
      const ok = model.firmware === 'uefi' ? d.format === 'vhdx' : d.format === 'vpc' || d.format === 'vhdx';
      if (!ok) {
        throw new UnsupportedFeatureError(
          `disk ${d.fileName} is ${d.format}, but a Generation ${model.firmware === 'uefi' ? '2 VM takes VHDX' : '1 VM takes VHD or VHDX'} (see hypervProfileFor)`,
          outDir,
        );
      }
    }
    return writeOutputs(outDir, [{ name: `${name}.ps1`, content: hypervScript(model, disks, outDir) }]);
  },
};
