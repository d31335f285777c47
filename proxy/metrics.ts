/**
 * Prometheus metrics of the proxy (prom-client): KV Connect requests by
 * operation and status class, latency, bytes, open watch streams, upstream
 * errors, whether denokv and Litestream are up, how fresh the replica is, the
 * last nightly check and the depth of each queue. Served on a private port for Fly's `[metrics]`
 * scraper and at `/metrics` on the public port behind the token; the console
 * reads the per-minute usage kept here.
 */
import type { Hono, MiddlewareHandler } from "hono";
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import { readLatest } from "../scripts/backup_check/history.ts";
import type { S3Config } from "../scripts/backup_check/config.ts";
import { s3AddressingStyle } from "../scripts/boot/s3_addressing.ts";
import { litestreamAddr } from "../scripts/boot/litestream_addr.ts";
import { ReplicaWatch } from "./metrics_replica.ts";
import { litestreamRunning, probeDenokv } from "./metrics_probes.ts";
import { QueueGauges, type QueueMetricsOptions } from "./metrics_queues.ts";
import { requireToken } from "./auth.ts";

/** The KV Connect operations, by the path the client posts to. */
export type Operation = "metadata" | "snapshot_read" | "atomic_write" | "watch";

const OPERATIONS: Record<string, Operation> = {
  "/": "metadata",
  "/v2/snapshot_read": "snapshot_read",
  "/v2/atomic_write": "atomic_write",
  "/v2/watch": "watch",
};

/** The operation a KV Connect path names, or null for any other path. */
export function operationOf(path: string): Operation | null {
  return OPERATIONS[path] ?? null;
}

/** Minutes of per-minute usage kept for the console. */
export const USAGE_MINUTES = 180;
/** Port of the private metrics listener on Fly when `METRICS_PORT` is unset (fly.toml `[metrics]`). */
export const DEFAULT_METRICS_PORT = 9091;
/** Latency buckets in seconds: a read on loopback takes about a millisecond, a write a few. */
const LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
/** Deno Deploy billed KV reads per 4 KiB read and writes per 1 KiB written. */
const READ_UNIT_BYTES = 4096;
const WRITE_UNIT_BYTES = 1024;

/** One minute of KV traffic, as the console's usage page shows it. */
export interface MinuteUsage {
  /** Start of the minute (epoch ms). */
  minute: number;
  reads: number;
  writes: number;
  watches: number;
  requests: number;
  errors: number;
  bytesIn: number;
  bytesOut: number;
  /** Deploy-style KV units: a read per started 4 KiB read, a write per started 1 KiB written. */
  readUnits: number;
  writeUnits: number;
  /** Sum and maximum of request latencies (ms), for the overview's chart. */
  latencyMsSum: number;
  latencyMsMax: number;
}

/** The metrics part of the proxy's environment. */
export interface MetricsConfig {
  port: number;
  hostname: string;
  dbPath: string;
  /** The replica, when the S3 variables are set. */
  s3?: S3Config;
  /** Litestream's metrics address (`LITESTREAM_ADDR`, default 127.0.0.1:4514). */
  litestreamAddr?: string;
}

/**
 * Reads `METRICS_PORT` (0 disables the private listener; default 9091 on a
 * Fly machine, recognised by `FLY_APP_NAME`, else 0 so local runs and tests
 * never bind a fixed port), `METRICS_HOSTNAME` (default `::`, so Fly's scraper
 * reaches it over the private network), `DB_PATH` and the S3 variables of
 * DESIGN.md's table.
 */
export function metricsConfig(env: Record<string, string | undefined>): MetricsConfig {
  const fallback = env.FLY_APP_NAME ? DEFAULT_METRICS_PORT : 0;
  const port = Number(env.METRICS_PORT || fallback);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`METRICS_PORT must be a port number: got ${env.METRICS_PORT}`);
  }
  const dataDir = env.DATA_DIR || "/data";
  const set = (name: string) => (env[name] ?? "").trim() !== "";
  const s3 = ["BUCKET_NAME", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
      .every(set)
    ? {
      bucket: env.BUCKET_NAME!,
      endpoint: env.AWS_ENDPOINT_URL_S3!,
      region: env.AWS_REGION || "auto",
      accessKeyId: env.AWS_ACCESS_KEY_ID!,
      secretAccessKey: env.AWS_SECRET_ACCESS_KEY!,
      replicaPath: (env.REPLICA_PATH || "denokv").replace(/^\/+|\/+$/g, ""),
      forcePathStyle: s3AddressingStyle(env) === "path",
    }
    : undefined;
  return {
    port,
    hostname: env.METRICS_HOSTNAME || "::",
    dbPath: env.DB_PATH || `${dataDir}/denokv.sqlite`,
    s3,
    litestreamAddr: litestreamAddr(env),
  };
}

/** Options for {@linkcode ProxyMetrics}. */
export interface MetricsOptions {
  denokvUrl: string;
  accessToken: string;
  /** Where `backup-checks.jsonl` lives. */
  dataDir: string;
  dbPath: string;
  s3?: S3Config;
  /** `host:port` of Litestream's metrics (litestream.yml `addr:`); unset: not probed. */
  litestreamAddr?: string;
  /** Minimum time between two listings of the bucket. */
  replicaIntervalMs?: number;
  /** Queues whose depths each scrape exports (their counters only: a few keys per scrape). */
  queues?: QueueMetricsOptions;
}

function statusClass(status: number): string {
  return `${Math.floor(status / 100)}xx`;
}

/**
 * The metrics of one proxy process.
 *
 * @example
 * ```ts
 * import { Hono } from "hono";
 * import { ProxyMetrics } from "./metrics.ts";
 * const metrics = new ProxyMetrics({
 *   denokvUrl: "http://127.0.0.1:9",
 *   accessToken: "a-long-enough-token",
 *   dataDir: "/nonexistent",
 *   dbPath: "/nonexistent/denokv.sqlite",
 * });
 * const app = new Hono();
 * metrics.routes()(app);
 * const res = await app.request("/metrics");
 * if (res.status !== 401) throw new Error(`expected 401 without the token, got ${res.status}`);
 * metrics.close();
 * ```
 */
export class ProxyMetrics {
  readonly registry: Registry = new Registry();
  #opts: MetricsOptions;
  #replica?: ReplicaWatch;
  #queues?: QueueGauges;
  #usage: MinuteUsage[] = [];
  #requests: Counter<"operation" | "status_class">;
  #latency: Histogram<"operation">;
  #bytesIn: Counter<"operation">;
  #bytesOut: Counter<"operation">;
  #watches: Gauge;
  #upstreamErrors: Counter<"operation" | "kind">;
  #denokvUp: Gauge;
  #litestreamUp: Gauge;
  #replicaUpload: Gauge;
  #replicaAge: Gauge;
  #lag: Gauge;
  #replicaError: Gauge;
  #checkOk: Gauge;
  #checkAge: Gauge;
  #checkTime: Gauge;

  constructor(opts: MetricsOptions) {
    this.#opts = opts;
    if (opts.s3) {
      this.#replica = new ReplicaWatch(opts.s3, {
        walPath: `${opts.dbPath}-wal`,
        minIntervalMs: opts.replicaIntervalMs,
      });
    }
    const registers = [this.registry];
    if (opts.queues) this.#queues = new QueueGauges(this.registry, opts.queues);
    this.#requests = new Counter({
      name: "denokv_requests_total",
      help: "KV Connect requests answered by the proxy, by operation and status class.",
      labelNames: ["operation", "status_class"],
      registers,
    });
    this.#latency = new Histogram({
      name: "denokv_request_duration_seconds",
      help: "Time to the response headers of KV Connect requests (a watch: until it opened).",
      labelNames: ["operation"],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.#bytesIn = new Counter({
      name: "denokv_request_bytes_total",
      help: "Request body bytes received, by KV Connect operation.",
      labelNames: ["operation"],
      registers,
    });
    this.#bytesOut = new Counter({
      name: "denokv_response_bytes_total",
      help: "Response body bytes sent, by KV Connect operation (watch frames as they stream).",
      labelNames: ["operation"],
      registers,
    });
    this.#watches = new Gauge({
      name: "denokv_watch_streams_open",
      help: "Watch streams open through the proxy.",
      registers,
    });
    this.#upstreamErrors = new Counter({
      name: "denokv_upstream_errors_total",
      help: "Requests denokv did not answer: kind=timeout (no answer in time) or error.",
      labelNames: ["operation", "kind"],
      registers,
    });
    this.#denokvUp = new Gauge({
      name: "denokv_up",
      help: "1 when denokv answered a metadata exchange during this scrape.",
      registers,
    });
    this.#litestreamUp = new Gauge({
      name: "denokv_litestream_up",
      help: "1 when Litestream's metrics endpoint answers for this database.",
      registers,
    });
    this.#replicaUpload = new Gauge({
      name: "denokv_replica_last_upload_timestamp_seconds",
      help: "When Litestream last uploaded a WAL segment to the bucket (S3 time).",
      registers,
    });
    this.#replicaAge = new Gauge({
      name: "denokv_replica_age_seconds",
      help: "Seconds since the last WAL segment reached the bucket (grows on an idle database).",
      registers,
    });
    this.#lag = new Gauge({
      name: "denokv_replication_lag_seconds",
      help: "Seconds the local database has had changes the bucket does not have; 0 caught up.",
      registers,
    });
    this.#replicaError = new Gauge({
      name: "denokv_replica_listing_failed",
      help: "1 when the last listing of the bucket failed (the replica figures are then stale).",
      registers,
    });
    this.#checkOk = new Gauge({
      name: "denokv_backup_check_success",
      help: "1 when the last nightly backup check PASSED, 0 when it FAILED.",
      registers,
    });
    this.#checkAge = new Gauge({
      name: "denokv_backup_check_age_seconds",
      help: "Seconds since the last nightly backup check finished.",
      registers,
    });
    this.#checkTime = new Gauge({
      name: "denokv_backup_check_timestamp_seconds",
      help: "When the last nightly backup check finished.",
      registers,
    });
  }

  #minute(now: number): MinuteUsage {
    const minute = Math.floor(now / 60_000) * 60_000;
    let last = this.#usage.at(-1);
    if (!last || last.minute !== minute) {
      last = emptyMinute(minute);
      this.#usage.push(last);
      if (this.#usage.length > USAGE_MINUTES) this.#usage.shift();
    }
    return last;
  }

  #countOut(operation: Operation, bytes: number): void {
    this.#bytesOut.inc({ operation }, bytes);
    this.#minute(Date.now()).bytesOut += bytes;
  }

  /** Counts a response body as it streams; for a watch also keeps the open-streams gauge. */
  #counted(operation: Operation, body: ReadableStream<Uint8Array>): ReadableStream<Uint8Array> {
    const reader = body.getReader();
    const watch = operation === "watch";
    if (watch) this.#watches.inc();
    let open = true;
    const end = () => {
      if (open && watch) this.#watches.dec();
      open = false;
    };
    return new ReadableStream<Uint8Array>({
      pull: async (controller) => {
        try {
          const chunk = await reader.read();
          if (chunk.done) {
            end();
            controller.close();
            return;
          }
          this.#countOut(operation, chunk.value.byteLength);
          controller.enqueue(chunk.value);
        } catch (err) {
          end();
          controller.error(err);
        }
      },
      cancel: (reason) => {
        end();
        return reader.cancel(reason);
      },
    }, { highWaterMark: 0 });
  }

  /** Middleware that measures KV Connect requests; mount it before the routes. */
  middleware(): MiddlewareHandler {
    return async (c, next) => {
      const operation = c.req.method === "POST" ? operationOf(c.req.path) : null;
      if (operation === null) return await next();
      const started = performance.now();
      // The Deno client always sends a length; a chunked body counts as 0 here.
      const bytesIn = Number(c.req.header("content-length")) || 0;
      await next();
      const ms = performance.now() - started;
      const res = c.res;
      this.#requests.inc({ operation, status_class: statusClass(res.status) });
      this.#latency.observe({ operation }, ms / 1000);
      this.#bytesIn.inc({ operation }, bytesIn);
      const minute = this.#minute(Date.now());
      minute.requests++;
      minute.bytesIn += bytesIn;
      minute.latencyMsSum += ms;
      minute.latencyMsMax = Math.max(minute.latencyMsMax, ms);
      if (res.status >= 400) minute.errors++;
      else if (operation === "snapshot_read") minute.reads++;
      else if (operation === "atomic_write") minute.writes++;
      else if (operation === "watch") minute.watches++;
      const length = res.headers.get("content-length");
      if (res.status < 400 && operation === "snapshot_read") {
        minute.readUnits += Math.max(1, Math.ceil((Number(length) || 0) / READ_UNIT_BYTES));
      } else if (res.status < 400 && operation === "atomic_write") {
        minute.writeUnits += Math.max(1, Math.ceil(bytesIn / WRITE_UNIT_BYTES));
      }
      if (res.body && (operation === "watch" || length === null)) {
        c.res = new Response(this.#counted(operation, res.body), res);
      } else {
        this.#countOut(operation, Number(length) || 0);
      }
    };
  }

  /** Called by the forwarder when denokv did not answer (createApp's `onUpstreamError`). */
  upstreamError(path: string, timedOut: boolean): void {
    const operation = operationOf(path) ?? "metadata";
    this.#upstreamErrors.inc({ operation, kind: timedOut ? "timeout" : "error" });
  }

  /** The last `minutes` minutes of traffic, oldest first, empty minutes included. */
  usage(minutes = 60, now = Date.now()): MinuteUsage[] {
    const byMinute = new Map(this.#usage.map((u) => [u.minute, u]));
    const last = Math.floor(now / 60_000) * 60_000;
    const out: MinuteUsage[] = [];
    for (let m = last - (minutes - 1) * 60_000; m <= last; m += 60_000) {
      out.push(
        byMinute.get(m) ?? emptyMinute(m),
      );
    }
    return out;
  }

  /** The health figures the console shows, refreshed now (the same ones a scrape exports). */
  async health(): Promise<Health> {
    const now = Date.now();
    const [denokvUp, litestreamUp, replica, check] = await Promise.all([
      probeDenokv(this.#opts.denokvUrl, this.#opts.accessToken),
      this.#opts.litestreamAddr === undefined
        ? Promise.resolve(undefined)
        : litestreamRunning(this.#opts.litestreamAddr, this.#opts.dbPath),
      this.#replica?.read(now),
      readLatest(this.#opts.dataDir).catch(() => undefined),
    ]);
    return { denokvUp, litestreamUp, replica, check, now };
  }

  /** The text exposition, with the gauges read now. */
  async metrics(): Promise<string> {
    const [h] = await Promise.all([this.health(), this.#queues?.update()]);
    this.#denokvUp.set(h.denokvUp ? 1 : 0);
    if (h.litestreamUp !== undefined) this.#litestreamUp.set(h.litestreamUp ? 1 : 0);
    if (h.replica) {
      this.#lag.set(h.replica.lagSeconds);
      this.#replicaError.set(h.replica.error ? 1 : 0);
      if (h.replica.newestUpload) {
        this.#replicaUpload.set(h.replica.newestUpload.getTime() / 1000);
        this.#replicaAge.set(Math.max(0, (h.now - h.replica.newestUpload.getTime()) / 1000));
      }
    }
    if (h.check) {
      const finished = Date.parse(h.check.finishedAt);
      this.#checkOk.set(h.check.status === "PASSED" ? 1 : 0);
      if (Number.isFinite(finished)) {
        this.#checkTime.set(finished / 1000);
        this.#checkAge.set(Math.max(0, (h.now - finished) / 1000));
      }
    }
    return await this.registry.metrics();
  }

  /** A fetch handler that serves `/metrics` without a token: for the private port only. */
  privateHandler(): (req: Request) => Promise<Response> {
    return async (req) => {
      const url = new URL(req.url);
      if (req.method !== "GET" || url.pathname !== "/metrics") {
        return new Response("Not found.", { status: 404 });
      }
      return new Response(await this.metrics(), {
        headers: { "content-type": this.registry.contentType, "cache-control": "no-store" },
      });
    };
  }

  /**
   * Serves the private `/metrics` listener for Fly's `[metrics]` scraper (not
   * public: fly.toml's `[http_service]` does not expose it). Port 0: none.
   * Metrics must never keep KV from being served, so a taken port is logged,
   * not fatal.
   */
  servePrivate(config: { port: number; hostname: string }): Deno.HttpServer | undefined {
    if (config.port === 0) return undefined;
    try {
      return Deno.serve({
        port: config.port,
        hostname: config.hostname,
        onListen: ({ hostname, port }) =>
          console.log(`metrics on http://${hostname}:${port}/metrics (private)`),
      }, this.privateHandler());
    } catch (err) {
      console.error(
        `proxy: no private metrics listener: ${err instanceof Error ? err.message : err}`,
      );
      return undefined;
    }
  }

  /** Adds `GET /metrics` behind the token (`Authorization: Bearer <token>`) to the public app. */
  routes(): (app: Hono) => void {
    return (app) => {
      app.get("/metrics", requireToken({ token: this.#opts.accessToken }), async (c) => {
        c.header("cache-control", "no-store");
        c.header("content-type", this.registry.contentType);
        return c.body(await this.metrics());
      });
    };
  }

  close(): void {
    this.#replica?.close();
    this.#queues?.close();
  }
}

export { litestreamRunning };

/** What {@linkcode ProxyMetrics.health} returns. */
export interface Health {
  denokvUp: boolean;
  /** Undefined when no Litestream address was given (not probed). */
  litestreamUp?: boolean;
  replica?: import("./metrics_replica.ts").ReplicaState;
  check?: import("../scripts/backup_check/history.ts").CheckRecord;
  now: number;
}

/** A minute with no traffic. */
function emptyMinute(minute: number): MinuteUsage {
  return {
    minute,
    reads: 0,
    writes: 0,
    watches: 0,
    requests: 0,
    errors: 0,
    bytesIn: 0,
    bytesOut: 0,
    readUnits: 0,
    writeUnits: 0,
    latencyMsSum: 0,
    latencyMsMax: 0,
  };
}
