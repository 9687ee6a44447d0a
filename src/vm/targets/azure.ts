/**
 * Azure target: fixed VHDs whose virtual size is a whole number of MiB (what Azure accepts for
 * an uploaded page blob; convert with size azureSize(virtualSize) and diskOptions
 * {subformat: fixed, force_size: on}), plus NAME-azure.json describing the VM (generation, OS
 * type, a size hint, disks and NICs) and NAME-azure.sh with the az CLI commands that upload the
 * disks and create the VM.
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { join } from 'node:path';
import { CorruptImageError, UnsupportedFeatureError } from '../../disk/errors.js';
import { parseBoolOption } from '../../disk/options.js';
import { azureSize } from '../../formats/vpc/index.js';
import type { TargetDisk, TargetProfile, TargetWriter } from '../dialect.js';
import { MiB, safeVmName, type VmModel } from '../model.js';
import { diskFor, disksInBootOrder, shQuote, writeOutputs } from './files.js';

export { azureSize };

export const azureProfile: TargetProfile = {
  target: 'azure',
  firmware: ['bios', 'uefi'],
  diskBuses: ['scsi', 'ide'],
  scsiModels: ['hyperv-scsi'],
  nicModels: ['hyperv'],
  diskFormat: 'vpc',
  diskOptions: { subformat: 'fixed', force_size: 'on' },
  diskExtension: 'vhd',
};

/** General-purpose (D) then memory-optimised (E) sizes: vCPUs, GiB. All run Generation 1 and 2. */
const SIZES: [string, number, number][] = [
  ['Standard_D2s_v5', 2, 8],
  ['Standard_D4s_v5', 4, 16],
  ['Standard_E4s_v5', 4, 32],
  ['Standard_D8s_v5', 8, 32],
  ['Standard_E8s_v5', 8, 64],
  ['Standard_D16s_v5', 16, 64],
  ['Standard_E16s_v5', 16, 128],
  ['Standard_D32s_v5', 32, 128],
  ['Standard_E32s_v5', 32, 256],
  ['Standard_D48s_v5', 48, 192],
  ['Standard_D64s_v5', 64, 256],
  ['Standard_E64s_v5', 64, 512],
  ['Standard_E104is_v5', 104, 672],
];

/** The smallest listed size with at least the VM's vCPUs and memory. */
export function azureSizeHint(cpus: number, memory: number): string {
  const gib = memory / (1024 * MiB);
  for (const [name, c, m] of SIZES) if (c >= cpus && m >= gib) return name;
  return SIZES[SIZES.length - 1]![0];
}

/** Checks a written disk is a fixed VHD of a whole number of MiB: footer 'conectix', disk type 2. */
export function checkAzureVhd(path: string): number {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    if (size < 512) throw new CorruptImageError('is too small to be a VHD', path);
    const footer = Buffer.alloc(512);
    readSync(fd, footer, 0, 512, size - 512);
    if (footer.subarray(0, 8).toString('latin1') !== 'conectix')
      throw new CorruptImageError('has no VHD footer at its end', path);
    if (footer.readUInt32BE(60) !== 2) throw new UnsupportedFeatureError('is not a fixed VHD; Azure takes only fixed VHDs', path);
    const current = Number(footer.readBigUInt64BE(48));
    if (current % MiB !== 0 || size - 512 !== current) {
      throw new UnsupportedFeatureError(
        `has a virtual size of ${current} bytes, not a whole number of MiB as Azure requires`,
        path,
      );
    }
    return current;
  } finally {
    closeSync(fd);
  }
}

/**
 * The remote counterpart of checkAzureVhd, from what the agent reported of the file it wrote (a
 * remote --out holds no local file to read the footer of). The agent was asked for
 * subformat=fixed, force_size=on and read the file back as a VHD with the sender's content digest;
 * a fixed VHD is exactly its size + the 512-byte footer, while a dynamic one carries a header and
 * block table and one without force_size grows to its CHS geometry, so the file size is the check.
 */
export function checkAzureSent(file: string, capacity: number, sent: { virtualSize: number; fileSize?: number }): void {
  if (capacity % MiB !== 0 || sent.virtualSize !== capacity) {
    throw new UnsupportedFeatureError(
      `was sent with a virtual size of ${sent.virtualSize} bytes, not the ${capacity} (a whole number of MiB) Azure requires`,
      file,
    );
  }
  if (sent.fileSize === undefined) throw new CorruptImageError('the agent did not report the size of the file it wrote', file);
  if (sent.fileSize !== capacity + 512) {
    throw new UnsupportedFeatureError(
      `is ${sent.fileSize} bytes on the agent, not the ${capacity + 512} of a fixed VHD of exactly ${capacity} bytes, which Azure requires`,
      file,
    );
  }
}

/** Why these vpc create options cannot make an Azure disk (undefined when they can). */
export function azureOptionsProblem(options: Record<string, string>): string | undefined {
  if ((options.subformat ?? 'dynamic') !== 'fixed')
    return `subformat=${options.subformat ?? 'dynamic'}: Azure takes only fixed VHDs`;
  if (!parseBoolOption(options.force_size, 'force_size', false))
    return 'force_size off: the VHD would grow to its CHS geometry, not a whole number of MiB';
  return undefined;
}

/** NAME-azure.json and NAME-azure.sh, once the disks are known to be what Azure takes. */
export async function writeAzureDescriptors(model: VmModel, disks: TargetDisk[], outDir: string): Promise<string[]> {
  const name = safeVmName(model.name);
  const desc = azureDescription(model, disks, outDir);
  return writeOutputs(outDir, [
    { name: `${name}-azure.json`, content: `${JSON.stringify(desc, null, 2)}\n` },
    { name: `${name}-azure.sh`, content: azureScript(desc), executable: true },
  ]);
}

export function azureDescription(model: VmModel, disks: TargetDisk[], outDir: string): Record<string, unknown> {
  const name = safeVmName(model.name);
  const ordered = disksInBootOrder(model);
  return {
    name,
    generatedBy: 'vmferry',
    source: { platform: model.sourcePlatform, file: model.sourceFile },
    hyperVGeneration: model.firmware === 'uefi' ? 'V2' : 'V1',
    securityType: model.firmware === 'uefi' && model.secureBoot ? 'TrustedLaunch' : 'Standard',
    osType: model.guest.family === 'windows' ? 'Windows' : 'Linux',
    guest: model.guest.description ?? model.guest.sourceId,
    vCpus: model.cpus,
    memoryMiB: Math.ceil(model.memory / MiB),
    sizeHint: azureSizeHint(model.cpus, model.memory),
    disks: ordered.map(({ index }, rank) => {
      const td = diskFor(disks, index, outDir);
      if (td.format !== 'vpc')
        throw new UnsupportedFeatureError(`disk ${td.fileName} is ${td.format}; Azure takes fixed VHD (vpc)`, outDir);
      return {
        file: td.fileName,
        role: rank === 0 ? 'os' : 'data',
        lun: rank === 0 ? undefined : rank - 1,
        sizeBytes: azureSize(td.capacity),
        sha256: td.sha256,
      };
    }),
    nics: model.nics.map((n, i) => ({ name: `${name}-nic${i}`, sourceMac: n.mac, sourceNetwork: n.network })),
  };
}

export function azureScript(desc: ReturnType<typeof azureDescription>): string {
  const name = String(desc.name);
  const disks = desc.disks as { file: string; role: string; lun?: number; sizeBytes: number }[];
  const L = [
    '#!/bin/sh',
    `# ${name}: uploads the disks and creates the Azure VM with the az CLI (written by vmferry).`,
    '# Usage: sh NAME-azure.sh RESOURCE_GROUP [LOCATION] [SIZE]   (after `az login`)',
    'set -eu',
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a shell parameter expansion, not a template
    'RG=${1:?usage: $0 RESOURCE_GROUP [LOCATION] [SIZE]}',
    // biome-ignore lint/suspicious/noTemplateCurlyInString: a shell parameter expansion, not a template
    'LOCATION=${2:-$(az group show --name "$RG" --query location -o tsv)}',
    `SIZE=\${3:-${desc.sizeHint}}`,
    'HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)',
  ];
  for (const d of disks) {
    const diskName = `${name}-${d.role === 'os' ? 'osdisk' : `data${d.lun}`}`;
    L.push(
      `az disk create --resource-group "$RG" --location "$LOCATION" --name ${shQuote(diskName)} --upload-type Upload --upload-size-bytes ${d.sizeBytes + 512} --sku Premium_LRS${d.role === 'os' ? ` --os-type ${desc.osType} --hyper-v-generation ${desc.hyperVGeneration}` : ''}`,
      `SAS=$(az disk grant-access --resource-group "$RG" --name ${shQuote(diskName)} --access-level Write --duration-in-seconds 86400 --query accessSas -o tsv)`,
      `azcopy copy "$HERE"/${shQuote(d.file)} "$SAS" --blob-type PageBlob`,
      `az disk revoke-access --resource-group "$RG" --name ${shQuote(diskName)}`,
    );
  }
  const os = disks.find((d) => d.role === 'os');
  const data = disks.filter((d) => d.role !== 'os').map((d) => shQuote(`${name}-data${d.lun}`));
  if (os) {
    L.push(
      `az vm create --resource-group "$RG" --location "$LOCATION" --name ${shQuote(name)} --size "$SIZE" --attach-os-disk ${shQuote(`${name}-osdisk`)} --os-type ${desc.osType}${desc.securityType === 'TrustedLaunch' ? ' --security-type TrustedLaunch --enable-secure-boot true' : ''}${data.length ? ` --attach-data-disks ${data.join(' ')}` : ''}`,
    );
  }
  L.push('');
  return L.join('\n');
}

export const azureTarget: TargetWriter = {
  profile: azureProfile,
  write: async (model, disks, outDir) => {
    for (const d of disks) checkAzureVhd(join(outDir, d.fileName));
    return writeAzureDescriptors(model, disks, outDir);
  },
};
