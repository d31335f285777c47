/** @jsxImportSource hono/jsx */
/**
 * The operator's console at `/console`: a login form that trades the access
 * token for a session cookie, then server-rendered pages for health, queues,
 * data and usage. Every state change is a POST carrying the session's CSRF
 * token, shown first as a confirmation page. Mounted with
 * `createApp({ extend })` like `/status`.
 */
import type { Context, Hono } from "hono";
import { deleteCookie, getCookie, setCookie } from "hono/cookie";
import { getConnInfo } from "hono/deno";
import { fileURLToPath } from "node:url";
import { type CheckRecord, historyPath } from "../../scripts/backup_check/history.ts";
import type { ProxyMetrics } from "../metrics.ts";
import { Confirm, Layout } from "./layout.tsx";
import { decodeKey, formatKey, parseKeyPrefix } from "./kv_format.ts";
import { DataPage, EntryPage, OverviewPage, UsagePage } from "./pages.tsx";
import { queueList } from "./queue_list.ts";
import { queueRoutes } from "./queue_routes.tsx";
import { csrfMatches, LoginThrottle, type Session, SESSION_COOKIE, Sessions } from "./session.ts";
import { tokenChecker } from "../auth.ts";

export { DEFAULT_QUEUES, parseQueuePrefixes, queueList, type QueueRef } from "./queue_list.ts";
/** Entries per page of the data browser. */
export const PAGE_SIZE = 20;

/** Options for {@linkcode consoleRoutes}. */
export interface ConsoleOptions {
  accessToken: string;
  dataDir: string;
  metrics: ProxyMetrics;
  /** Opens the database the console browses (KV Connect to denokv in the proxy). */
  openKv: () => Promise<Deno.Kv>;
  /** Extra queue prefixes (`QUEUE_PREFIXES`). */
  queuePrefixes?: Deno.KvKey[];
  /** Take the client from Fly's `Fly-Client-IP` (only behind Fly's edge, which sets it). */
  trustFlyClientIp?: boolean;
}

const ASSETS: Record<string, { path: string; type: string }> = {
  "uPlot.iife.min.js": {
    path: fileURLToPath(
      new URL("../../node_modules/uplot/dist/uPlot.iife.min.js", import.meta.url),
    ),
    type: "text/javascript; charset=utf-8",
  },
  "uPlot.min.css": {
    path: fileURLToPath(new URL("../../node_modules/uplot/dist/uPlot.min.css", import.meta.url)),
    type: "text/css; charset=utf-8",
  },
  "charts.js": {
    path: fileURLToPath(new URL("./assets/charts.js", import.meta.url)),
    type: "text/javascript; charset=utf-8",
  },
  "console.css": {
    path: fileURLToPath(new URL("./assets/console.css", import.meta.url)),
    type: "text/css; charset=utf-8",
  },
};

/** Pages may load only their own scripts, styles and forms. */
const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
  "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async function readHistory(dataDir: string): Promise<CheckRecord[]> {
  const text = await Deno.readTextFile(historyPath(dataDir)).catch(() => "");
  const out: CheckRecord[] = [];
  for (const line of text.split("\n")) {
    if (line.trim() === "") continue;
    try {
      out.push(JSON.parse(line));
    } catch { /* a torn line is skipped, not fatal */ }
  }
  return out;
}

function clientOf(c: Context, trustFlyClientIp: boolean): string {
  // Behind Fly every connection comes from the edge, which names the client in
  // Fly-Client-IP; anywhere else that header is whatever the client sent.
  const fly = trustFlyClientIp ? c.req.header("fly-client-ip") : undefined;
  if (fly) return fly;
  try {
    return getConnInfo(c).remote.address ?? "unknown";
  } catch {
    return "unknown";
  }
}

function LoginPage(props: { error?: string }) {
  return (
    <Layout title="Log in">
      {props.error && <p class="error" id="error">{props.error}</p>}
      <form method="post" action="/console/login">
        <label>
          Access token{" "}
          <input type="password" name="token" id="token" autocomplete="current-password" />
        </label>{" "}
        <button type="submit" id="login">Log in</button>
      </form>
      <p class="muted">
        The token is DENO_KV_ACCESS_TOKEN. It is checked once and never stored in the browser.
      </p>
    </Layout>
  );
}

/**
 * Returns a function that mounts the console on an app.
 *
 * @example
 * ```ts
 * import { Hono } from "hono";
 * import { ProxyMetrics } from "../metrics.ts";
 * import { consoleRoutes } from "./mod.tsx";
 * const metrics = new ProxyMetrics({
 *   denokvUrl: "http://127.0.0.1:9",
 *   accessToken: "a-long-enough-token",
 *   dataDir: "/nonexistent",
 *   dbPath: "/nonexistent/denokv.sqlite",
 * });
 * const app = new Hono();
 * consoleRoutes({
 *   accessToken: "a-long-enough-token",
 *   dataDir: "/nonexistent",
 *   metrics,
 *   openKv: () => Deno.openKv(":memory:"),
 * })(app);
 * const res = await app.request("/console/data");
 * if (res.headers.get("location") !== "/console/login") throw new Error("not sent to login");
 * metrics.close();
 * ```
 */
export function consoleRoutes(opts: ConsoleOptions): (app: Hono) => void {
  if (!opts.accessToken) throw new TypeError(`"accessToken" must be a non-empty string`);
  const isToken = tokenChecker(opts.accessToken);
  const sessions = new Sessions();
  const throttle = new LoginThrottle();
  const queues = queueList(opts.queuePrefixes);
  let kv: Promise<Deno.Kv> | undefined;
  const db = () => (kv ??= opts.openKv().catch((err) => {
    kv = undefined;
    throw err;
  }));
  const sessionOf = (c: Context): Session | undefined => sessions.get(getCookie(c, SESSION_COOKIE));

  return (app) => {
    app.use("/console/*", async (c, next) => {
      await next();
      c.header("content-security-policy", CSP);
      c.header("x-content-type-options", "nosniff");
      c.header("referrer-policy", "no-referrer");
      c.header("x-frame-options", "DENY");
      if (!c.res.headers.has("cache-control")) c.header("cache-control", "no-store");
    });

    app.get("/console/assets/:name", async (c) => {
      const asset = ASSETS[c.req.param("name")];
      if (!asset) return c.text("Not found.", 404);
      const body = await Deno.readFile(asset.path);
      return c.body(body, 200, { "content-type": asset.type, "cache-control": "max-age=3600" });
    });

    app.get("/console/login", (c) => {
      if (sessionOf(c)) return c.redirect("/console", 303);
      return c.html(<LoginPage />);
    });

    app.post("/console/login", async (c) => {
      const form = await c.req.parseBody();
      const token = typeof form.token === "string" ? form.token : "";
      const ok = await throttle.attempt(
        clientOf(c, opts.trustFlyClientIp ?? false),
        () => isToken(token),
      );
      if (ok === undefined) {
        return c.html(<LoginPage error="Another login attempt is still running: wait." />, 429);
      }
      if (!ok) return c.html(<LoginPage error="Wrong token." />, 401);
      const session = sessions.create();
      setCookie(c, SESSION_COOKIE, session.id, {
        path: "/console",
        httpOnly: true,
        sameSite: "Strict",
        // Fly's edge terminates TLS and says so; a local http run keeps working.
        secure: c.req.header("x-forwarded-proto") === "https" ||
          new URL(c.req.url).protocol === "https:",
      });
      return c.redirect("/console", 303);
    });

    // Everything else needs a session; every POST also its CSRF token.
    const guard = async (c: Context, next: () => Promise<void>) => {
      if (c.req.path.startsWith("/console/assets/") || c.req.path === "/console/login") {
        return await next();
      }
      const session = sessionOf(c);
      if (!session) {
        if (c.req.method === "GET") return c.redirect("/console/login", 303);
        return c.text("Forbidden: log in first.", 403);
      }
      if (c.req.method === "POST") {
        const form = await c.req.parseBody();
        if (!csrfMatches(session, form._csrf)) {
          return c.text("Forbidden: missing or wrong CSRF token.", 403);
        }
      }
      await next();
    };
    app.use("/console", guard);
    app.use("/console/*", guard);
    app.get("/console", async (c) => {
      const [health, history] = await Promise.all([
        opts.metrics.health(),
        readHistory(opts.dataDir),
      ]);
      return c.html(
        <OverviewPage
          csrf={sessionOf(c)!.csrf}
          health={health}
          history={history}
          usage={opts.metrics.usage(60)}
        />,
      );
    });

    app.get(
      "/console/usage",
      (c) => c.html(<UsagePage csrf={sessionOf(c)!.csrf} usage={opts.metrics.usage(60)} />),
    );

    app.post("/console/logout", (c) => {
      const session = sessionOf(c)!;
      sessions.delete(session.id);
      deleteCookie(c, SESSION_COOKIE, { path: "/console" });
      return c.redirect("/console/login", 303);
    });

    queueRoutes(app, { queues, db, csrfOf: (c) => sessionOf(c)!.csrf });

    app.get("/console/data", async (c) => {
      const csrf = sessionOf(c)!.csrf;
      const prefixText = c.req.query("prefix") ?? "";
      let prefix: Deno.KvKey;
      try {
        prefix = parseKeyPrefix(prefixText);
      } catch (err) {
        return c.html(
          <DataPage
            csrf={csrf}
            prefixText={prefixText}
            entries={[]}
            error={err instanceof Error ? err.message : String(err)}
          />,
          400,
        );
      }
      const iter = (await db()).list({ prefix }, {
        limit: PAGE_SIZE,
        cursor: c.req.query("cursor") || undefined,
      });
      const entries: Deno.KvEntry<unknown>[] = [];
      for await (const e of iter) entries.push(e);
      // A full page may have more after it; the cursor continues from its last key.
      const next = entries.length === PAGE_SIZE ? iter.cursor : undefined;
      return c.html(
        <DataPage
          csrf={csrf}
          prefixText={prefixText}
          entries={entries}
          next={next}
          flash={c.req.query("done")}
        />,
      );
    });

    app.get("/console/data/entry", async (c) => {
      let key: Deno.KvKey;
      try {
        key = decodeKey(c.req.query("key") ?? "");
      } catch (err) {
        return c.text(`Bad request: ${err instanceof Error ? err.message : err}`, 400);
      }
      const entry = await (await db()).get(key);
      return c.html(<EntryPage csrf={sessionOf(c)!.csrf} entry={entry} />);
    });

    app.post("/console/data/delete", async (c) => {
      const csrf = sessionOf(c)!.csrf;
      const form = await c.req.parseBody();
      const param = String(form.key ?? "");
      let key: Deno.KvKey;
      try {
        key = decodeKey(param);
      } catch (err) {
        return c.text(`Bad request: ${err instanceof Error ? err.message : err}`, 400);
      }
      if (form.confirm !== "yes") {
        return c.html(
          <Confirm
            csrf={csrf}
            action="/console/data/delete"
            question={`Delete the key ${formatKey(key)}? This cannot be undone.`}
            fields={{ key: param }}
            back={`/console/data/entry?key=${param}`}
          />,
        );
      }
      await (await db()).delete(key);
      return c.redirect(
        `/console/data?done=${encodeURIComponent(`Deleted ${formatKey(key)}.`)}`,
        303,
      );
    });
  };
}
