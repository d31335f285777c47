/**
 * Entry point of the proxy: reads the environment once, builds the Hono app
 * and serves it on `$PORT` until SIGTERM/SIGINT, then drains open requests.
 */
import { fileURLToPath } from "node:url";
import { isAbsolute, resolve } from "node:path";
import { litestreamAddr } from "../scripts/boot/litestream_addr.ts";
import { createApp } from "./app.ts";
import { validateToken } from "./auth.ts";
import { quietCuts } from "./closing.ts";
import { statusRoutes } from "./status.ts";
import { type MetricsConfig, metricsConfig, ProxyMetrics } from "./metrics.ts";
import { consoleRoutes, parseQueuePrefixes, queueList } from "./console/mod.tsx";

/** The proxy's validated configuration. */
export interface ProxyConfig {
  port: number;
  hostname: string;
  denokvUrl: string;
  libDir: string;
  accessToken: string;
  dataDir: string;
  accessLog: boolean;
  upstreamTimeoutMs: number;
  upstreamWriteTimeoutMs: number;
  bodyTimeoutMs: number;
  /** Litestream's metrics URL `/healthz` requires to answer, or null (no check). */
  litestreamUrl: string | null;
  minFreeBytes: number;
  metrics: MetricsConfig;
  /** Extra queue prefixes the console shows (`QUEUE_PREFIXES`). */
  queuePrefixes: Deno.KvKey[];
  /** On Fly (`FLY_APP_NAME` set) the edge's Fly-Client-IP names the client; elsewhere it is forgeable. */
  behindFlyEdge: boolean;
}

function positiveMs(
  env: Record<string, string | undefined>,
  name: string,
  fallback: number,
): number {
  const value = Number(env[name] ?? fallback);
  if (!Number.isInteger(value) || value <= 0) {
    throw new Error(`${name} must be a positive integer: got ${env[name]}`);
  }
  return value;
}

/** Reads and validates the proxy's environment (see DESIGN.md's table). */
export function loadConfig(env: Record<string, string | undefined>): ProxyConfig {
  const token = validateToken(env.DENO_KV_ACCESS_TOKEN);
  const port = Number(env.PORT ?? "4512");
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`PORT must be a port number: got ${env.PORT}`);
  }
  const denokvUrl = env.DENOKV_URL ?? "http://127.0.0.1:4513";
  try {
    new URL(denokvUrl);
  } catch {
    throw new Error(`DENOKV_URL must be a URL: got ${denokvUrl}`);
  }
  const upstreamTimeoutMs = positiveMs(env, "UPSTREAM_TIMEOUT_MS", 10_000);
  const upstreamWriteTimeoutMs = positiveMs(env, "UPSTREAM_WRITE_TIMEOUT_MS", 20_000);
  const bodyTimeoutMs = positiveMs(env, "BODY_TIMEOUT_MS", 15_000);
  const minFreeBytes = positiveMs(env, "MIN_FREE_BYTES", 16 * 1024 * 1024);
  // supervisord.conf sets HEALTHZ_REQUIRES_LITESTREAM for the proxy it runs
  // beside Litestream; a proxy run on its own has no replication to report.
  const litestreamUrl = env.HEALTHZ_REQUIRES_LITESTREAM === "true"
    ? `http://${litestreamAddr(env)}/metrics`
    : null;
  const libDir = env.LIB_DIR ?? fileURLToPath(new URL("../lib", import.meta.url));
  return {
    port,
    // "::" takes IPv4 too (Linux dual-stack): Fly's edge arrives over IPv4, <app>.internal over IPv6.
    hostname: env.HOSTNAME_BIND ?? "::",
    denokvUrl,
    libDir: isAbsolute(libDir) ? libDir : resolve(libDir),
    accessToken: token,
    dataDir: env.DATA_DIR ?? "/data",
    accessLog: env.ACCESS_LOG !== "off",
    upstreamTimeoutMs,
    upstreamWriteTimeoutMs,
    bodyTimeoutMs,
    litestreamUrl,
    minFreeBytes,
    metrics: metricsConfig(env),
    queuePrefixes: parseQueuePrefixes(env.QUEUE_PREFIXES),
    behindFlyEdge: Boolean(env.FLY_APP_NAME),
  };
}

/**
 * An access log that batches lines and writes them at most every 100 ms (or
 * at 16 KiB): a synchronous write per request costs a visible share of the
 * proxy's per-request CPU on a one-vCPU machine.
 */
export function bufferedLog(
  out: { writeSync(p: Uint8Array): number },
  flushMs = 100,
): (line: string) => void {
  const encoder = new TextEncoder();
  let pending: string[] = [];
  let size = 0;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const flush = () => {
    clearTimeout(timer);
    timer = undefined;
    if (pending.length === 0) return;
    const bytes = encoder.encode(pending.join("\n") + "\n");
    pending = [];
    size = 0;
    let written = 0;
    while (written < bytes.length) written += out.writeSync(bytes.subarray(written));
  };
  globalThis.addEventListener("unload", flush);
  return (line) => {
    pending.push(line);
    size += line.length + 1;
    if (size >= 16 * 1024) flush();
    else timer ??= setTimeout(flush, flushMs);
  };
}

/** Serves the proxy with `config`; resolves when the server has shut down. */
export function serveProxy(config: ProxyConfig): Deno.HttpServer {
  const metrics = new ProxyMetrics({
    denokvUrl: config.denokvUrl,
    accessToken: config.accessToken,
    dataDir: config.dataDir,
    dbPath: config.metrics.dbPath,
    s3: config.metrics.s3,
    litestreamAddr: config.metrics.litestreamAddr,
    // Straight to denokv (as the console): queue reads are not client traffic to count.
    queues: {
      openKv: () => Deno.openKv(config.denokvUrl),
      queues: queueList(config.queuePrefixes),
    },
  });
  const status = statusRoutes({ dataDir: config.dataDir, accessToken: config.accessToken });
  const app = createApp({
    denokvUrl: config.denokvUrl,
    libDir: config.libDir,
    accessToken: config.accessToken,
    upstreamTimeoutMs: config.upstreamTimeoutMs,
    upstreamWriteTimeoutMs: config.upstreamWriteTimeoutMs,
    bodyTimeoutMs: config.bodyTimeoutMs,
    litestreamUrl: config.litestreamUrl ?? undefined,
    dataDir: config.dataDir,
    minFreeBytes: config.minFreeBytes,
    extend: (app) => {
      status(app);
      metrics.routes()(app);
      consoleRoutes({
        accessToken: config.accessToken,
        dataDir: config.dataDir,
        metrics,
        // Deno's remote KV client takes the token from DENO_KV_ACCESS_TOKEN, which is set.
        openKv: () => Deno.openKv(config.denokvUrl),
        queuePrefixes: config.queuePrefixes,
        trustFlyClientIp: config.behindFlyEdge,
      })(app);
    },
    instrument: metrics.middleware(),
    onUpstreamError: (path, timedOut) => metrics.upstreamError(path, timedOut),
    log: config.accessLog ? bufferedLog(Deno.stdout) : undefined,
  });
  metrics.servePrivate(config.metrics);
  return Deno.serve({
    port: config.port,
    hostname: config.hostname,
    onError: quietCuts((err) => {
      console.error(err);
      return new Response("Internal Server Error", { status: 500 });
    }),
    onListen: ({ hostname, port }) =>
      console.log(`proxy listening on http://${hostname}:${port} -> ${config.denokvUrl}`),
  }, app.fetch);
}

if (import.meta.main) {
  let config: ProxyConfig;
  try {
    config = loadConfig(Deno.env.toObject());
  } catch (err) {
    console.error(`proxy: ${err instanceof Error ? err.message : err}`);
    Deno.exit(2);
  }
  const server = serveProxy(config);
  // Watch streams never end by themselves: give open requests 3 s, then go.
  const stop = () =>
    Promise.race([server.shutdown(), new Promise((r) => setTimeout(r, 3_000))])
      .then(() => Deno.exit(0)); // Deno.exit() fires "unload", which flushes the log
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
}
