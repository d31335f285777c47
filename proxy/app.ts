/**
 * The public HTTP face of the server: a Hono app that forwards KV Connect to
 * denokv (reads and writes over the lean client of `upstream.ts`, the watch
 * as a stream), serves the queue library from `lib/` for `import` by URL,
 * and reports health. It holds no KV logic of its own; `main.ts` reads the
 * environment and serves it.
 */
import { Hono } from "hono";
import type { Context, MiddlewareHandler } from "hono";
import { bodyLimit } from "hono/body-limit";
import { etag } from "hono/etag";
import { HTTPException } from "hono/http-exception";
import { serveStatic } from "hono/serve-static";
import { statfsSync } from "node:fs";
import { isAbsolute, join, sep } from "node:path";
import { requireToken } from "./auth.ts";
import { BodyTimeout, readBodyWithin } from "./body.ts";
import {
  connectionTokens,
  HOP_BY_HOP,
  positiveInteger,
  UnsendableRequest,
  Upstream,
  UpstreamError,
  type UpstreamResponse,
} from "./upstream.ts";

/** A KV Connect atomic write is at most 800 KiB (denokv's limits.rs); leave room for framing. */
export const DEFAULT_MAX_BODY_BYTES = 1024 * 1024;
/** How long a read (or the watch's response headers) may take before the proxy answers 503. */
export const DEFAULT_UPSTREAM_TIMEOUT_MS = 10_000;
/**
 * How long a write may take before the proxy gives up. A write that was sent
 * may still be applied, and the Deno client repeats anything answered 5xx,
 * so this one is answered 408: the client reports an error instead of
 * sending the write again. Well under Fly's 60 s idle timeout, which would
 * otherwise reset the client first (and the client re-sends on a reset).
 */
export const DEFAULT_UPSTREAM_WRITE_TIMEOUT_MS = 20_000;
/**
 * How long a request body may take to arrive once its headers are in. A
 * client that trickles its body would otherwise hold a connection (and the
 * bytes so far) for as long as it likes.
 */
export const DEFAULT_BODY_TIMEOUT_MS = 15_000;
/**
 * Below this much free space on the database's volume writes are refused
 * before they reach denokv: SQLite and Litestream's shadow WAL both need
 * room, and a write refused here is known not to be applied.
 */
export const DEFAULT_MIN_FREE_BYTES = 16 * 1024 * 1024;
/** Status for a write sent to denokv whose answer never came: its fate is unknown. */
export const WRITE_OUTCOME_UNKNOWN = 409;
/** Status for a write refused because the volume is full (known not applied). */
export const VOLUME_FULL = 409;
/** How long `/healthz` waits for denokv. */
export const DEFAULT_HEALTH_TIMEOUT_MS = 2_000;

/** KV answers never allow every origin: a browser page must not read a database. */
const CORS = "access-control-allow-origin";
/** Statuses whose responses carry no body (a `Response` with one throws). */
const NULL_BODY = new Set([101, 103, 204, 205, 304]);

/** Options for {@linkcode createApp}. */
export interface ProxyOptions {
  /** Base URL of denokv, e.g. `http://127.0.0.1:4513`. */
  denokvUrl: string;
  /** Absolute path of the folder served under `/lib/`. */
  libDir: string;
  /** The access token; used only to probe denokv from `/healthz` and to guard `/status`. */
  accessToken: string;
  /** Request bodies larger than this get 413. */
  maxBodyBytes?: number;
  /** Time allowed for denokv's answer to a read, and for the watch's response headers. */
  upstreamTimeoutMs?: number;
  /** Time allowed for denokv's answer to a write (`/v2/atomic_write`). */
  upstreamWriteTimeoutMs?: number;
  /** Time allowed for the `/healthz` probe. */
  healthTimeoutMs?: number;
  /** Time allowed for a request body to arrive once the headers are in. */
  bodyTimeoutMs?: number;
  /**
   * Litestream's metrics URL (`addr` in litestream.yml): `/healthz` is 503
   * while it does not answer, since writes would not be replicated.
   */
  litestreamUrl?: string;
  /** The database's folder: `/healthz` and writes check its free space. */
  dataDir?: string;
  /** Writes are refused below this many free bytes in `dataDir`. */
  minFreeBytes?: number;
  /** Receives one access-log line per request; default: none. */
  log?: (line: string) => void;
  /** The fetch used for the watch stream and `/healthz` (tests swap it). */
  fetch?: typeof fetch;
  /** Extra routes mounted by other parts of the product (e.g. `/status`). */
  extend?: (app: Hono) => void;
  /** Runs first on every request (the metrics of `metrics.ts`). */
  instrument?: MiddlewareHandler;
  /** Told when denokv did not answer a KV Connect request: the raw path, and whether in time. */
  onUpstreamError?: (path: string, timedOut: boolean) => void;
}

/** Builds the proxy app; rejects bad options at construction. */
export function createApp(options: ProxyOptions): Hono {
  let upstream: URL;
  try {
    upstream = new URL(options.denokvUrl);
  } catch {
    throw new TypeError(`"denokvUrl" must be an http(s) URL: got ${options.denokvUrl}`);
  }
  if (upstream.protocol !== "http:" && upstream.protocol !== "https:") {
    throw new TypeError(`"denokvUrl" must be an http(s) URL: got ${options.denokvUrl}`);
  }
  if (!isAbsolute(options.libDir)) {
    throw new TypeError(`"libDir" must be an absolute path: got ${options.libDir}`);
  }
  if (typeof options.accessToken !== "string" || options.accessToken.length === 0) {
    throw new TypeError(`"accessToken" must be a non-empty string`);
  }
  const maxBodyBytes = positiveInteger(
    "maxBodyBytes",
    options.maxBodyBytes,
    DEFAULT_MAX_BODY_BYTES,
  );
  const upstreamTimeoutMs = positiveInteger(
    "upstreamTimeoutMs",
    options.upstreamTimeoutMs,
    DEFAULT_UPSTREAM_TIMEOUT_MS,
  );
  const upstreamWriteTimeoutMs = positiveInteger(
    "upstreamWriteTimeoutMs",
    options.upstreamWriteTimeoutMs,
    DEFAULT_UPSTREAM_WRITE_TIMEOUT_MS,
  );
  const healthTimeoutMs = positiveInteger(
    "healthTimeoutMs",
    options.healthTimeoutMs,
    DEFAULT_HEALTH_TIMEOUT_MS,
  );
  const bodyTimeoutMs = positiveInteger(
    "bodyTimeoutMs",
    options.bodyTimeoutMs,
    DEFAULT_BODY_TIMEOUT_MS,
  );
  const minFreeBytes = positiveInteger(
    "minFreeBytes",
    options.minFreeBytes,
    DEFAULT_MIN_FREE_BYTES,
  );
  const upstreamOrigin = upstream.origin;
  const volume = options.dataDir ? freeSpace(options.dataDir, minFreeBytes) : null;
  const doFetch = options.fetch ?? fetch;
  const log = options.log;

  const app = new Hono();

  if (options.instrument) app.use(options.instrument);
  if (log) app.use(accessLog(log));

  app.onError((err, c) => {
    if (err instanceof HTTPException) return err.getResponse();
    return c.text(`internal error: ${err.message}`, 500);
  });

  app.notFound((c) => c.text("Not found.", 404));

  const tooLarge = (c: Context) =>
    c.text(
      `Request body too large: the limit is ${maxBodyBytes} bytes (a KV Connect write is at most 800 KiB).`,
      413,
    );
  const limit = limitBody(
    maxBodyBytes,
    bodyLimit({ maxSize: maxBodyBytes, onError: tooLarge }),
    tooLarge,
  );

  // The lean client speaks plain HTTP (denokv on loopback); https goes over fetch.
  const lean = upstream.protocol === "http:"
    ? new Upstream(upstream, { timeoutMs: upstreamTimeoutMs })
    : null;
  const forward = forwarder(
    upstreamOrigin,
    doFetch,
    {
      readMs: upstreamTimeoutMs,
      writeMs: upstreamWriteTimeoutMs,
      bodyMs: bodyTimeoutMs,
    },
    lean,
    volume,
    options.onUpstreamError,
  );
  // KV Connect is POST only; anything else on these paths is "not found".
  // The token is checked first, from the headers alone: nobody without it
  // makes the proxy read a body.
  const auth = requireToken({ token: options.accessToken });
  app.post("/", auth, limit, forward);
  app.post("/v2/*", auth, limit, forward);

  app.get("/healthz", async (c) => {
    c.header("cache-control", "no-store");
    const [denokv, litestream] = await Promise.all([
      probe(upstreamOrigin, options.accessToken, doFetch, healthTimeoutMs),
      options.litestreamUrl
        ? probeReplication(options.litestreamUrl, doFetch, healthTimeoutMs)
        : null,
    ]);
    const problems = [
      denokv && `denokv unavailable: ${denokv}`,
      litestream && `replication not running: ${litestream}`,
      volume?.full() && volume.describe(),
    ].filter(Boolean);
    return problems.length === 0 ? c.text("ok\n") : c.text(problems.join("\n") + "\n", 503);
  });

  app.get("/", (c) => c.html(infoPage(new URL(c.req.url))));

  app.use("/lib/*", etag());
  app.get(
    "/lib/*",
    serveStatic({
      root: options.libDir,
      join,
      rewriteRequestPath: (path) => path.slice("/lib".length),
      mimes: {
        ts: "application/typescript; charset=utf-8",
        js: "text/javascript; charset=utf-8",
        md: "text/markdown; charset=utf-8",
      },
      getContent: (path) => readInside(options.libDir, path),
      onFound: (_path, c) => {
        c.header("cache-control", "no-cache");
        c.header("x-content-type-options", "nosniff");
      },
    }),
  );

  options.extend?.(app);
  return app;
}

/**
 * Caps request bodies. A declared length is checked from the header alone:
 * Hono's `bodyLimit` reads `request.body`, and in Deno that turns the body
 * into a JavaScript stream, which made every forwarded request cost ~25 µs
 * more CPU. Bodies without a length go through `bodyLimit`, which counts
 * them as they stream.
 */
function limitBody(
  maxBytes: number,
  streaming: MiddlewareHandler,
  tooLarge: (c: Context) => Response,
): MiddlewareHandler {
  return async (c, next) => {
    const declared = c.req.header("content-length");
    if (declared === undefined || c.req.header("transfer-encoding") !== undefined) {
      return await streaming(c, next);
    }
    if (!/^\d+$/.test(declared) || Number(declared) > maxBytes) return tooLarge(c);
    await next();
  };
}

/**
 * One line per request: method, path as sent (never the query), status,
 * milliseconds and the user agent when there is one. The path is the raw one, not Hono's decoded
 * `c.req.path` (a `%0A` there would start a forged line), and both it and
 * the user agent go through {@linkcode escapeLogText}.
 */
function accessLog(log: (line: string) => void): MiddlewareHandler {
  return async (c, next) => {
    const start = performance.now();
    await next();
    const ms = (performance.now() - start).toFixed(1);
    const url = c.req.url;
    const target = url.slice(url.indexOf("/", url.indexOf("//") + 2));
    const query = target.indexOf("?");
    const path = query < 0 ? target : target.slice(0, query);
    const agent = c.req.header("user-agent");
    log(
      `${escapeLogText(c.req.method)} ${escapeLogText(path)} ${c.res.status} ${ms}ms` +
        (agent ? ` "${escapeLogText(agent)}"` : ""),
    );
  };
}

/**
 * Makes text from a request safe for a one-line log: control characters,
 * DEL, non-ASCII, quotes and backslashes become `\t`, `\n`, `\r` or `\xNN`.
 */
export function escapeLogText(text: string): string {
  // deno-lint-ignore no-control-regex -- matching control characters is the point
  return text.replace(/[\x00-\x1f\x7f-\uffff"\\]/g, (ch) => {
    if (ch === "\t") return "\\t";
    if (ch === "\n") return "\\n";
    if (ch === "\r") return "\\r";
    if (ch === '"' || ch === "\\") return "\\" + ch;
    const code = ch.charCodeAt(0);
    return code < 0x100
      ? `\\x${code.toString(16).padStart(2, "0")}`
      : `\\u${code.toString(16).padStart(4, "0")}`;
  });
}

/**
 * Sends a KV Connect request to denokv. Reads and writes (`snapshot_read`,
 * `atomic_write`, the metadata exchange) go over the lean keep-alive client
 * of `upstream.ts`; the long-lived `/v2/watch` answer goes over `fetch` and is
 * streamed back unbuffered, frame by frame.
 */
function forwarder(
  origin: string,
  doFetch: typeof fetch,
  timeouts: { readMs: number; writeMs: number; bodyMs: number },
  upstream: Upstream | null,
  volume: FreeSpace | null,
  onUpstreamError: (path: string, timedOut: boolean) => void = () => {},
): (c: Context) => Promise<Response> {
  const unreachable = (c: Context, reason: string) =>
    c.text(`denokv is unreachable, try again: ${reason}`, 503, { "retry-after": "1" });
  // The Deno client sends any 5xx again, so a write whose fate is unknown
  // gets a 4xx: the application sees an error and can read before retrying.
  const unknownOutcome = (c: Context, what: string) =>
    c.text(
      `${what}: the write may or may not have been applied; read before writing again.`,
      WRITE_OUTCOME_UNKNOWN,
    );
  return async (c) => {
    const req = c.req.raw;
    // The target goes upstream as the client sent it, never percent-decoded
    // (Hono's c.req.path is decoded: a %0D%0A in it would split the request).
    const url = req.url;
    const target = url.slice(url.indexOf("/", url.indexOf("//") + 2));
    // Every decision below goes by that same raw path, without the query.
    const query = target.indexOf("?");
    const path = query < 0 ? target : target.slice(0, query);
    const write = path === "/v2/atomic_write";
    if (write && volume?.full()) {
      return c.text(`Write refused, not applied: ${volume.describe()}.`, VOLUME_FULL);
    }
    // The body is read whole (bodyLimit caps it, the deadline bounds the
    // wait): one write upstream costs far less than a stream.
    let body: Uint8Array<ArrayBuffer>;
    try {
      body = await readBodyWithin(req, timeouts.bodyMs);
    } catch (err) {
      if (!(err instanceof BodyTimeout)) throw err;
      // Deno's server keeps the connection until the body is in or the
      // client leaves (see closing.ts); the answer at least comes in time.
      return c.text(
        `Request body not received within ${timeouts.bodyMs} ms; nothing was sent to denokv.`,
        408,
        { connection: "close" },
      );
    }
    if (upstream !== null && path !== "/v2/watch") {
      // A read or write takes milliseconds and cannot be undone once sent,
      // so a client going away is not passed on; the timeouts bound it.
      let res: UpstreamResponse;
      try {
        res = await upstream.send({
          method: req.method,
          path: target,
          headers: req.headers,
          body,
          timeoutMs: write ? timeouts.writeMs : timeouts.readMs,
          // A read may be sent again on a fresh connection; a write never is.
          idempotent: path === "/" || path === "/v2/snapshot_read",
        });
      } catch (err) {
        if (err instanceof UnsendableRequest) return c.text(`Bad request: ${err.message}`, 400);
        onUpstreamError(path, err instanceof UpstreamError && err.timedOut);
        if (write && err instanceof UpstreamError && err.sent) {
          return err.timedOut
            ? c.text(
              `denokv did not answer this write within ${timeouts.writeMs} ms: ` +
                `it may or may not have been applied; read before writing again.`,
              408,
            )
            : unknownOutcome(c, `denokv's answer to this write was lost (${err.message})`);
        }
        return unreachable(c, err instanceof Error ? err.message : String(err));
      }
      // A write denokv failed while the volume filled up was rolled back;
      // a 5xx would make the client repeat it for as long as the disk is full.
      if (write && res.status >= 500 && volume?.full(true)) {
        return c.text(`Write refused, not applied: ${volume.describe()}.`, VOLUME_FULL);
      }
      return new Response(NULL_BODY.has(res.status) ? null : res.body, {
        status: res.status,
        headers: res.headers.filter(([name]) => name !== CORS),
      });
    }
    const headers = withoutHopByHop(req.headers);
    headers.delete("host");
    headers.delete("content-length");
    // The timer covers the wait for response headers only; the client's own
    // abort reaches denokv through the same controller at any time.
    const controller = new AbortController();
    const onAbort = () => controller.abort(req.signal.reason);
    req.signal.addEventListener("abort", onAbort, { once: true });
    const timer = setTimeout(
      () => controller.abort(new Error(`no answer within ${timeouts.readMs} ms`)),
      timeouts.readMs,
    );
    let res: Response;
    try {
      res = await doFetch(origin + target, {
        method: req.method,
        headers,
        body,
        signal: controller.signal,
        redirect: "manual",
      });
    } catch (err) {
      req.signal.removeEventListener("abort", onAbort);
      if (!req.signal.aborted) onUpstreamError(path, controller.signal.aborted);
      if (write && !req.signal.aborted) {
        return unknownOutcome(c, `no answer from denokv to this write (${err})`);
      }
      const reason = controller.signal.aborted && !req.signal.aborted
        ? String(controller.signal.reason?.message ?? controller.signal.reason)
        : err instanceof Error
        ? err.message
        : String(err);
      return unreachable(c, reason);
    } finally {
      clearTimeout(timer);
    }
    if (res.body === null) req.signal.removeEventListener("abort", onAbort);
    const out = withoutHopByHop(res.headers);
    out.delete(CORS);
    return new Response(res.body, { status: res.status, statusText: res.statusText, headers: out });
  };
}

/** A copy of `headers` without hop-by-hop headers, including those `Connection` names. */
function withoutHopByHop(headers: Headers): Headers {
  const out = new Headers(headers);
  for (const name of [...connectionTokens(headers.get("connection")), ...HOP_BY_HOP]) {
    out.delete(name);
  }
  return out;
}

/** Free space on the database's volume, re-read at most once a second. */
interface FreeSpace {
  /** True when below the minimum; `fresh` re-reads now. */
  full(fresh?: boolean): boolean;
  /** "the data volume is full: N bytes free at PATH (writes need M)". */
  describe(): string;
}

function freeSpace(dir: string, minFreeBytes: number): FreeSpace {
  let checkedAt = 0;
  let free = Infinity;
  const read = () => {
    try {
      const s = statfsSync(dir);
      free = Number(s.bavail) * Number(s.bsize);
    } catch {
      free = Infinity; // a folder we cannot stat is not reported as full
    }
    checkedAt = Date.now();
  };
  return {
    full(fresh = false) {
      if (fresh || Date.now() - checkedAt > 1_000) read();
      return free < minFreeBytes;
    },
    describe() {
      return `the data volume is full: ${free} bytes free in ${dir} (writes need ${minFreeBytes}); ` +
        `free space or extend the volume (fly volumes extend)`;
    },
  };
}

/** `null` when Litestream's metrics endpoint answered, otherwise the reason. */
async function probeReplication(
  url: string,
  doFetch: typeof fetch,
  timeoutMs: number,
): Promise<string | null> {
  try {
    const res = await doFetch(url, { signal: AbortSignal.timeout(timeoutMs) });
    await res.body?.cancel();
    return res.ok ? null : `Litestream answered ${res.status}`;
  } catch (err) {
    return `Litestream does not answer at ${url}: ${err instanceof Error ? err.message : err}`;
  }
}

/** `null` when denokv answered a real metadata exchange, otherwise the reason. */
async function probe(
  origin: string,
  token: string,
  doFetch: typeof fetch,
  timeoutMs: number,
): Promise<string | null> {
  try {
    const res = await doFetch(origin + "/", {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify({ supportedVersions: [2, 3] }),
      signal: AbortSignal.timeout(timeoutMs),
    });
    await res.body?.cancel();
    return res.ok ? null : `metadata exchange answered ${res.status}`;
  } catch (err) {
    return err instanceof Error ? err.message : String(err);
  }
}

/**
 * Opens `path` only when its real location (symlinks resolved) is a regular
 * file inside the real `libDir`; anything else is "not found".
 */
async function readInside(
  libDir: string,
  path: string,
): Promise<ReadableStream<Uint8Array> | null> {
  try {
    const [root, real] = await Promise.all([Deno.realPath(libDir), Deno.realPath(path)]);
    if (!real.startsWith(root + sep)) return null;
    const info = await Deno.stat(real);
    if (!info.isFile) return null;
    return (await Deno.open(real, { read: true })).readable;
  } catch {
    return null;
  }
}

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (ch) => `&#${ch.charCodeAt(0)};`);
}

function infoPage(url: URL): string {
  const origin = escapeHtml(url.origin);
  const host = escapeHtml(url.host);
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Deno KV server</title></head>
<body>
<h1>Deno KV server</h1>
<p>This is a self-hosted <a href="https://docs.deno.com/deploy/kv/">Deno KV</a> server
(denokv on Fly). Connect from any Deno program with the KV Connect protocol:</p>
<pre>export DENO_KV_ACCESS_TOKEN=&lt;your token&gt;
const kv = await Deno.openKv("${origin}");</pre>
<p>Run with <code>--unstable-kv</code> (and <code>--allow-net</code>,
<code>--allow-env=DENO_KV_ACCESS_TOKEN</code>).</p>
<p>Queues: import the library from this server, which needs
<code>--allow-import=${host}</code> in Deno 2:</p>
<pre>import { withQueues } from "${origin}/lib/kv_queue.ts";
const kv = withQueues(await Deno.openKv("${origin}"));</pre>
<p>Health: <a href="/healthz">/healthz</a></p>
</body></html>
`;
}
