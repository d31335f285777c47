/**
 * The public HTTP face of the server: a Hono app that forwards KV Connect to
 * denokv as streams, serves the queue library from `lib/` for `import` by URL,
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

/** A KV Connect atomic write is at most 800 KiB (denokv's limits.rs); leave room for framing. */
export const DEFAULT_MAX_BODY_BYTES = 1024 * 1024;
/** How long to wait for denokv's response headers before answering 503. */
export const DEFAULT_UPSTREAM_TIMEOUT_MS = 10_000;
/** How long `/healthz` waits for denokv. */
export const DEFAULT_HEALTH_TIMEOUT_MS = 2_000;

/** Headers that describe one hop only (RFC 9110 section 7.6.1) and must not be forwarded. */
const HOP_BY_HOP = [
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
];

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
  /** Time allowed for denokv's response headers. */
  upstreamTimeoutMs?: number;
  /** Time allowed for the `/healthz` probe. */
  healthTimeoutMs?: number;
  /** Receives one access-log line per request; default: none. */
  log?: (line: string) => void;
  /** The fetch used to reach denokv (tests and benchmarks swap it). */
  fetch?: typeof fetch;
  /** Extra routes mounted by other parts of the product (e.g. `/status`). */
  extend?: (app: Hono) => void;
}

function positiveInteger(name: string, value: number | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value <= 0) {
    throw new RangeError(`"${name}" must be a positive integer: got ${value}`);
  }
  return value;
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
  const healthTimeoutMs = positiveInteger(
    "healthTimeoutMs",
    options.healthTimeoutMs,
    DEFAULT_HEALTH_TIMEOUT_MS,
  );
  const upstreamOrigin = upstream.origin;
  const doFetch = options.fetch ?? fetch;
  const log = options.log;

  const app = new Hono();

  if (log) app.use(accessLog(log));

  app.onError((err, c) => {
    if (err instanceof HTTPException) return err.getResponse();
    return c.text(`internal error: ${err.message}`, 500);
  });

  app.notFound((c) => c.text("Not found.", 404));

  const limit = bodyLimit({
    maxSize: maxBodyBytes,
    onError: (c) =>
      c.text(
        `Request body too large: the limit is ${maxBodyBytes} bytes (a KV Connect write is at most 800 KiB).`,
        413,
      ),
  });

  const forward = forwarder(upstreamOrigin, doFetch, upstreamTimeoutMs);
  app.post("/", limit, forward);
  app.all("/v2/*", limit, forward);

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
 * Sends a KV Connect request to denokv and streams its answer back unbuffered,
 * so the long-lived `/v2/watch` stream passes through frame by frame.
 */
function forwarder(
  origin: string,
  doFetch: typeof fetch,
  timeoutMs: number,
): (c: Context) => Promise<Response> {
  return async (c) => {
    const req = c.req.raw;
    const url = new URL(req.url);
    const headers = withoutHopByHop(req.headers);
    headers.delete("host");
    headers.delete("content-length");
    // Bodies with a known length (bodyLimit has capped it) are read whole: one
    // write upstream with a content-length costs far less than a chunked
    // stream. Bodies of unknown length stay streams.
    const body = req.headers.has("content-length") ? await req.arrayBuffer() : req.body;

    // The timer covers the wait for response headers only; the client's own
    // abort reaches denokv through the same controller at any time.
    const controller = new AbortController();
    const onAbort = () => controller.abort(req.signal.reason);
    req.signal.addEventListener("abort", onAbort, { once: true });
    const timer = setTimeout(
      () => controller.abort(new Error(`no answer within ${timeoutMs} ms`)),
      timeoutMs,
    );
    let res: Response;
    try {
      res = await doFetch(origin + url.pathname + url.search, {
        method: req.method,
        headers,
        body,
        signal: controller.signal,
        redirect: "manual",
      });
    } catch (err) {
      req.signal.removeEventListener("abort", onAbort);
      const reason = controller.signal.aborted && !req.signal.aborted
        ? String(controller.signal.reason?.message ?? controller.signal.reason)
        : err instanceof Error
        ? err.message
        : String(err);
      return c.text(`denokv is unreachable, try again: ${reason}`, 503, {
        "retry-after": "1",
      });
    } finally {
      clearTimeout(timer);
    }
    if (res.body === null) req.signal.removeEventListener("abort", onAbort);
    const out = withoutHopByHop(res.headers);
    out.delete("access-control-allow-origin");
    return new Response(res.body, { status: res.status, statusText: res.statusText, headers: out });
  };
}

/** A copy of `headers` without hop-by-hop headers, including those `Connection` names. */
function withoutHopByHop(headers: Headers): Headers {
  const out = new Headers(headers);
  const named = headers.get("connection")?.split(",").map((s) => s.trim()) ?? [];
  for (const name of [...named, ...HOP_BY_HOP]) if (name) out.delete(name);
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
