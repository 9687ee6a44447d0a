import { flatExtents } from '../../disk/chain.js';
import { checkKnownOptions, parseBoolOption } from '../../disk/options.js';
import type { FormatDriver, MeasureResult } from '../../disk/types.js';
import { DATA_ALIGN, DEFAULT_BLOCK_SIZE, HEADER_AREA, isVdi, VDI_CREATE_OPTIONS } from './layout.js';

// Reader, writer and check load when first used (probing needs only the layout).
const writer = () => import('./writer.js');

export const vdiDriver: FormatDriver = {
  name: 'vdi',
  probe: (head) => (isVdi(head) ? 100 : 0),
  open: async (path, options) => (await import('./reader.js')).VdiReader.open(path, options),
  create: async (path, size, options) => (await writer()).VdiWriter.create(path, size, options),
  resume: async (path, size, options, state) => (await writer()).VdiWriter.resume(path, size, options, state),
  createOptions: VDI_CREATE_OPTIONS,
  check: async (path, options) => (await import('./check.js')).checkVdi(path, options),
  async measure(source, virtualSize, options): Promise<MeasureResult> {
    checkKnownOptions('vdi', options.options, VDI_CREATE_OPTIONS);
    const isStatic = parseBoolOption(options.options.static, 'static', false);
    const blocks = Math.ceil(virtualSize / DEFAULT_BLOCK_SIZE);
    const meta = Math.ceil((HEADER_AREA + blocks * 4) / DATA_ALIGN) * DATA_ALIGN;
    const full = meta + blocks * DEFAULT_BLOCK_SIZE;
    if (isStatic) return { required: full, fullyAllocated: full };
    let used = 0;
    let lastBlock = -1;
    for await (const e of flatExtents(source, 0, Math.min(virtualSize, source.virtualSize))) {
      if (e.kind !== 'data') continue;
      const first = Math.max(Math.floor(e.offset / DEFAULT_BLOCK_SIZE), lastBlock + 1);
      const last = Math.floor((e.offset + e.length - 1) / DEFAULT_BLOCK_SIZE);
      if (last >= first) used += last - first + 1;
      lastBlock = Math.max(lastBlock, last);
    }
    return { required: meta + used * DEFAULT_BLOCK_SIZE, fullyAllocated: full };
  },
};
