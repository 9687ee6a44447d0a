import { flatExtents } from '../../disk/chain.js';
import { checkKnownOptions, parseBoolOption } from '../../disk/options.js';
import type { FormatDriver, MeasureResult } from '../../disk/types.js';
import {
  bitmapSize,
  DEFAULT_BLOCK_SIZE,
  FOOTER_SIZE,
  isFooterCookie,
  newImageGeometry,
  SECTOR,
  VPC_CREATE_OPTIONS,
} from './layout.js';

// Reader, writer and check load when first used (probing needs only the layout).
const writer = () => import('./writer.js');

const MiB = 1024 * 1024;

/** The size Azure accepts for a fixed VHD: the virtual size rounded up to a whole MiB. */
export function azureSize(virtualSize: number): number {
  return Math.ceil(virtualSize / MiB) * MiB;
}

export const vpcDriver: FormatDriver = {
  name: 'vpc',
  aliases: ['vhd'],
  probe(head, tail, size) {
    if (isFooterCookie(head)) return 100;
    // A fixed disk has its footer only at the end (511 bytes long from some old writers).
    if (size >= FOOTER_SIZE && isFooterCookie(tail, tail.length - FOOTER_SIZE)) return 100;
    if (size >= FOOTER_SIZE - 1 && isFooterCookie(tail, tail.length - (FOOTER_SIZE - 1))) return 100;
    return 0;
  },
  open: async (path, options) => (await import('./reader.js')).VpcReader.open(path, options),
  create: async (path, size, options) => (await writer()).VpcWriter.create(path, size, options),
  resume: async (path, size, options, state) => (await writer()).VpcWriter.resume(path, size, options, state),
  createOptions: VPC_CREATE_OPTIONS,
  check: async (path, options) => (await import('./check.js')).checkVpc(path, options),
  async measure(source, virtualSize, options): Promise<MeasureResult> {
    checkKnownOptions('vpc', options.options, VPC_CREATE_OPTIONS);
    parseBoolOption(options.options.force_size, 'force_size', false);
    const size = newImageGeometry(virtualSize, options.options.force_size === 'on').size;
    if (options.options.subformat === 'fixed') return { required: size + FOOTER_SIZE, fullyAllocated: size + FOOTER_SIZE };
    const blocks = Math.ceil(size / DEFAULT_BLOCK_SIZE);
    const meta = 3 * SECTOR + Math.ceil((blocks * 4) / SECTOR) * SECTOR + FOOTER_SIZE;
    const perBlock = DEFAULT_BLOCK_SIZE + bitmapSize(DEFAULT_BLOCK_SIZE);
    let used = 0;
    let lastBlock = -1;
    for await (const e of flatExtents(source, 0, Math.min(virtualSize, source.virtualSize))) {
      if (e.kind !== 'data') continue;
      const first = Math.max(Math.floor(e.offset / DEFAULT_BLOCK_SIZE), lastBlock + 1);
      const last = Math.floor((e.offset + e.length - 1) / DEFAULT_BLOCK_SIZE);
      if (last >= first) used += last - first + 1;
      lastBlock = Math.max(lastBlock, last);
    }
    return { required: meta + used * perBlock, fullyAllocated: meta + blocks * perBlock };
  },
};
