/**
 * Reads and validates the environment of the nightly backup check once, so
 * every other part of the check takes a typed {@linkcode BackupCheckConfig}.
 */
import { join } from "node:path";
import { s3AddressingStyle } from "../boot/s3_addressing.ts";

/** denokv refuses shorter tokens. */
const MIN_TOKEN_LENGTH = 12;
/** Litestream syncs every second by default; 15 s leaves room for a slow bucket. */
export const DEFAULT_CANARY_TIMEOUT_MS = 15_000;

/** S3 settings shared by Litestream and the replica health check. */
export interface S3Config {
  bucket: string;
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  /** Prefix of the replica inside the bucket. */
  replicaPath: string;
  /** Bucket in the path, not the host name (`S3_ADDRESSING_STYLE=path`). */
  forcePathStyle: boolean;
}

/** SMTP settings; absent when `SMTP_HOST` is unset. */
export interface SmtpConfig {
  host: string;
  port: number;
  user?: string;
  password?: string;
  from: string;
  to: string;
}

/** Everything the backup check needs, read from the environment once. */
export interface BackupCheckConfig {
  accessToken: string;
  denokvUrl: string;
  dataDir: string;
  dbPath: string;
  s3: S3Config;
  smtp?: SmtpConfig;
  heartbeatUrl?: string;
  appName: string;
  /** Bounded wait for the canary to reach the replica. */
  canaryTimeoutMs: number;
  /** The litestream binary (default: `litestream` on PATH). */
  litestreamBin: string;
}

function required(env: Record<string, string | undefined>, name: string): string {
  const value = env[name];
  if (value === undefined || value.trim() === "") {
    throw new Error(
      `"${name}" must be set: got ${value === undefined ? "nothing" : "an empty string"}`,
    );
  }
  return value;
}

function optional(env: Record<string, string | undefined>, name: string): string | undefined {
  const value = env[name];
  return value === undefined || value.trim() === "" ? undefined : value;
}

function positiveInteger(name: string, raw: string | undefined, fallback: number): number {
  if (raw === undefined) return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value <= 0) {
    throw new RangeError(`"${name}" must be a positive integer: got ${JSON.stringify(raw)}`);
  }
  return value;
}

function httpUrl(name: string, raw: string): string {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new TypeError(`"${name}" must be an http(s) URL: got ${JSON.stringify(raw)}`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new TypeError(`"${name}" must be an http(s) URL: got ${JSON.stringify(raw)}`);
  }
  return raw.replace(/\/+$/, "");
}

/**
 * Validates the environment contract of DESIGN.md for the backup check.
 *
 * @example
 * ```ts
 * import { loadConfig } from "./config.ts";
 * const config = loadConfig({
 *   DENO_KV_ACCESS_TOKEN: "a-long-enough-token",
 *   BUCKET_NAME: "b",
 *   AWS_ENDPOINT_URL_S3: "https://fly.storage.tigris.dev",
 *   AWS_ACCESS_KEY_ID: "id",
 *   AWS_SECRET_ACCESS_KEY: "secret",
 * });
 * if (config.dbPath !== "/data/denokv.sqlite") throw new Error("unexpected default");
 * ```
 */
export function loadConfig(env: Record<string, string | undefined>): BackupCheckConfig {
  const accessToken = required(env, "DENO_KV_ACCESS_TOKEN");
  if (accessToken.length < MIN_TOKEN_LENGTH) {
    throw new RangeError(
      `"DENO_KV_ACCESS_TOKEN" must be at least ${MIN_TOKEN_LENGTH} characters: got ${accessToken.length}`,
    );
  }
  const dataDir = optional(env, "DATA_DIR") ?? "/data";
  const smtpHost = optional(env, "SMTP_HOST");
  let smtp: SmtpConfig | undefined;
  if (smtpHost) {
    const port = positiveInteger("SMTP_PORT", optional(env, "SMTP_PORT"), 587);
    if (port > 65535) throw new RangeError(`"SMTP_PORT" must be <= 65535: got ${port}`);
    smtp = {
      host: smtpHost,
      port,
      user: optional(env, "SMTP_USER"),
      password: optional(env, "SMTP_PASSWORD"),
      from: required(env, "SMTP_FROM"),
      to: required(env, "ALERT_EMAIL"),
    };
  }
  const heartbeat = optional(env, "HEARTBEAT_URL");
  return {
    accessToken,
    denokvUrl: httpUrl("DENOKV_URL", optional(env, "DENOKV_URL") ?? "http://127.0.0.1:4513"),
    dataDir,
    dbPath: optional(env, "DB_PATH") ?? join(dataDir, "denokv.sqlite"),
    s3: {
      bucket: required(env, "BUCKET_NAME"),
      endpoint: httpUrl("AWS_ENDPOINT_URL_S3", required(env, "AWS_ENDPOINT_URL_S3")),
      region: optional(env, "AWS_REGION") ?? "auto",
      accessKeyId: required(env, "AWS_ACCESS_KEY_ID"),
      secretAccessKey: required(env, "AWS_SECRET_ACCESS_KEY"),
      replicaPath: (optional(env, "REPLICA_PATH") ?? "denokv").replace(/^\/+|\/+$/g, ""),
      forcePathStyle: s3AddressingStyle(env) === "path",
    },
    smtp,
    heartbeatUrl: heartbeat ? httpUrl("HEARTBEAT_URL", heartbeat) : undefined,
    appName: optional(env, "APP_NAME") ?? optional(env, "FLY_APP_NAME") ?? "denokv",
    canaryTimeoutMs: positiveInteger(
      "CANARY_TIMEOUT_MS",
      optional(env, "CANARY_TIMEOUT_MS"),
      DEFAULT_CANARY_TIMEOUT_MS,
    ),
    litestreamBin: optional(env, "LITESTREAM_BIN") ?? "litestream",
  };
}
