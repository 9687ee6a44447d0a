import { getDriver, probeFile } from '../disk/registry.js';
import type { CheckResult, OpenOptions } from '../disk/types.js';

export interface CheckRequest extends OpenOptions {
  path: string;
  format?: string;
  repair?: 'leaks' | 'all';
}

/** null when the format has no consistency checks (qemu-img exits 63 then). */
export async function checkImage(req: CheckRequest): Promise<CheckResult | null> {
  const driver = req.format ? getDriver(req.format) : (await probeFile(req.path)).driver;
  if (!driver.check) return null;
  const { path, format: _f, ...options } = req;
  return driver.check(path, options);
}

/** qemu-img check's exit status: 0 clean, 2 corruptions, 3 leaks only. */
export function checkExitCode(r: CheckResult): number {
  if (r.checkErrors > 0) return 1;
  if (r.corruptions > 0) return 2;
  if (r.leaks > 0) return 3;
  return 0;
}
