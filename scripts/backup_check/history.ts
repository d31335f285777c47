/**
 * The history of backup checks: one JSON line per run in
 * `$DATA_DIR/backup-checks.jsonl`, read back by the proxy's `GET /status`.
 */
import { join } from "node:path";

/** The file name under `$DATA_DIR`. */
export const HISTORY_FILE = "backup-checks.jsonl";
/** About three months of nightly runs. */
export const HISTORY_KEEP = 90;

/** One row of the report. */
export interface CheckRow {
  name: string;
  ok: boolean;
  /** The figure or the reason, for people. */
  detail: string;
  ms: number;
}

/** One run of the backup check, as stored and served. */
export interface CheckRecord {
  status: "PASSED" | "FAILED";
  app: string;
  startedAt: string;
  finishedAt: string;
  canaryId: string;
  /** The first failing step, if any. */
  failedStep?: string;
  checks: CheckRow[];
  /** How the report went out: "email", "file", or "undelivered". */
  delivery?: string;
}

/** The path of the history file in `dataDir`. */
export function historyPath(dataDir: string): string {
  return join(dataDir, HISTORY_FILE);
}

/** Appends `record` and keeps the last {@linkcode HISTORY_KEEP} lines (atomic rename). */
export async function appendHistory(dataDir: string, record: CheckRecord): Promise<void> {
  const path = historyPath(dataDir);
  const old = await Deno.readTextFile(path).catch((err) => {
    if (err instanceof Deno.errors.NotFound) return "";
    throw err;
  });
  const lines = old.split("\n").filter((l) => l.trim() !== "");
  lines.push(JSON.stringify(record));
  const kept = lines.slice(-HISTORY_KEEP);
  const tmp = `${path}.tmp-${Deno.pid}`;
  await Deno.writeTextFile(tmp, kept.join("\n") + "\n");
  await Deno.rename(tmp, path);
}

/** The latest record, or undefined when no check has run yet. */
export async function readLatest(dataDir: string): Promise<CheckRecord | undefined> {
  const text = await Deno.readTextFile(historyPath(dataDir)).catch((err) => {
    if (err instanceof Deno.errors.NotFound) return "";
    throw err;
  });
  const last = text.split("\n").filter((l) => l.trim() !== "").at(-1);
  return last ? JSON.parse(last) as CheckRecord : undefined;
}
