/** Reads a VHDX file's fixed structures: identifier, headers, log, region table, metadata. */
import { CorruptImageError, UnsupportedFeatureError } from '../../disk/errors.js';
import { type ByteSource, readExact } from '../../disk/source.js';
import {
  decodeCreator,
  decodeFileParameters,
  decodeHeader,
  decodeMetadataTable,
  decodeParentLocator,
  decodeRegionTable,
  decodeSectorSize,
  decodeVirtualSize,
  type FileParameters,
  type Geometry,
  GUID,
  geometry,
  HEADER_OFFSETS,
  HEADER_SECTION_SIZE,
  HEADER_SIZE,
  hasFileSignature,
  METADATA_TABLE_SIZE,
  type ParentLocator,
  REGION_TABLE_OFFSETS,
  REGION_TABLE_SIZE,
  type RegionEntry,
  readGuid,
  type VhdxHeader,
  ZERO_GUID,
} from './layout.js';
import { OverlaySource, replayLog } from './log.js';

export interface VhdxStructure {
  /** Reads of the file with the log (if any) replayed on top. */
  source: ByteSource;
  creator: string;
  header: VhdxHeader;
  /** Which header (0 or 1) is current. */
  headerIndex: number;
  /** Problems with the header or region table copy that was not used. */
  notes: string[];
  logEntriesReplayed: number;
  regions: RegionEntry[];
  bat: RegionEntry;
  metadata: RegionEntry;
  params: FileParameters;
  logicalSectorSize: number;
  physicalSectorSize: number;
  page83: string | null;
  geometry: Geometry;
  parentLocator: ParentLocator | null;
}

const KNOWN_REGIONS: string[] = [GUID.batRegion, GUID.metadataRegion];
const KNOWN_ITEMS: string[] = [
  GUID.fileParameters,
  GUID.virtualDiskSize,
  GUID.page83,
  GUID.logicalSectorSize,
  GUID.physicalSectorSize,
  GUID.parentLocator,
];

export async function readStructure(file: ByteSource, budget: number): Promise<VhdxStructure> {
  const name = file.name;
  if (file.size < HEADER_SECTION_SIZE) {
    throw new CorruptImageError(`is ${file.size} bytes, shorter than the 1 MiB VHDX header section`, name);
  }
  const id = await readExact(file, 0, 1024, 'file identifier');
  if (!hasFileSignature(id)) throw new CorruptImageError("has no 'vhdxfile' signature: not a VHDX image", name);

  const decoded = await Promise.all(
    HEADER_OFFSETS.map(async (off) => decodeHeader(await readExact(file, off, HEADER_SIZE, 'header'), file.size)),
  );
  const valid = decoded
    .map((h, i) => ({ h, i }))
    .filter((x): x is { h: VhdxHeader; i: number } => typeof x.h !== 'string')
    .sort((a, b) => (a.h.sequence === b.h.sequence ? a.i - b.i : a.h.sequence > b.h.sequence ? -1 : 1));
  if (valid.length === 0) {
    throw new CorruptImageError(`neither VHDX header is valid: header 1 ${decoded[0]}; header 2 ${decoded[1]}`, name);
  }
  const { h: header, i: headerIndex } = valid[0]!;
  const notes: string[] = [];
  decoded.forEach((h, i) => {
    if (typeof h === 'string') notes.push(`header ${i + 1} ${h}`);
  });

  let source: ByteSource = file;
  let logEntriesReplayed = 0;
  if (header.logGuid !== ZERO_GUID) {
    const replay = await replayLog(file, header, budget);
    logEntriesReplayed = replay.entries;
    if (replay.patches.length > 0) source = new OverlaySource(file, replay.patches, replay.size);
  }

  // Region table: the first copy, or the second when the first is damaged.
  const tables = await Promise.all(
    REGION_TABLE_OFFSETS.map(async (off) =>
      decodeRegionTable(await readExact(source, off, REGION_TABLE_SIZE, 'region table'), source.size),
    ),
  );
  const regions = tables.find((t): t is RegionEntry[] => typeof t !== 'string');
  if (!regions) throw new CorruptImageError(`neither region table is valid: table 1 ${tables[0]}; table 2 ${tables[1]}`, name);
  tables.forEach((t, i) => {
    if (typeof t === 'string') notes.push(`region table ${i + 1} ${t}`);
  });
  for (const r of regions) {
    if (r.required && !KNOWN_REGIONS.includes(r.guid)) {
      throw new UnsupportedFeatureError(`requires region ${r.guid}, which vmferry does not know`, name);
    }
  }
  const bat = regions.find((r) => r.guid === GUID.batRegion);
  const metadata = regions.find((r) => r.guid === GUID.metadataRegion);
  if (!bat || !metadata) throw new CorruptImageError(`region table lacks the ${bat ? 'metadata' : 'BAT'} region`, name);
  if (bat.fileOffset < metadata.fileOffset + metadata.length && metadata.fileOffset < bat.fileOffset + bat.length) {
    throw new CorruptImageError('BAT and metadata regions overlap', name);
  }

  const table = await readExact(source, metadata.fileOffset, METADATA_TABLE_SIZE, 'metadata table');
  const entries = decodeMetadataTable(table, metadata.length, name);
  const items = new Map<string, Buffer>();
  for (const e of entries) {
    if (e.isUser) continue;
    if (!KNOWN_ITEMS.includes(e.itemId)) {
      if (e.isRequired)
        throw new UnsupportedFeatureError(`requires metadata item ${e.itemId}, which vmferry does not know`, name);
      continue;
    }
    items.set(e.itemId, await readExact(source, metadata.fileOffset + e.offset, e.length, `metadata item ${e.itemId}`));
  }
  const need = (guid: string, what: string): Buffer => {
    const b = items.get(guid);
    if (!b) throw new CorruptImageError(`metadata lacks the required ${what} item`, name);
    return b;
  };
  const params = decodeFileParameters(need(GUID.fileParameters, 'file parameters'), name);
  const logicalSectorSize = decodeSectorSize(need(GUID.logicalSectorSize, 'logical sector size'), 'logical sector size', name);
  const physicalSectorSize = decodeSectorSize(
    need(GUID.physicalSectorSize, 'physical sector size'),
    'physical sector size',
    name,
  );
  const virtualSize = decodeVirtualSize(need(GUID.virtualDiskSize, 'virtual disk size'), logicalSectorSize, name);
  const p83 = items.get(GUID.page83);
  const page83 = p83 && p83.length >= 16 ? readGuid(p83, 0) : null;
  const g = geometry(virtualSize, params.blockSize, logicalSectorSize, params.hasParent);
  if (g.batEntries * 8 > bat.length) {
    throw new CorruptImageError(
      `BAT region is ${bat.length} bytes, too small for the ${g.batEntries} entries a ${virtualSize}-byte disk needs`,
      name,
    );
  }
  let parentLocator: ParentLocator | null = null;
  if (params.hasParent) {
    parentLocator = decodeParentLocator(need(GUID.parentLocator, 'parent locator'), name);
    if (parentLocator.type !== GUID.vhdxParentLocatorType) {
      throw new UnsupportedFeatureError(`parent locator type ${parentLocator.type} is not the VHDX one`, name);
    }
  }
  return {
    source,
    creator: decodeCreator(id),
    header,
    headerIndex,
    notes,
    logEntriesReplayed,
    regions,
    bat,
    metadata,
    params,
    logicalSectorSize,
    physicalSectorSize,
    page83,
    geometry: g,
    parentLocator,
  };
}
