/**
 * `GET /status`: the latest nightly backup check (the last line of
 * `$DATA_DIR/backup-checks.jsonl`) and its age, behind the access token.
 * Mounted through `createApp({ extend: statusRoutes(...) })`.
 */
import type { Hono } from "hono";
import { requireToken } from "./auth.ts";
import { readLatest } from "../scripts/backup_check/history.ts";

/** Options for {@linkcode statusRoutes}. */
export interface StatusOptions {
  /** The folder holding `backup-checks.jsonl`. */
  dataDir: string;
  /** The token clients must send as `Authorization: Bearer <token>`. */
  accessToken: string;
}

/**
 * Returns a function that adds `GET /status` to an app.
 *
 * @example
 * ```ts
 * import { Hono } from "hono";
 * import { statusRoutes } from "./status.ts";
 * const app = new Hono();
 * statusRoutes({ dataDir: "/nonexistent", accessToken: "a-long-enough-token" })(app);
 * const res = await app.request("/status");
 * if (res.status !== 401) throw new Error(`expected 401, got ${res.status}`);
 * ```
 */
export function statusRoutes(opts: StatusOptions): (app: Hono) => void {
  if (!opts.dataDir) throw new TypeError(`"dataDir" must be a folder path: got ${opts.dataDir}`);
  if (!opts.accessToken) {
    throw new TypeError(`"accessToken" must be a non-empty string: got ${opts.accessToken}`);
  }
  const { dataDir, accessToken } = opts;
  return (app) => {
    app.get("/status", requireToken({ token: accessToken }), async (c) => {
      const latest = await readLatest(dataDir);
      if (!latest) {
        return c.json({ error: "no backup check has run yet", backupCheck: null }, 404);
      }
      const finished = Date.parse(latest.finishedAt);
      const ageSeconds = Number.isFinite(finished)
        ? Math.max(0, Math.round((Date.now() - finished) / 1000))
        : null;
      c.header("Cache-Control", "no-store");
      return c.json({ backupCheck: latest, ageSeconds });
    });
  };
}
