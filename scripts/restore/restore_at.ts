/**
 * Restores the replica's state at a given time into a new file and verifies
 * it with the nightly check's own checks (`scripts/backup_check/verify.ts`).
 * Shared by `deno task restore --at` and `deno task rollback`.
 */
import { dirname, join } from "node:path";
import { restoreReplica } from "../backup_check/replica.ts";
import type { S3Config } from "../backup_check/config.ts";
import { checkIntegrity, countRestoredEntries } from "../backup_check/verify.ts";
import { generationAt, type RestorableRange, restorableRange } from "./replica_range.ts";

/** What {@linkcode restoreAt} needs. */
export interface RestoreAtOptions {
  litestreamBin: string;
  /** The live database path; it only names the replica in Litestream's config. */
  dbPath: string;
  s3: S3Config;
  /** The state to restore. */
  at: Date;
  /** Where the copy goes; must not exist. */
  outPath: string;
  env?: Record<string, string>;
}

/** A restored, verified copy. */
export interface RestoredCopy {
  path: string;
  bytes: number;
  entries: number;
  generation: string;
  integrity: string;
  ms: number;
}

/** Parses `--at`: an ISO 8601 time with a zone (`Z` or `+02:00`), not in the future. */
export function parseAt(raw: string | undefined, now = new Date()): Date {
  if (!raw) throw new Error(`"--at" must be an ISO 8601 time such as 2026-12-03T14:00:00Z`);
  // Without a zone the time would silently be read in the machine's zone.
  if (!/^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:\d\d)$/i.test(raw)) {
    throw new Error(`"--at" must be an ISO 8601 time with a zone (Z or ±hh:mm): got "${raw}"`);
  }
  const at = new Date(raw);
  if (Number.isNaN(at.getTime())) throw new Error(`"--at" is not a valid time: got "${raw}"`);
  if (at > now) {
    throw new Error(`"--at" must not be in the future: got ${raw}, now is ${now.toISOString()}`);
  }
  return at;
}

/** How {@linkcode restoreAt} asks Litestream for the state at a time. */
export interface RestorePlan {
  generation: string;
  /** `-timestamp` for Litestream; absent when the latest state is the state at that time. */
  timestamp?: Date;
}

/**
 * Litestream times are whole seconds, and it refuses a timestamp after a
 * generation's last upload. A time a second or more after the newest upload is
 * the latest state (nothing was replicated since), so it is restored without
 * `-timestamp`; a time inside a generation is passed on. Throws, naming the
 * restorable range, when no generation holds `at`.
 */
export function planRestore(range: RestorableRange, at: Date): RestorePlan {
  const latest = range.generations.at(-1);
  if (latest && at.getTime() >= latest.newest.getTime() + 1000) {
    return { generation: latest.id };
  }
  const generation = generationAt(range, at);
  if (generation) return { generation: generation.id, timestamp: at };
  const held = range.generations.map((g) => `${g.oldest.toISOString()}..${g.newest.toISOString()}`);
  throw new Error(
    `nothing restorable at ${at.toISOString()}: the replica holds ${
      held.length ? held.join(", ") : "no snapshot"
    } (see restore --list)`,
  );
}

/**
 * Restores the state at `at` into `outPath` and verifies it (SQLite quick and
 * integrity checks, a denokv `kv` table, its entries counted). A copy that
 * fails verification is deleted and the call throws.
 */
export async function restoreAt(opts: RestoreAtOptions): Promise<RestoredCopy> {
  const started = performance.now();
  if (await Deno.stat(opts.outPath).then(() => true, () => false)) {
    throw new Error(`"--to" must not exist yet: ${opts.outPath} does`);
  }
  const range = await restorableRange(opts);
  const plan = planRestore(range, opts.at);
  const workDir = await Deno.makeTempDir({ prefix: "restore-at-" });
  try {
    const result = await restoreReplica({
      litestreamBin: opts.litestreamBin,
      dbPath: opts.dbPath,
      outPath: opts.outPath,
      workDir,
      s3: opts.s3,
      env: opts.env,
      timestamp: plan.timestamp,
    });
    if (!result.ok) {
      throw new Error(
        `litestream restore of the state at ${opts.at.toISOString()} failed after ` +
          `${result.attempts} attempt(s): ${result.output.split("\n").slice(-3).join(" | ")}`,
      );
    }
  } finally {
    await Deno.remove(workDir, { recursive: true }).catch(() => {});
  }
  try {
    const integrity = checkIntegrity(opts.outPath);
    if (!integrity.ok) throw new Error(`the restored copy is damaged: ${integrity.detail}`);
    let entries: number;
    try {
      entries = countRestoredEntries(opts.outPath);
    } catch (err) {
      throw new Error(
        `the restored copy is not a denokv database: ${err instanceof Error ? err.message : err}`,
      );
    }
    const { size } = await Deno.stat(opts.outPath);
    return {
      path: opts.outPath,
      bytes: size,
      entries,
      generation: plan.generation,
      integrity: integrity.detail,
      ms: performance.now() - started,
    };
  } catch (err) {
    await removeDatabase(opts.outPath);
    throw err;
  }
}

/** Removes a SQLite file with its -wal and -shm companions. */
export async function removeDatabase(path: string): Promise<void> {
  for (const suffix of ["", "-wal", "-shm"]) {
    await Deno.remove(path + suffix).catch(() => {});
  }
}

/** `<dir of dbPath>/<name>`: files that must be renamed into place live on the same volume. */
export function beside(dbPath: string, name: string): string {
  return join(dirname(dbPath), name);
}

/** A timestamp usable in a file name. */
export function fileStamp(date: Date): string {
  return date.toISOString().replace(/[:.]/g, "-");
}
