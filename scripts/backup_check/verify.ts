/**
 * Checks on a restored denokv file, shared by the nightly check and by
 * point-in-time restore and rollback (`scripts/restore/`): SQLite's own
 * integrity checks and a count of live entries, read-only, in SQL.
 */
// @ts-expect-error: @types/node 20 predates node:sqlite, which Deno 2 provides.
import { DatabaseSync as UntypedDatabase } from "node:sqlite";

/** The part of node:sqlite's DatabaseSync these checks use. */
interface SqliteDatabase {
  prepare(sql: string): { all(): Record<string, unknown>[] };
  close(): void;
}
const DatabaseSync = UntypedDatabase as new (
  path: string,
  opts: { readOnly: boolean },
) => SqliteDatabase;

/** The outcome of {@linkcode checkIntegrity}: `detail` names each pragma and its first answers. */
export interface IntegrityResult {
  ok: boolean;
  detail: string;
}

/** Runs `PRAGMA quick_check` then `PRAGMA integrity_check`; stops at the first that is not "ok". */
export function checkIntegrity(path: string): IntegrityResult {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    const results: string[] = [];
    for (const pragma of ["quick_check", "integrity_check"]) {
      const rows = db.prepare(`PRAGMA ${pragma}`).all();
      const values = rows.map((r) => String(Object.values(r)[0]));
      results.push(`${pragma} ${values.slice(0, 3).join("; ")}`);
      if (values.length !== 1 || values[0] !== "ok") {
        return { ok: false, detail: results.join(", ") };
      }
    }
    return { ok: true, detail: results.join(", ") };
  } finally {
    db.close();
  }
}

/**
 * Counts live (unexpired) entries of a denokv file in SQL: listing them
 * through `Deno.openKv` costs about 90 MB more for 100,000 entries, and
 * opening a file with Deno's KV may migrate its schema, which a file about to
 * be handed to denokv must not undergo. Throws when the file has no `kv`
 * table (not a denokv database).
 */
export function countRestoredEntries(path: string, now = Date.now()): number {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    const [row] = db.prepare(
      `SELECT count(*) AS n FROM kv WHERE expiration_ms < 0 OR expiration_ms > ${now}`,
    ).all();
    return Number(row.n);
  } finally {
    db.close();
  }
}
