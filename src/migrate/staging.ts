/**
 * Where a migration builds its result: a hidden staging folder beside the output folder DIR
 * (`.DIR.vmferry-staging-PID` in DIR's parent), so a run killed at any point leaves DIR untouched.
 * At the end the staging folder becomes DIR in one rename (DIR missing or empty), replaces a
 * previous vmferry result in DIR (old result moved aside first, then removed), or, when DIR holds
 * files of its own, its files are renamed into DIR one by one with report.json last.
 * A later run removes staging folders whose process is gone.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync, rmdirSync, rmSync, statSync } from 'node:fs';
import { basename, dirname, join, resolve } from 'node:path';
import { ioError, UsageError } from '../disk/errors.js';
import { fsyncDirectory, processAlive } from '../disk/sink.js';

const STAGING = /^\.(.+)\.vmferry-(staging|old)-(\d+)$/;

export interface Staging {
  /** The output folder the user named (absolute). */
  outDir: string;
  /** Where the run writes everything. */
  dir: string;
  /** How the result will be moved into outDir. */
  mode: 'swap' | 'files';
  /** Stale staging folders this run removed. */
  removed: string[];
}

/** Removes staging (and set-aside) folders for `outDir` left by runs that are gone. */
export function removeStaleStaging(outDir: string): string[] {
  const parent = dirname(outDir);
  const removed: string[] = [];
  const sweep = (folder: string, wanted: (name: string) => boolean) => {
    let names: string[];
    try {
      names = readdirSync(folder);
    } catch {
      return;
    }
    for (const name of names) {
      const m = STAGING.exec(name);
      if (!m || !wanted(m[1]!) || processAlive(Number(m[3]))) continue;
      try {
        rmSync(join(folder, name), { recursive: true, force: true });
        removed.push(join(folder, name));
      } catch {
        // another run may be removing it
      }
    }
  };
  sweep(parent, (n) => n === basename(outDir));
  sweep(outDir, (n) => n === 'vmferry');
  return removed;
}

/** A previous vmferry result: report.json naming every other file in the folder. */
function isPreviousResult(outDir: string, names: string[]): boolean {
  if (!names.includes('report.json')) return false;
  try {
    const report = JSON.parse(readFileSync(join(outDir, 'report.json'), 'utf8')) as { tool?: string; files?: string[] };
    if (report.tool !== 'vmferry' || !Array.isArray(report.files)) return false;
    return names.every((n) => n === 'report.json' || report.files!.includes(n));
  } catch {
    return false;
  }
}

function visibleEntries(dir: string): string[] {
  return readdirSync(dir).filter((n) => !STAGING.test(n));
}

/** Creates the staging folder for a run writing into `outDir`. */
export function openStaging(outDirArg: string): Staging {
  const outDir = resolve(outDirArg);
  const parent = dirname(outDir);
  if (!existsSync(parent)) throw new UsageError(`the folder that would hold the output does not exist: ${parent}`, outDirArg);
  if (existsSync(outDir) && !statSync(outDir).isDirectory()) throw new UsageError('--out exists and is not a folder', outDirArg);
  const removed = removeStaleStaging(outDir);
  // Staging beside DIR needs DIR's parent on the same file system (DIR itself may be a mount point).
  let inParent = true;
  if (existsSync(outDir)) inParent = statSync(outDir).dev === statSync(parent).dev;
  const name = inParent ? `.${basename(outDir)}.vmferry-staging-${process.pid}` : `.vmferry.vmferry-staging-${process.pid}`;
  if (!inParent) mkdirSync(outDir, { recursive: true });
  const dir = join(inParent ? parent : outDir, name);
  try {
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir);
  } catch (err) {
    throw ioError(err, dir);
  }
  return { outDir, dir, mode: inParent ? 'swap' : 'files', removed };
}

/**
 * Moves the finished result into outDir. `files` are the staging folder's files, in the order
 * they should appear when moved one by one (report.json last).
 */
export function commitStaging(staging: Staging, files: string[]): void {
  const { outDir, dir } = staging;
  const parent = dirname(outDir);
  fsyncDirectory(dir);
  try {
    const existing = existsSync(outDir) ? visibleEntries(outDir) : undefined;
    const swappable =
      staging.mode === 'swap' && (existing === undefined || existing.length === 0 || isPreviousResult(outDir, existing));
    if (swappable) {
      if (existing === undefined) {
        renameSync(dir, outDir);
      } else if (existing.length === 0 && readdirSync(outDir).length === 0) {
        rmdirSync(outDir);
        renameSync(dir, outDir);
      } else {
        // Replace a previous result: set it aside under a hidden name, swap, then remove it.
        const old = join(parent, `.${basename(outDir)}.vmferry-old-${process.pid}`);
        renameSync(outDir, old);
        renameSync(dir, outDir);
        rmSync(old, { recursive: true, force: true });
      }
      fsyncDirectory(parent);
      return;
    }
    mkdirSync(outDir, { recursive: true });
    for (const f of files) renameSync(join(dir, f), join(outDir, f));
    fsyncDirectory(outDir);
    rmSync(dir, { recursive: true, force: true });
  } catch (err) {
    throw ioError(err, outDir);
  }
}

/** Removes the staging folder of a run that failed. */
export function abortStaging(staging: Staging): void {
  rmSync(staging.dir, { recursive: true, force: true });
}

/** Synchronous cleanup for signal handlers (SIGINT/SIGTERM). */
export function abortStagingSync(staging: Staging | undefined): void {
  if (!staging) return;
  try {
    rmSync(staging.dir, { recursive: true, force: true });
  } catch {
    // best effort on the way out; the next run removes it
  }
}
