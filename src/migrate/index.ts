/** The migration pipeline: inspect, map, plan, convert, describe, verify, report, commit. */
export { allocatedBytes, type ContentDigest, contentDigest } from './hash.js';
export { type DiskLook, type Inspection, type InspectOptions, inspectVm, readVm } from './inspect.js';
export {
  type DiskReport,
  type MigrateProgress,
  type MigrateReport,
  type MigrateRequest,
  migrateVm,
  profileFor,
  type StageTime,
} from './migrate.js';
export { humanSummary } from './report.js';
export { removeStaleStaging } from './staging.js';
