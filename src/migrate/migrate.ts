/**
 * `migrate`: inspect the source, map it onto the target, plan, convert every disk, write the
 * target's descriptor, verify each target disk's guest content against its source (SHA-256 through
 * the disk plane), write report.json, and only then move the result into the output folder.
 * Everything is built in a hidden staging folder (see staging.ts): a run killed at any point leaves
 * no half result in DIR, and running it again completes.
 */
import { readdirSync, readFileSync, renameSync, rmSync, statfsSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { type CopyProgress, copyDisk } from '../convert/pipeline.js';
import { CorruptImageError, UnsupportedFeatureError, UsageError, VmferryError } from '../disk/errors.js';
import { getDriver, openImage } from '../disk/registry.js';
import type { DiskReader } from '../disk/types.js';
import { azureSize } from '../formats/vpc/index.js';
import { convertImage } from '../ops/convert.js';
import { openVmDisk } from '../package/member.js';
import type { SendResult } from '../transfer/client.js';
import type { ReadVmOptions, TargetDisk, TargetProfile, TargetWriter } from '../vm/dialect.js';
import { type MappingOverrides, mapModel } from '../vm/mapping.js';
import { type Firmware, safeVmName, type TranslationNote, type VmModel } from '../vm/model.js';
import type { PartitionTable } from '../vm/partitions.js';
import { detectVmReader, targetWriter } from '../vm/registry.js';
import { azureOptionsProblem, checkAzureSent, writeAzureDescriptors } from '../vm/targets/azure.js';
import * as hypervTargetModule from '../vm/targets/hyperv.js';
import { contentDigest } from './hash.js';
import { firmwareWarnings, lookAtDisk, readVm } from './inspect.js';
import {
  isRemoteOut,
  openRemoteStaging,
  PaddedReader,
  parseRemoteOut,
  type RemoteOptions,
  remoteFileUrl,
  sendDisk,
  uploadFiles,
  writeRemoteOvf,
} from './remote.js';
import { humanSummary } from './report.js';
import { abortStaging, abortStagingSync, commitStaging, openStaging } from './staging.js';

export interface MigrateRequest extends ReadVmOptions {
  source: string;
  /** libvirt, qemu, proxmox, vmware, ova, virtualbox, hyperv, azure */
  target: string;
  /** A local folder, or https://HOST:PORT/PREFIX (http:// to an --insecure loopback agent): see remote.ts. */
  outDir: string;
  /** How to reach the agent when outDir is a URL (the token is required then). */
  remote?: RemoteOptions;
  /** --disk-bus */
  diskBus?: string;
  /** --nic-model */
  nicModel?: string;
  /** --disk-format: overrides the target's disk format. */
  diskFormat?: string;
  /** -o: disk create options, over the target's own. */
  diskOptions?: Record<string, string>;
  /** Force the target's firmware (a loud note in the report). */
  forceFirmware?: Firmware;
  /** Progress of the byte-moving stages (convert, verify), per disk. */
  onProgress?: (p: MigrateProgress) => void;
  /** Called as each stage starts. */
  onStage?: (stage: string) => void;
}

export interface MigrateProgress {
  stage: 'convert' | 'verify' | 'send';
  disk: number;
  disks: number;
  done: number;
  total: number;
}

export interface DiskReport {
  index: number;
  source: string;
  sourceFormat: string;
  /** The images the source disk is made of, top first. */
  sourceChain: string[];
  /** Bytes the source files take on disk (the chain's file sizes). */
  sourceFileBytes: number;
  virtualSize: number;
  /** Guest bytes stored as data in the source (through its chain). */
  allocatedBytes: number;
  partitionTable?: PartitionTable;
  target: string;
  targetFormat: string;
  targetOptions: Record<string, string>;
  /** Guest-visible size of the target disk (larger than the source only when the target rounds up). */
  capacity: number;
  targetFileBytes: number;
  sourceSha256: string;
  targetSha256: string;
  /**
   * What sourceSha256/targetSha256 hold: absent = SHA-256 of the guest content; 'vmferry-transfer'
   * = the transfer's content digest (src/transfer/digest.ts), computed by the sender from the
   * source and by the agent from the image it wrote (a remote --out).
   */
  digestAlgorithm?: 'vmferry-transfer';
  /** A remote --out: how the disk travelled. */
  transfer?: {
    url: string;
    wireBytes: number;
    dataBytes: number;
    resentBytes: number;
    resumedAt: number;
    seconds: number;
    fileSha256?: string;
  };
  verified: boolean;
  convertSeconds: number;
}

export interface StageTime {
  stage: string;
  seconds: number;
}

export interface MigrateReport {
  tool: 'vmferry';
  version: string;
  source: string;
  sourceReader: string;
  target: string;
  outDir: string;
  /** A remote --out: the folder on the agent holding the result (ROOT/PREFIX, as the agent reports it). */
  agentDir?: string;
  name: string;
  firmware: Firmware;
  /** The model as read from the source. */
  sourceModel: VmModel;
  /** The model as written for the target. */
  targetModel: VmModel;
  /** Every translation and every dropped device. */
  mappings: TranslationNote[];
  warnings: string[];
  /** Source settings no neutral field holds (not carried), for the administrator. */
  unmapped: { key: string; value: string }[];
  disks: DiskReport[];
  /** Files of the result, relative to outDir (report.json besides). */
  files: string[];
  totals: {
    virtualSize: number;
    allocatedBytes: number;
    sourceFileBytes: number;
    targetFileBytes: number;
    /** targetFileBytes / allocatedBytes: how much room the data takes on the target per byte of guest data. */
    compressionRatio: number;
  };
  stages: StageTime[];
  seconds: number;
  /** Stale staging folders of killed runs removed by this one. */
  cleanedUp: string[];
}

/** The natural file extension of each format. */
const EXTENSIONS: Record<string, string> = { raw: 'img', qcow2: 'qcow2', vmdk: 'vmdk', vpc: 'vhd', vhdx: 'vhdx', vdi: 'vdi' };

/** Formats a target can take, when the user overrides the disk format. */
const FIXED_FORMATS: Record<string, string[]> = { ova: ['vmdk'], azure: ['vpc'], hyperv: ['vhdx', 'vpc'] };

/** The target's profile for this model (Hyper-V's disk format follows the generation). */
export function profileFor(writer: TargetWriter, model: VmModel): TargetProfile {
  const pick = (hypervTargetModule as Record<string, unknown>).hypervProfileFor;
  if (writer.profile.target === 'hyperv' && typeof pick === 'function') return (pick as (m: VmModel) => TargetProfile)(model);
  if (writer.profile.target === 'hyperv' && model.firmware === 'bios' && writer.profile.diskFormat !== 'vpc') {
    return { ...writer.profile, diskFormat: 'vpc', diskOptions: { subformat: 'dynamic' }, diskExtension: 'vhd' };
  }
  return writer.profile;
}

function fileBytes(path: string): number {
  try {
    return statSync(path).blocks * 512;
  } catch {
    return 0;
  }
}

async function withReader<T>(open: Promise<DiskReader>, fn: (r: DiskReader) => Promise<T>): Promise<T> {
  const r = await open;
  try {
    return await fn(r);
  } finally {
    await r.close();
  }
}

export async function migrateVm(req: MigrateRequest): Promise<MigrateReport> {
  const started = process.hrtime.bigint();
  const stages: StageTime[] = [];
  const stage = async <T>(name: string, fn: () => Promise<T>): Promise<T> => {
    req.onStage?.(name);
    const t0 = process.hrtime.bigint();
    try {
      return await fn();
    } finally {
      stages.push({ stage: name, seconds: Number(process.hrtime.bigint() - t0) / 1e9 });
    }
  };
  const writer = targetWriter(req.target);
  const remote = isRemoteOut(req.outDir) ? parseRemoteOut(req.outDir) : undefined;
  if (remote && !req.remote?.token)
    throw new UsageError('--out is a URL: give the agent token with --token-file or VMFERRY_TOKEN');
  const readOptions: ReadVmOptions = {
    allowExternalFiles: req.allowExternalFiles,
    firmware: req.firmware,
    cpus: req.cpus,
    memory: req.memory,
    name: req.name,
  };

  // 1. inspect
  const inspected = await stage('inspect', async () => {
    const { reader, model } = await readVm(req.source, readOptions);
    if (model.disks.length === 0) model.warnings.push('the VM has no disks; only its descriptor is migrated');
    const looks = [];
    for (let i = 0; i < model.disks.length; i++) {
      const look = await lookAtDisk(model, i, readOptions);
      if (look.error) {
        // Open it again to throw the disk plane's own typed error, naming the file.
        await withReader(openVmDisk(model.disks[i]!, { allowExternalFiles: req.allowExternalFiles }), async () => {});
        throw new UnsupportedFeatureError(`disk${i} cannot be opened: ${look.error}`, model.disks[i]!.path);
      }
      looks.push(look);
    }
    const warnings = [...model.warnings];
    for (const l of looks) for (const w of l.partitionTable?.warnings ?? []) warnings.push(`disk${l.index}: ${w}`);
    warnings.push(...firmwareWarnings(model, looks));
    return { reader, model, looks, warnings };
  });
  const { model: sourceModel, looks, warnings } = inspected;

  // 2. map
  const overrides: MappingOverrides = { diskBus: req.diskBus, nicModel: req.nicModel, firmware: req.forceFirmware };
  const mapped = await stage('map', async () => mapModel(sourceModel, writer.profile, overrides));
  const model = mapped.model;
  const name = safeVmName(model.name);

  // 3. plan
  const profile = profileFor(writer, model);
  const format = req.diskFormat ? getDriver(req.diskFormat).name : profile.diskFormat;
  const allowed = FIXED_FORMATS[profile.target];
  if (req.diskFormat && allowed && !allowed.includes(format)) {
    throw new UsageError(`--disk-format ${req.diskFormat}: target ${profile.target} takes only ${allowed.join(' or ')} disks`);
  }
  const createOptions = { ...(format === profile.diskFormat ? profile.diskOptions : {}), ...(req.diskOptions ?? {}) };
  const extension = format === profile.diskFormat ? profile.diskExtension : (EXTENSIONS[format] ?? format);
  if (remote && profile.target === 'azure') {
    // Locally a wrong -o is caught by reading the written VHD; remotely it is refused before
    // anything is sent, since a disk that lands on the agent cannot be taken back.
    const problem = azureOptionsProblem(createOptions);
    if (problem) throw new UsageError(`-o ${problem}`);
  }
  const plan = looks.map((l) => {
    const virtualSize = l.virtualSize!;
    const capacity = profile.target === 'azure' ? azureSize(virtualSize) : virtualSize;
    return { look: l, fileName: `${name}-disk${l.index}.${extension}`, capacity };
  });
  for (const p of plan) {
    if (p.capacity !== p.look.virtualSize) {
      mapped.notes.push({
        from: `disk${p.look.index} size ${p.look.virtualSize} bytes`,
        to: `${p.capacity} bytes`,
        why: `target ${profile.target} needs a whole number of MiB; the added bytes read as zeros`,
      });
    }
  }
  const staging = remote ? openRemoteStaging(remote) : openStaging(req.outDir);
  const onExit = () => abortStagingSync(staging);
  process.on('exit', onExit);
  try {
    await stage('plan', async () => {
      if (remote) return; // the agent's free space is not known here
      const needed = plan.reduce((s, p) => s + (p.look.allocatedBytes ?? 0), 0);
      try {
        const fs = statfsSync(staging.dir);
        const free = fs.bavail * fs.bsize;
        if (needed > free) {
          warnings.push(
            `the target file system has ${free} bytes free and the disks hold ${needed} bytes of data; the conversion may run out of space`,
          );
        }
      } catch {
        // statfs is advisory
      }
    });

    // 4. convert
    const targetDisks: TargetDisk[] = [];
    const convertSeconds: number[] = [];
    const sent = new Map<number, SendResult>();
    if (remote) {
      await stage('send', async () => {
        for (const p of plan) {
          const i = p.look.index;
          const disk = model.disks[i]!;
          const t0 = process.hrtime.bigint();
          const result = await sendDisk(
            remote,
            req.remote!,
            {
              label: disk.stored ? `${disk.path}#${disk.stored.member}` : disk.path,
              open: async () => {
                const r = await openVmDisk(disk, { allowExternalFiles: req.allowExternalFiles });
                if (r.virtualSize === p.capacity) return r;
                // The target rounds the disk up (Azure): the agent gets the source padded with zeros.
                try {
                  return new PaddedReader(r, p.capacity);
                } catch (err) {
                  await r.close();
                  throw err;
                }
              },
            },
            p.fileName,
            format,
            createOptions,
            profile.target === 'ova',
            (done, total) => req.onProgress?.({ stage: 'send', disk: i, disks: plan.length, done, total }),
          );
          convertSeconds[i] = Number(process.hrtime.bigint() - t0) / 1e9;
          // No local file to read back: Azure's fixed-VHD check runs on what the agent reported.
          if (profile.target === 'azure') checkAzureSent(p.fileName, p.capacity, result);
          sent.set(i, result);
          targetDisks.push({ index: i, fileName: p.fileName, format, capacity: p.capacity });
        }
      });
    }
    if (!remote)
      await stage('convert', async () => {
        for (const p of plan) {
          const i = p.look.index;
          const disk = model.disks[i]!;
          const out = join(staging.dir, p.fileName);
          const onProgress = (cp: CopyProgress) =>
            req.onProgress?.({ stage: 'convert', disk: i, disks: plan.length, done: cp.done, total: cp.total });
          const t0 = process.hrtime.bigint();
          if (disk.stored) {
            await convertStored(disk, out, format, createOptions, p.capacity, req.allowExternalFiles, onProgress);
          } else {
            await convertImage({
              source: disk.path,
              target: out,
              sourceFormat: disk.format,
              targetFormat: format,
              options: createOptions,
              targetSize: p.capacity,
              allowExternalFiles: req.allowExternalFiles,
              onProgress,
            });
          }
          convertSeconds[i] = Number(process.hrtime.bigint() - t0) / 1e9;
          targetDisks.push({ index: i, fileName: p.fileName, format, capacity: p.capacity });
        }
      });

    // 5. descriptor
    const written = await stage('descriptor', async () => {
      if (remote) {
        // Written locally as for a local run, then made to name the disks where they landed.
        const files =
          profile.target === 'ova'
            ? writeRemoteOvf(model, name, targetDisks, sent, staging.dir)
            : profile.target === 'azure'
              ? await writeAzureDescriptors(model, targetDisks, staging.dir)
              : await writer.write(model, targetDisks, staging.dir);
        const agentDir = [...sent.values()].find((r) => r.agentDir)?.agentDir;
        if (agentDir) for (const f of files) relocate(join(staging.dir, f), staging.dir, agentDir);
        else if (sent.size > 0) warnings.push('the agent did not say where the disks landed; descriptors may name them wrongly');
        return files;
      }
      const files = await writer.write(model, targetDisks, staging.dir);
      // Writers see the staging folder as their output folder; descriptors that name files by
      // absolute path must name where the files will live once the result is moved into DIR.
      for (const f of files) relocate(join(staging.dir, f), staging.dir, staging.outDir);
      return files;
    });
    const packaged = written.some((f) => /\.ova$/i.test(f));
    const files = [...(packaged ? [] : targetDisks.map((d) => d.fileName)), ...written];

    // 6. verify: each target disk (read back as the target holds it) against its source
    const digests = await stage('verify', async () => {
      const result: { source: string; target: string }[] = [];
      if (remote) {
        // The send already compared the sender's digest of the source with the agent's digest of
        // the image it wrote (and failed otherwise); both are recorded.
        for (const p of plan) {
          const i = p.look.index;
          const r = sent.get(i)!;
          if (r.digest !== r.agentDigest) {
            throw new CorruptImageError(
              `verification failed: the agent's content digest ${r.agentDigest} differs from the source's ${r.digest}`,
              p.fileName,
            );
          }
          targetDisks.find((d) => d.index === i)!.sha256 = r.agentDigest;
          result[i] = { source: r.digest, target: r.agentDigest };
        }
        return result;
      }
      const readBack = packaged ? await readPackagedDisks(join(staging.dir, written.find((f) => /\.ova$/i.test(f))!)) : undefined;
      for (const [j, p] of plan.entries()) {
        const i = p.look.index;
        const total = p.look.virtualSize! * 2;
        let done = 0;
        const tick = (n: number) => {
          done += n;
          req.onProgress?.({ stage: 'verify', disk: i, disks: plan.length, done: Math.min(done, total), total });
        };
        const packedDisk = readBack?.disks.find((d) => d.stored?.member === p.fileName) ?? readBack?.disks[j];
        if (readBack && !packedDisk)
          throw new CorruptImageError(`the written package does not hold ${p.fileName}`, staging.outDir);
        const targetOpen = packedDisk ? openVmDisk(packedDisk) : openImage(join(staging.dir, p.fileName), { format });
        const [s, t] = await Promise.all([
          withReader(openVmDisk(model.disks[i]!, { allowExternalFiles: req.allowExternalFiles }), (r) =>
            contentDigest(r, { onBytes: tick }),
          ),
          withReader(targetOpen, async (r) => {
            if (r.virtualSize < p.capacity) {
              throw new CorruptImageError(
                `target disk is ${r.virtualSize} bytes, smaller than the ${p.capacity} planned`,
                p.fileName,
              );
            }
            if (r.virtualSize > p.capacity) {
              // Some formats round the size up (VHD to its CHS geometry unless force_size=on): the
              // guest sees a slightly larger disk whose added bytes must read as zeros.
              mapped.notes.push({
                from: `disk${i} size ${p.capacity} bytes`,
                to: `${r.virtualSize} bytes`,
                why: `the ${format} format rounded the disk size up; the added bytes read as zeros`,
              });
              p.capacity = r.virtualSize;
            }
            return contentDigest(r, { length: p.look.virtualSize, onBytes: tick });
          }),
        ]);
        if (s.sha256 !== t.sha256) {
          throw new CorruptImageError(
            `verification failed: target content SHA-256 ${t.sha256} differs from the source's ${s.sha256}`,
            p.fileName,
          );
        }
        if (!t.tailIsZero)
          throw new CorruptImageError('verification failed: the bytes added past the source size are not zero', p.fileName);
        targetDisks.find((d) => d.index === i)!.sha256 = t.sha256;
        result[i] = { source: s.sha256, target: t.sha256 };
      }
      return result;
    });

    // 7. report, then commit
    for (const entry of readdirSync(staging.dir)) {
      if (!files.includes(entry)) rmSync(join(staging.dir, entry), { recursive: true, force: true });
    }
    const disks: DiskReport[] = plan.map((p) => {
      const i = p.look.index;
      const chain = p.look.chain ?? [model.disks[i]!.path];
      return {
        index: i,
        source: sourceModel.disks[i]!.path,
        sourceFormat: p.look.format!,
        sourceChain: chain,
        sourceFileBytes: sourceModel.disks[i]!.stored
          ? sourceModel.disks[i]!.stored!.size
          : chain.reduce((s, f) => s + fileBytes(f), 0),
        virtualSize: p.look.virtualSize!,
        allocatedBytes: p.look.allocatedBytes!,
        partitionTable: p.look.partitionTable,
        target: packaged ? `${written.find((f) => /\.ova$/i.test(f))}/${p.fileName}` : p.fileName,
        targetFormat: format,
        targetOptions: createOptions,
        capacity: p.capacity,
        targetFileBytes: remote ? (sent.get(i)?.fileSize ?? 0) : packaged ? 0 : fileBytes(join(staging.dir, p.fileName)),
        sourceSha256: digests[i]!.source,
        targetSha256: digests[i]!.target,
        ...(remote
          ? {
              digestAlgorithm: 'vmferry-transfer' as const,
              transfer: transferOf(sent.get(i)!, remoteFileUrl(remote, p.fileName)),
            }
          : {}),
        verified: true,
        convertSeconds: convertSeconds[i] ?? 0,
      };
    });
    if (packaged) {
      const ova = written.find((f) => /\.ova$/i.test(f))!;
      const size = fileBytes(join(staging.dir, ova));
      // The package holds every disk: its size is shared out by virtual size, for the totals.
      const all = disks.reduce((s, d) => s + d.virtualSize, 0) || 1;
      for (const d of disks) d.targetFileBytes = Math.round((size * d.virtualSize) / all);
    }
    const totals = {
      virtualSize: disks.reduce((s, d) => s + d.virtualSize, 0),
      allocatedBytes: disks.reduce((s, d) => s + d.allocatedBytes, 0),
      sourceFileBytes: disks.reduce((s, d) => s + d.sourceFileBytes, 0),
      targetFileBytes: disks.reduce((s, d) => s + d.targetFileBytes, 0),
      compressionRatio: 0,
    };
    totals.compressionRatio = totals.allocatedBytes > 0 ? totals.targetFileBytes / totals.allocatedBytes : 0;
    const report: MigrateReport = {
      tool: 'vmferry',
      version: '0.1.0',
      source: req.source,
      sourceReader: inspected.reader,
      target: profile.target,
      outDir: staging.outDir,
      ...(remote ? { agentDir: [...sent.values()].find((r) => r.agentDir)?.agentDir } : {}),
      name,
      firmware: model.firmware,
      sourceModel,
      targetModel: model,
      mappings: mapped.notes,
      warnings,
      unmapped: sourceModel.unmapped,
      disks,
      files: [...files, 'report.txt'],
      totals,
      stages,
      seconds: 0,
      cleanedUp: staging.removed,
    };
    await stage('commit', async () => {
      report.seconds = Number(process.hrtime.bigint() - started) / 1e9;
      writeFileSync(join(staging.dir, 'report.txt'), humanSummary(report));
      writeFileSync(join(staging.dir, 'report.json'), `${JSON.stringify(report, null, 2)}\n`);
      if (remote) {
        // Descriptors first, report.json last: on the agent, report.json means the result is whole.
        await uploadFiles(remote, req.remote!, staging.dir, [...written, 'report.txt', 'report.json']);
        abortStaging(staging);
      } else commitStaging(staging, [...files, 'report.txt', 'report.json']);
    });
    report.seconds = Number(process.hrtime.bigint() - started) / 1e9;
    return report;
  } catch (err) {
    abortStaging(staging);
    throw err;
  } finally {
    process.removeListener('exit', onExit);
  }
}

function transferOf(r: SendResult, file: string): NonNullable<DiskReport['transfer']> {
  return {
    url: file,
    wireBytes: r.wireBytes,
    dataBytes: r.dataBytes,
    resentBytes: r.resentBytes,
    resumedAt: r.resumedAt,
    seconds: r.seconds,
    ...(r.fileSha256 ? { fileSha256: r.fileSha256 } : {}),
  };
}

/** Converts a disk whose bytes lie inside another file (an OVA member, a gzip-compressed file). */
async function convertStored(
  disk: VmModel['disks'][number],
  out: string,
  format: string,
  options: Record<string, string>,
  capacity: number,
  allowExternalFiles: boolean | undefined,
  onProgress: (p: CopyProgress) => void,
): Promise<void> {
  const driver = getDriver(format);
  if (!driver.create) throw new UsageError(`Format ${driver.name} does not support writing`);
  await withReader(openVmDisk(disk, { allowExternalFiles }), async (reader) => {
    const writer = await driver.create!(out, capacity, { options });
    try {
      await copyDisk(reader, writer, { onProgress });
      if (capacity > reader.virtualSize) await writer.zero(reader.virtualSize, capacity - reader.virtualSize);
      await writer.finish();
    } catch (err) {
      await writer.abort();
      throw err;
    }
  });
}

/** Reads a written OVA back with vmferry's own OVF reader: the disks as a consumer will find them. */
async function readPackagedDisks(ova: string): Promise<VmModel> {
  const reader = detectVmReader(ova);
  try {
    return await reader.read(ova, {});
  } catch (err) {
    if (err instanceof VmferryError) throw err;
    throw new CorruptImageError(`the written package cannot be read back: ${(err as Error).message}`, ova);
  }
}

/** Rewrites the staging folder's path to the final folder's in a text descriptor (never in binary files). */
function relocate(file: string, from: string, to: string): void {
  let st: ReturnType<typeof statSync>;
  try {
    st = statSync(file);
  } catch {
    return;
  }
  if (!st.isFile() || st.size > 16 * 1024 * 1024) return;
  const data = readFileSync(file);
  if (data.includes(0)) return;
  const text = data.toString('utf8');
  if (!text.includes(from)) return;
  const tmp = `${file}.relocate-${process.pid}`;
  writeFileSync(tmp, text.split(from).join(to), { mode: st.mode });
  renameSync(tmp, file);
}
