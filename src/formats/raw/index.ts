import type { FormatDriver } from '../../disk/types.js';
import { RawReader } from './reader.js';
import { RAW_CREATE_OPTIONS, RawWriter } from './writer.js';

export const rawDriver: FormatDriver = {
  name: 'raw',
  aliases: ['img', 'bin'],
  // Anything can be raw; the lowest score so every real format wins.
  probe: () => 1,
  open: (path) => RawReader.open(path),
  create: (path, size, options) => RawWriter.create(path, size, options),
  resume: (path, size, options, state) => RawWriter.resume(path, size, options, state),
  createOptions: RAW_CREATE_OPTIONS,
  measure: async (_source, virtualSize) => ({ required: virtualSize, fullyAllocated: virtualSize }),
};
