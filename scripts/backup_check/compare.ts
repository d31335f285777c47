/**
 * Compares the restored copy with the live database entry by entry inside
 * SQLite: the live file is attached read-only and one join walks the copy's
 * `kv` table, looking each key up in the live one by primary key. Nothing is
 * held in JavaScript, so a million entries cost a scan and SQLite's page
 * cache (about 40 MB and 2 s for 1,000,000 entries, tests/bench/backup_bench.ts),
 * where iterating rows in JavaScript peaked above 110 MB.
 */
// @ts-expect-error: @types/node 20 predates node:sqlite, which Deno 2 provides.
import { DatabaseSync as UntypedDatabase } from "node:sqlite";

/** The part of node:sqlite's DatabaseSync the comparison uses. */
interface SqliteDatabase {
  prepare(sql: string): {
    all(...params: unknown[]): Record<string, unknown>[];
    run(...params: unknown[]): unknown;
  };
  close(): void;
}
const DatabaseSync = UntypedDatabase as new (
  path: string,
  opts: { readOnly: boolean },
) => SqliteDatabase;

/** What the comparison found. */
export interface Comparison {
  /** Unexpired entries in the restored copy. */
  restored: number;
  /** Unexpired entries in the live database. */
  live: number;
  /** Live entries the copy lacks. */
  missing: number;
  /** Entries of the copy the live database no longer has. */
  extra: number;
  /** Keys in both whose versionstamp differs (written since the restore point). */
  changed: number;
}

/** A read-only SQLite URI for `path` (`?`, `#` and `%` would end or escape the path). */
function readOnlyUri(path: string): string {
  return `file:${path.replace(/[%?#]/g, encodeURIComponent)}?mode=ro`;
}

/**
 * Unexpired (`expiration_ms < 0` is "never"); the unary `+` keeps SQLite on
 * the primary key instead of the expiration index.
 */
function alive(table: string): string {
  return `(+${table}.expiration_ms < 0 OR +${table}.expiration_ms > :now)`;
}

/**
 * Counts what differs between the copy and the live database. Entries written
 * between the restore point and now show up as missing or changed: the caller
 * decides how many are tolerable.
 */
export function compareDatabases(
  restoredPath: string,
  livePath: string,
  nowMs = Date.now(),
): Comparison {
  const db = new DatabaseSync(restoredPath, { readOnly: true });
  try {
    db.prepare("ATTACH DATABASE ? AS live").run(readOnlyUri(livePath));
    const [copy] = db.prepare(
      `SELECT count(*) AS restored, count(l.k) AS matched, ` +
        `coalesce(sum(l.k IS NOT NULL AND (r.version <> l.version OR r.seq <> l.seq)), 0) ` +
        `AS changed ` +
        `FROM main.kv r LEFT JOIN live.kv l ON l.k = r.k AND ${alive("l")} ` +
        `WHERE ${alive("r")}`,
    ).all({ now: nowMs });
    const [live] = db.prepare(`SELECT count(*) AS live FROM live.kv l WHERE ${alive("l")}`)
      .all({ now: nowMs });
    const restored = Number(copy.restored);
    const matched = Number(copy.matched);
    return {
      restored,
      live: Number(live.live),
      missing: Number(live.live) - matched,
      extra: restored - matched,
      changed: Number(copy.changed),
    };
  } finally {
    db.close();
  }
}
