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
import { isAbsolute, join, sep } from "node:path";
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
 * sending the write again.
 */
export const DEFAULT_UPSTREAM_WRITE_TIMEOUT_MS = 60_000;
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
  const upstreamOrigin = upstream.origin;
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
    },
    lean,
    options.onUpstreamError,
  );
  // KV Connect is POST only; anything else on these paths is "not found".
  app.post("/", limit, forward);
  app.post("/v2/*", limit, forward);

  app.get("/healthz", async (c) => {
    const problem = await probe(upstreamOrigin, options.accessToken, doFetch, healthTimeoutMs);
    c.header("cache-control", "no-store");
    return problem === null ? c.text("ok\n") : c.text(`denokv unavailable: ${problem}\n`, 503);
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

/** One line per request: method, path (never the query or headers), status, milliseconds. */
function accessLog(log: (line: string) => void): MiddlewareHandler {
  return async (c, next) => {
    const start = performance.now();
    await next();
    const ms = (performance.now() - start).toFixed(1);
    log(`${c.req.method} ${c.req.path} ${c.res.status} ${ms}ms`);
  };
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
  timeouts: { readMs: number; writeMs: number },
  upstream: Upstream | null,
  onUpstreamError: (path: string, timedOut: boolean) => void = () => {},
): (c: Context) => Promise<Response> {
  const unreachable = (c: Context, reason: string) =>
    c.text(`denokv is unreachable, try again: ${reason}`, 503, { "retry-after": "1" });
  return async (c) => {
    const req = c.req.raw;
    // The target goes upstream as the client sent it, never percent-decoded
    // (Hono's c.req.path is decoded: a %0D%0A in it would split the request).
    const url = req.url;
    const target = url.slice(url.indexOf("/", url.indexOf("//") + 2));
    // Every decision below goes by that same raw path, without the query.
    const query = target.indexOf("?");
    const path = query < 0 ? target : target.slice(0, query);
    // The body is read whole (bodyLimit caps it): one write upstream costs far
    // less than a stream, and the timers below start once it is here.
    const body = new Uint8Array(await req.arrayBuffer());
    if (upstream !== null && path !== "/v2/watch") {
      // A read or write takes milliseconds and cannot be undone once sent,
      // so a client going away is not passed on; the timeouts bound it.
      const write = path === "/v2/atomic_write";
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
        if (write && err instanceof UpstreamError && err.sent && err.timedOut) {
          return c.text(
            `denokv did not answer this write within ${timeouts.writeMs} ms: ` +
              `it may or may not have been applied; read before writing again.`,
            408,
          );
        }
        return unreachable(c, err instanceof Error ? err.message : String(err));
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
