/**
 * Entry point of the proxy: reads the environment once, builds the Hono app
 * and serves it on `$PORT` until SIGTERM/SIGINT, then drains open requests.
 */
import { fileURLToPath } from "node:url";
import { isAbsolute, resolve } from "node:path";
import { createApp } from "./app.ts";
import { statusRoutes } from "./status.ts";

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
}

/** Reads and validates the proxy's environment (see DESIGN.md's table). */
export function loadConfig(env: Record<string, string | undefined>): ProxyConfig {
  const token = env.DENO_KV_ACCESS_TOKEN ?? "";
  if (token.length < 12) {
    throw new Error(
      `DENO_KV_ACCESS_TOKEN must be at least 12 characters: got ${token.length}`,
    );
  }
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
  const upstreamTimeoutMs = Number(env.UPSTREAM_TIMEOUT_MS ?? "10000");
  if (!Number.isInteger(upstreamTimeoutMs) || upstreamTimeoutMs <= 0) {
    throw new Error(
      `UPSTREAM_TIMEOUT_MS must be a positive integer: got ${env.UPSTREAM_TIMEOUT_MS}`,
    );
  }
  const libDir = env.LIB_DIR ?? fileURLToPath(new URL("../lib", import.meta.url));
  return {
    port,
    hostname: env.HOSTNAME_BIND ?? "0.0.0.0",
    denokvUrl,
    libDir: isAbsolute(libDir) ? libDir : resolve(libDir),
    accessToken: token,
    dataDir: env.DATA_DIR ?? "/data",
    accessLog: env.ACCESS_LOG !== "off",
    upstreamTimeoutMs,
  };
}

/** Serves the proxy with `config`; resolves when the server has shut down. */
export function serveProxy(config: ProxyConfig): Deno.HttpServer {
  const app = createApp({
    denokvUrl: config.denokvUrl,
    libDir: config.libDir,
    accessToken: config.accessToken,
    upstreamTimeoutMs: config.upstreamTimeoutMs,
    extend: statusRoutes({ dataDir: config.dataDir, accessToken: config.accessToken }),
    log: config.accessLog ? (line) => console.log(line) : undefined,
  });
  return Deno.serve({
    port: config.port,
    hostname: config.hostname,
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
      .then(() => Deno.exit(0));
  Deno.addSignalListener("SIGTERM", stop);
  Deno.addSignalListener("SIGINT", stop);
}
