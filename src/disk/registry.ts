import { FormatMismatchError, UnsafeReferenceError, UsageError } from './errors.js';
import { FileSource } from './source.js';
import { type DiskReader, type FormatDriver, MAX_CHAIN_DEPTH, type OpenOptions } from './types.js';

const drivers = new Map<string, FormatDriver>();
const aliases = new Map<string, string>();

export function registerFormat(driver: FormatDriver): void {
  drivers.set(driver.name, driver);
  for (const alias of driver.aliases ?? []) aliases.set(alias, driver.name);
}

export function formatNames(): string[] {
  return [...drivers.keys()];
}

/** The driver for a name given with -f/-O (aliases such as vhd for vpc accepted). */
export function getDriver(name: string): FormatDriver {
  const driver = drivers.get(name) ?? drivers.get(aliases.get(name) ?? '');
  if (!driver) {
    throw new UsageError(`Unknown driver '${name}' (known: ${formatNames().join(', ')})`);
  }
  return driver;
}

export const PROBE_BYTES = 64 * 1024;
/** A non-raw driver this sure is a match; two of them at once is an ambiguous image. */
const CONFIDENT = 50;

export interface ProbeResult {
  driver: FormatDriver;
  score: number;
  /** All drivers that recognised the content, best first. */
  candidates: { name: string; score: number }[];
}

export async function probeFile(path: string): Promise<ProbeResult> {
  const src = FileSource.open(path);
  try {
    const headLength = Math.min(PROBE_BYTES, src.size);
    const tailLength = Math.min(PROBE_BYTES, src.size);
    const head = await src.read(0, headLength);
    const tail = await src.read(src.size - tailLength, tailLength);
    return probeBytes(path, head, tail, src.size);
  } finally {
    await src.close();
  }
}

export function probeBytes(path: string, head: Buffer, tail: Buffer, size: number): ProbeResult {
  const candidates = [...drivers.values()]
    .map((d) => ({ driver: d, score: d.probe(head, tail, size) }))
    .filter((c) => c.score > 0)
    .sort((a, b) => b.score - a.score);
  const confident = candidates.filter((c) => c.driver.name !== 'raw' && c.score >= CONFIDENT);
  if (confident.length > 1) {
    throw new FormatMismatchError(
      `content probes as more than one format (${confident.map((c) => c.driver.name).join(' and ')}); refusing an ambiguous image, name the format with -f`,
      path,
    );
  }
  const best = candidates[0] ?? { driver: getDriver('raw'), score: 1 };
  return {
    driver: best.driver,
    score: best.score,
    candidates: candidates.map((c) => ({ name: c.driver.name, score: c.score })),
  };
}

export interface OpenImageOptions extends OpenOptions {
  /** -f: the format the user claims; checked against the content unless it is raw. */
  format?: string;
}

/** Opens a name with a URI scheme (nbd://..., nbd+unix://...) that a network client registered. */
export type UriOpener = (uri: string, options: OpenImageOptions) => Promise<DiskReader>;

const uriOpeners = new Map<string, UriOpener>();

/** Lets a client outside the disk plane open names like `SCHEME://...` (the disk plane knows no network). */
export function registerUriOpener(scheme: string, opener: UriOpener): void {
  uriOpeners.set(scheme.toLowerCase(), opener);
}

/** The registered opener for a `SCHEME://...` name, if any. */
export function uriOpenerFor(path: string): UriOpener | undefined {
  const m = /^([a-z][a-z0-9+.-]*):\/\//i.exec(path);
  return m ? uriOpeners.get(m[1]!.toLowerCase()) : undefined;
}

/** Opens any supported image, probing its format by content unless one is named. */
export async function openImage(path: string, options: OpenImageOptions = {}): Promise<DiskReader> {
  const uriOpener = uriOpenerFor(path);
  if (uriOpener) return uriOpener(path, options);
  const depth = options.depth ?? 0;
  if (depth > MAX_CHAIN_DEPTH) {
    throw new UnsafeReferenceError(`backing chain is deeper than ${MAX_CHAIN_DEPTH} images (a loop?)`, path);
  }
  let driver: FormatDriver;
  if (options.format) {
    driver = getDriver(options.format);
    if (driver.name !== 'raw') {
      const probed = await probeFile(path);
      if (!probed.candidates.some((c) => c.name === driver.name)) {
        throw new FormatMismatchError(`is not a ${driver.name} image (its content looks like ${probed.driver.name})`, path);
      }
    }
  } else {
    driver = (await probeFile(path)).driver;
  }
  const { format: _format, ...rest } = options;
  const childOptions: OpenOptions = {
    ...rest,
    depth,
    openChild: (childPath, childFormat, childOpts) =>
      openImage(childPath, { ...childOpts, format: childFormat, depth: depth + 1 }),
  };
  return driver.open(path, childOptions);
}
