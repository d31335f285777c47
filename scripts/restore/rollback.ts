/**
 * `deno task rollback --at <ISO time>`, run on the machine (`fly ssh console`):
 * checks the volume has room for a second copy, restores the state at that
 * time beside the live file and verifies it, then stops denokv (and its
 * Litestream) through supervisorctl, keeps the live file in a
 * `before-rollback-<time>/` folder, swaps the copy in and starts denokv again.
 * Litestream then replicates the rolled-back database as a new generation.
 */
import { parseArgs } from "node:util";
import { statfs } from "node:fs/promises";
import { basename, dirname, join } from "node:path";
import { type BackupCheckConfig, loadConfig } from "../backup_check/config.ts";
import { beside, fileStamp, parseAt, removeDatabase, restoreAt } from "./restore_at.ts";

const USAGE = "usage: deno task rollback --at <ISO time>";
/** Room kept free beyond the copy itself: SQLite and Litestream write beside it. */
export const ROOM_MARGIN_BYTES = 16 * 1024 * 1024;
/** The copy may be a little larger than the live file (deleted rows since, no vacuum). */
export const ROOM_FACTOR = 1.1;
/** How long denokv may take to answer after `supervisorctl start`. */
const START_TIMEOUT_MS = 120_000;

/** The rollback's configuration: the backup check's plus supervisord's. */
export interface RollbackConfig extends BackupCheckConfig {
  /** The supervisord.conf whose control socket supervisorctl uses. */
  supervisorConf: string;
  supervisorctlBin: string;
  /** supervisord's program that runs Litestream and denokv. */
  program: string;
}

/** Reads the environment once (DESIGN.md's table, plus `SUPERVISOR_CONF`). */
export function loadRollbackConfig(env: Record<string, string | undefined>): RollbackConfig {
  const base = loadConfig(env);
  const appDir = env.APP_DIR || "/app";
  return {
    ...base,
    supervisorConf: env.SUPERVISOR_CONF || join(appDir, "supervisord.conf"),
    supervisorctlBin: env.SUPERVISORCTL_BIN || "supervisorctl",
    program: "denokv",
  };
}

/** Bytes the volume must have free before anything is stopped. */
export function roomNeeded(liveBytes: number): number {
  return Math.ceil(liveBytes * ROOM_FACTOR) + ROOM_MARGIN_BYTES;
}

async function sizeOf(path: string): Promise<number> {
  return await Deno.stat(path).then((s) => s.size, () => 0);
}

/** Throws, with the figures, when the volume of `dbPath` cannot hold a second copy. */
export async function checkRoom(dbPath: string): Promise<string> {
  const live = (await sizeOf(dbPath)) + (await sizeOf(`${dbPath}-wal`));
  const fs = await statfs(dirname(dbPath));
  const free = Number(fs.bavail) * Number(fs.bsize);
  const need = roomNeeded(live);
  const mb = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MB`;
  if (free < need) {
    throw new Error(
      `not enough room on ${dirname(dbPath)} for a second copy: ${mb(free)} free, ` +
        `${mb(need)} needed (live database ${mb(live)}); nothing was stopped`,
    );
  }
  return `${mb(free)} free, ${mb(need)} needed`;
}

async function supervisorctl(config: RollbackConfig, action: "stop" | "start"): Promise<void> {
  const out = await new Deno.Command(config.supervisorctlBin, {
    args: ["-c", config.supervisorConf, action, config.program],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  // supervisorctl 4 exits non-zero on failure; "ERROR" covers older releases.
  if (!out.success || /ERROR/.test(text)) {
    throw new Error(`supervisorctl ${action} ${config.program} failed: ${text.trim()}`);
  }
}

/** True when denokv answers a KV Connect metadata exchange. */
async function denokvAnswers(config: RollbackConfig): Promise<boolean> {
  try {
    const res = await fetch(new URL("/", config.denokvUrl), {
      method: "POST",
      headers: {
        authorization: `Bearer ${config.accessToken}`,
        "content-type": "application/json",
      },
      body: JSON.stringify({ supportedVersions: [2, 3] }),
      signal: AbortSignal.timeout(2_000),
    });
    await res.body?.cancel();
    return res.ok;
  } catch {
    return false;
  }
}

async function waitForDenokv(config: RollbackConfig): Promise<void> {
  const deadline = Date.now() + START_TIMEOUT_MS;
  while (!(await denokvAnswers(config))) {
    if (Date.now() > deadline) {
      throw new Error(`denokv did not answer on ${config.denokvUrl} within ${START_TIMEOUT_MS} ms`);
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

/** The files that make up the live database and its Litestream state. */
function liveFiles(dbPath: string): string[] {
  const name = basename(dbPath);
  return [dbPath, `${dbPath}-wal`, `${dbPath}-shm`, beside(dbPath, `.${name}-litestream`)];
}

/** The outcome of a rollback. */
export interface RollbackResult {
  keptDir: string;
  entries: number;
  generation: string;
}

/** Runs the rollback; `log` receives progress lines. */
export async function rollback(
  config: RollbackConfig,
  at: Date,
  log: (line: string) => void = () => {},
): Promise<RollbackResult> {
  if (!(await Deno.stat(config.dbPath).then((s) => s.isFile, () => false))) {
    throw new Error(`no live database at ${config.dbPath}: nothing to roll back`);
  }
  log(`room: ${await checkRoom(config.dbPath)}`);
  const stamp = fileStamp(new Date());
  const copyPath = beside(config.dbPath, `${basename(config.dbPath)}.rollback-${stamp}`);
  const keptDir = beside(config.dbPath, `before-rollback-${stamp}`);
  // Restoring while denokv still serves keeps the downtime to the swap itself.
  const copy = await restoreAt({
    litestreamBin: config.litestreamBin,
    dbPath: config.dbPath,
    s3: config.s3,
    at,
    outPath: copyPath,
  });
  log(`restored and verified: ${copy.entries} entries, ${copy.integrity}`);
  const stopAt = performance.now();
  try {
    await supervisorctl(config, "stop");
  } catch (err) {
    await removeDatabase(copyPath);
    throw err;
  }
  log(`stopped ${config.program}`);
  await Deno.mkdir(keptDir);
  const moved: [string, string][] = [];
  try {
    for (const path of liveFiles(config.dbPath)) {
      if (!(await Deno.stat(path).then(() => true, () => false))) continue;
      const to = join(keptDir, basename(path));
      await Deno.rename(path, to);
      moved.push([path, to]);
    }
    await Deno.rename(copyPath, config.dbPath);
  } catch (err) {
    // Put the live files back so the start below serves what was there.
    for (const [from, to] of moved.reverse()) await Deno.rename(to, from).catch(() => {});
    await supervisorctl(config, "start").catch(() => {});
    throw new Error(
      `swap failed, the previous database is back in place: ${
        err instanceof Error ? err.message : err
      }`,
    );
  }
  log(`swapped in; the previous database is kept in ${keptDir}`);
  await supervisorctl(config, "start");
  await waitForDenokv(config);
  const down = ((performance.now() - stopAt) / 1000).toFixed(1);
  log(`started ${config.program}; denokv answers again ${down} s after the stop began`);
  return { keptDir, entries: copy.entries, generation: copy.generation };
}

/** Runs the command; returns the exit code. */
export async function main(
  args: string[],
  env: Record<string, string | undefined>,
): Promise<number> {
  let at: Date;
  let config: RollbackConfig;
  try {
    const { values } = parseArgs({ args, options: { at: { type: "string" } } });
    at = parseAt(values.at);
    config = loadRollbackConfig(env);
  } catch (err) {
    console.error(`rollback: ${err instanceof Error ? err.message : err}\n${USAGE}`);
    return 2;
  }
  try {
    const result = await rollback(config, at, (line) => console.error(`rollback: ${line}`));
    console.log(
      `rolled back to ${at.toISOString()} (generation ${result.generation}, ` +
        `${result.entries} entries). The previous database is kept in ${result.keptDir}; ` +
        `delete it with rm -r once you no longer need it.`,
    );
    return 0;
  } catch (err) {
    console.error(`rollback: ${err instanceof Error ? err.message : err}`);
    return 1;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args, Deno.env.toObject()));
}
