/**
 * The nightly backup check (`deno task backup-check`, run by the crontab): it
 * writes a canary through KV Connect, waits for Litestream to replicate it,
 * restores the replica into a temp directory, verifies the copy, e-mails the
 * result and records it for `GET /status`. Exit 0 PASSED, 1 FAILED, 2 when the
 * report could not be delivered (it is then saved under `$DATA_DIR/reports/`).
 */
import { join } from "node:path";
import { type BackupCheckConfig, loadConfig } from "./config.ts";
import { appendHistory, type CheckRecord, type CheckRow } from "./history.ts";
import {
  dataKeys,
  listReplica,
  replicaHealth,
  restoreReplica,
  s3Client,
  waitForUpload,
} from "./replica.ts";
import { renderReport, saveReport, sendReport } from "./report.ts";
import { checkIntegrity, countRestoredEntries } from "./verify.ts";
import { compareDatabases } from "./compare.ts";

/** Writes through denokv get this long before the check gives up on the server. */
const KV_TIMEOUT_MS = 15_000;
/** Entries written or deleted between the restore point and the comparison are tolerated up to this... */
const COUNT_TOLERANCE_MIN = 100;
/** ...or this share of the live count, whichever is larger. */
const COUNT_TOLERANCE_SHARE = 0.01;
/** The heartbeat must not hold the check up. */
const HEARTBEAT_TIMEOUT_MS = 10_000;

/** The one key the check writes; overwritten every night so the database does not grow. */
export function canaryKey(): Deno.KvKey {
  return ["__backup_check", "canary"];
}

/** What the canary stores. */
export interface Canary {
  id: string;
  writtenAt: string;
}

/** Exit codes of the check. */
export const EXIT_PASSED = 0;
export const EXIT_FAILED = 1;
export const EXIT_UNDELIVERED = 2;

/** `promise`, or a rejection naming `what` once `ms` have passed. */
export function withTimeout<T>(what: string, ms: number, promise: Promise<T>): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} timed out after ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function message(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

function age(from: Date | undefined, now: Date): string {
  if (!from) return "none";
  const s = Math.max(0, (now.getTime() - from.getTime()) / 1000);
  if (s < 120) return `${s.toFixed(0)} s`;
  if (s < 7200) return `${(s / 60).toFixed(0)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function megabytes(bytes: number): string {
  return `${(bytes / 1024 / 1024).toFixed(2)} MB`;
}

/** Runs one step, timing it and turning a throw into a failed row. */
async function step(
  rows: CheckRow[],
  name: string,
  run: () => Promise<{ ok: boolean; detail: string }>,
): Promise<boolean> {
  const started = performance.now();
  let result: { ok: boolean; detail: string };
  try {
    result = await run();
  } catch (err) {
    result = { ok: false, detail: message(err) };
  }
  rows.push({ name, ...result, ms: Math.round(performance.now() - started) });
  return result.ok;
}

/** Options for {@linkcode runBackupCheck}. */
export interface RunOptions {
  /** Progress lines; default: none. */
  log?: (line: string) => void;
  /** Environment passed to litestream (PATH and the like). */
  env?: Record<string, string>;
}

/**
 * Runs every step and returns the record; delivery is left to the caller.
 * Steps after a failure still run where they can, so the report says as much
 * as is known.
 */
export async function runBackupCheck(
  config: BackupCheckConfig,
  opts: RunOptions = {},
): Promise<CheckRecord> {
  const log = opts.log ?? (() => {});
  const startedAt = new Date();
  const rows: CheckRow[] = [];
  const client = s3Client(config.s3);
  const canary: Canary = { id: crypto.randomUUID(), writtenAt: "" };
  let live: Deno.Kv | undefined;
  const workDir = await Deno.makeTempDir({ prefix: "backup-check-" });
  const restoredPath = join(workDir, "restored.sqlite");
  try {
    log(`canary ${canary.id}`);
    await step(rows, "canary", async () => {
      const listed = await listReplica(client, config.s3);
      const before = dataKeys(listed);
      // The canary makes the replica fresh; its age before the canary says whether it was idle.
      const ageBefore = age(replicaHealth(listed).newestObjectAt, new Date());
      // Deno's remote KV client takes its token from the environment only.
      Deno.env.set("DENO_KV_ACCESS_TOKEN", config.accessToken);
      live = await Deno.openKv(config.denokvUrl);
      const since = new Date();
      canary.writtenAt = since.toISOString();
      const res = await withTimeout(
        `writing the canary to ${config.denokvUrl}`,
        KV_TIMEOUT_MS,
        live.set(canaryKey(), canary),
      );
      if (!res.ok) return { ok: false, detail: `denokv refused the canary ${canary.id}` };
      const seconds = (config.canaryTimeoutMs / 1000).toFixed(0);
      const upload = await waitForUpload(client, config.s3, {
        before,
        since,
        timeoutMs: config.canaryTimeoutMs,
      });
      if (!upload) {
        return {
          ok: false,
          detail: `canary ${canary.id} did not reach the replica within ${seconds} s ` +
            `(nothing new under s3://${config.s3.bucket}/${config.s3.replicaPath}/: ` +
            `is Litestream replicating?)`,
        };
      }
      const waited = ((Date.now() - since.getTime()) / 1000).toFixed(1);
      return {
        ok: true,
        detail: `canary ${canary.id} written, replica caught up after ${waited} s ` +
          `(replica age before the canary: ${ageBefore})`,
      };
    });

    log("restore");
    const restored = await step(rows, "restore", async () => {
      const result = await restoreReplica({
        litestreamBin: config.litestreamBin,
        dbPath: config.dbPath,
        outPath: restoredPath,
        workDir,
        s3: config.s3,
        env: opts.env,
      });
      const took = `${(result.ms / 1000).toFixed(2)} s`;
      if (!result.ok) {
        return {
          ok: false,
          detail: `litestream restore failed after ${result.attempts} attempt(s) in ${took}: ` +
            result.output.split("\n").slice(-3).join(" | "),
        };
      }
      const { size } = await Deno.stat(restoredPath);
      return {
        ok: true,
        detail: `restored ${megabytes(size)} in ${took} (attempt ${result.attempts})`,
      };
    });

    log("integrity");
    await step(rows, "integrity", () => {
      if (!restored) return Promise.resolve({ ok: false, detail: "skipped: nothing restored" });
      return Promise.resolve(checkIntegrity(restoredPath));
    });

    log("contents");
    await step(rows, "contents", async () => {
      if (!restored) return { ok: false, detail: "skipped: nothing restored" };
      const copy = await Deno.openKv(restoredPath);
      let found: Deno.KvEntryMaybe<Canary>;
      try {
        found = await copy.get<Canary>(canaryKey());
      } finally {
        copy.close();
      }
      if (found.value?.id !== canary.id) {
        return {
          ok: false,
          detail: `canary ${canary.id} missing from the restored copy (found ${
            found.value ? `canary ${found.value.id} of ${found.value.writtenAt}` : "no canary"
          }); ${countRestoredEntries(restoredPath)} entries`,
        };
      }
      // Every entry, compared inside SQLite: a million cost a scan, not a million objects.
      const diff = compareDatabases(restoredPath, config.dbPath);
      const tolerance = Math.max(COUNT_TOLERANCE_MIN, Math.ceil(diff.live * COUNT_TOLERANCE_SHARE));
      const differing = diff.missing + diff.extra + diff.changed;
      return {
        ok: differing <= tolerance,
        detail:
          `canary ${canary.id} present; ${diff.restored} entries restored, ${diff.live} live; ` +
          `${diff.missing} missing, ${diff.extra} extra, ${diff.changed} changed since ` +
          `(tolerance ${tolerance})`,
      };
    });

    log("replica");
    await step(rows, "replica", async () => {
      const health = replicaHealth(await listReplica(client, config.s3));
      const now = new Date();
      const detail = `replica age ${age(health.newestObjectAt, now)} (newest object), ` +
        `${health.generations} generation(s), latest snapshot ${
          age(health.latestSnapshotAt, now)
        } old, ${health.objects} objects, ${megabytes(health.totalBytes)}`;
      const ok = health.objects > 0 && health.generations > 0 &&
        health.latestSnapshotAt !== undefined;
      return { ok, detail: ok ? detail : `no usable replica: ${detail}` };
    });
  } finally {
    live?.close();
    client.destroy();
    await Deno.remove(workDir, { recursive: true }).catch(() => {});
  }
  const failed = rows.find((r) => !r.ok);
  return {
    status: failed ? "FAILED" : "PASSED",
    app: config.appName,
    startedAt: startedAt.toISOString(),
    finishedAt: new Date().toISOString(),
    canaryId: canary.id,
    failedStep: failed?.name,
    checks: rows,
  };
}

/** Pings the dead-man's switch; a failed ping is reported, never fatal. */
async function heartbeat(url: string): Promise<string | undefined> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(HEARTBEAT_TIMEOUT_MS) });
    await res.body?.cancel();
    return res.ok ? undefined : `heartbeat ${url} answered ${res.status}`;
  } catch (err) {
    return `heartbeat ${url} failed: ${message(err)}`;
  }
}

/** Runs the check, delivers the report, records the history; returns the exit code. */
export async function main(env: Record<string, string | undefined>): Promise<number> {
  let config: BackupCheckConfig;
  try {
    config = loadConfig(env);
  } catch (err) {
    console.error(`backup check: bad configuration: ${message(err)}`);
    return EXIT_FAILED;
  }
  const record = await runBackupCheck(config, {
    log: (line) => console.error(`backup check: ${line}`),
  });
  const report = renderReport(record);
  let code = record.status === "PASSED" ? EXIT_PASSED : EXIT_FAILED;
  if (config.smtp) {
    try {
      await sendReport(config.smtp, report);
      record.delivery = "email";
    } catch (err) {
      const path = await saveReport(config.dataDir, record, report);
      console.error(
        `backup check: could not e-mail the report via ${config.smtp.host}:${config.smtp.port}: ` +
          `${message(err)}; saved to ${path}`,
      );
      record.delivery = "undelivered";
      code = EXIT_UNDELIVERED;
    }
  } else {
    const path = await saveReport(config.dataDir, record, report);
    console.log(`Subject: ${report.subject}\n\n${report.text}`);
    console.error(`backup check: no SMTP_HOST; report saved to ${path}`);
    record.delivery = "file";
  }
  await appendHistory(config.dataDir, record);
  if (record.status === "PASSED" && config.heartbeatUrl) {
    const problem = await heartbeat(config.heartbeatUrl);
    if (problem) console.error(`backup check: ${problem}`);
  }
  console.error(
    `backup check: ${record.status}${record.failedStep ? ` at ${record.failedStep}` : ""}`,
  );
  return code;
}

if (import.meta.main) {
  Deno.exit(await main(Deno.env.toObject()));
}
