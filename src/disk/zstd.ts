import { createRequire } from 'node:module';

type ZstdModule = typeof import('zstd-napi');

let cached: ZstdModule | undefined;

/**
 * zstd-napi, loaded on first use: its native binding costs about 30 ms of start-up, which every
 * command that never meets a zstd cluster would otherwise pay.
 */
export function zstd(): ZstdModule {
  cached ??= createRequire(import.meta.url)('zstd-napi') as ZstdModule;
  return cached;
}
