/**
 * Start-up step of the denokv program under supervisord: validates the
 * environment, restores the database from the replica when the file is missing
 * (failing closed on any doubt), then prints the command line that
 * `start_denokv.sh` execs: `litestream replicate -exec "denokv ..."`, so denokv
 * never runs before the restore or without replication.
 */
import { existsSync } from "node:fs";
import { mkdir, readFile, rm, writeFile } from "node:fs/promises";
import { dirname, isAbsolute, join } from "node:path";
import {
  type AddressingStyle,
  litestreamAddressingEnv,
  s3AddressingStyle,
} from "./boot/s3_addressing.ts";
import { claimReplicaLease } from "./boot/lease.ts";

/** denokv refuses shorter tokens (`run_serve` in denokv's main.rs). */
export const MIN_TOKEN_LENGTH = 12;
/** Written once a database has lived in `$DATA_DIR`; its presence forbids an empty start. */
export const MARKER_FILE = ".denokv-replicated";
/** Variables Litestream 0.3.13 needs for S3 and would silently expand to "" when unset. */
export const S3_VARIABLES = [
  "BUCKET_NAME",
  "AWS_ENDPOINT_URL_S3",
  "AWS_REGION",
  "AWS_ACCESS_KEY_ID",
  "AWS_SECRET_ACCESS_KEY",
] as const;

/** Where Litestream replicates to. */
export type Replica =
  | {
    kind: "s3";
    bucket: string;
    path: string;
    endpoint: string;
    region: string;
    addressingStyle: AddressingStyle;
  }
  | { kind: "file"; dir: string };

/** The start-up program's validated configuration. */
export interface StartConfig {
  appDir: string;
  dataDir: string;
  dbPath: string;
  /** `host:port` denokv listens on, taken from `DENOKV_URL`. */
  denokvAddr: string;
  replica: Replica;
  /** The Litestream config file to use (`$APP_DIR/litestream.yml` for S3). */
  litestreamConfig: string;
  /** Refuse to start on an empty database even without a marker (`REQUIRE_REPLICA=1`). */
  requireReplica: boolean;
  /** The Litestream binary, by name unless `LITESTREAM_BIN` says otherwise. */
  litestreamBin: string;
  /** The denokv binary, by name unless `DENOKV_BIN` says otherwise. */
  denokvBin: string;
}

function absolute(name: string, value: string): string {
  if (!isAbsolute(value)) throw new Error(`${name} must be an absolute path: got "${value}"`);
  // The path ends up inside Litestream's -exec string, which is split on whitespace.
  if (/[\s"'\\$`]/.test(value)) {
    throw new Error(`${name} must not contain spaces, quotes or "$": got "${value}"`);
  }
  return value;
}

/** Reads and validates the environment (see DESIGN.md's table); throws with what is wrong. */
export function loadConfig(env: Record<string, string | undefined>): StartConfig {
  const token = env.DENO_KV_ACCESS_TOKEN ?? "";
  if (token.length < MIN_TOKEN_LENGTH) {
    throw new Error(
      `DENO_KV_ACCESS_TOKEN must be at least ${MIN_TOKEN_LENGTH} characters: got ${token.length}`,
    );
  }
  const appDir = absolute("APP_DIR", env.APP_DIR || "/app");
  const dataDir = absolute("DATA_DIR", env.DATA_DIR || "/data");
  const dbPath = absolute("DB_PATH", env.DB_PATH || join(dataDir, "denokv.sqlite"));
  const denokvUrl = env.DENOKV_URL || "http://127.0.0.1:4513";
  let url: URL;
  try {
    url = new URL(denokvUrl);
  } catch {
    throw new Error(`DENOKV_URL must be a URL: got "${denokvUrl}"`);
  }
  if (url.protocol !== "http:" || !url.port) {
    throw new Error(`DENOKV_URL must be http://host:port: got "${denokvUrl}"`);
  }
  const requireReplica = ["1", "true", "yes"].includes((env.REQUIRE_REPLICA ?? "").toLowerCase());

  let replica: Replica;
  let litestreamConfig: string;
  const setS3 = S3_VARIABLES.filter((name) => (env[name] ?? "").trim() !== "");
  if (setS3.length > 0 || !env.LOCAL_REPLICA_DIR) {
    const missing = S3_VARIABLES.filter((name) => !setS3.includes(name));
    if (missing.length > 0) {
      throw new Error(
        `S3 replication needs ${missing.join(", ")} (Litestream would expand them to "" ` +
          `silently); set them with "fly storage create", or set LOCAL_REPLICA_DIR for a local run`,
      );
    }
    const endpoint = env.AWS_ENDPOINT_URL_S3!;
    try {
      new URL(endpoint);
    } catch {
      throw new Error(`AWS_ENDPOINT_URL_S3 must be a URL: got "${endpoint}"`);
    }
    const path = env.REPLICA_PATH || "denokv";
    if (path.startsWith("/") || path.endsWith("/")) {
      throw new Error(`REPLICA_PATH must not start or end with "/": got "${path}"`);
    }
    replica = {
      kind: "s3",
      bucket: env.BUCKET_NAME!,
      path,
      endpoint,
      region: env.AWS_REGION!,
      addressingStyle: s3AddressingStyle(env),
    };
    litestreamConfig = absolute(
      "LITESTREAM_CONFIG",
      env.LITESTREAM_CONFIG || join(appDir, "litestream.yml"),
    );
  } else {
    replica = { kind: "file", dir: absolute("LOCAL_REPLICA_DIR", env.LOCAL_REPLICA_DIR) };
    litestreamConfig = join(dataDir, ".litestream-local.yml");
  }
  return {
    appDir,
    dataDir,
    dbPath,
    denokvAddr: url.host,
    replica,
    litestreamConfig,
    requireReplica,
    litestreamBin: env.LITESTREAM_BIN || "litestream",
    denokvBin: env.DENOKV_BIN || "denokv",
  };
}

/** The Litestream config for a local-folder replica (local runs without a bucket). */
export function localLitestreamConfig(config: StartConfig): string {
  if (config.replica.kind !== "file") throw new Error("localLitestreamConfig needs a file replica");
  return [
    "# Generated by scripts/start_denokv.ts for a local run: replica in a local folder.",
    "dbs:",
    `  - path: ${config.dbPath}`,
    "    monitor-interval: 100ms",
    "    replicas:",
    "      - type: file",
    `        path: ${config.replica.dir}`,
    "        sync-interval: 1s",
    "        snapshot-interval: 1h",
    "        retention: 168h",
    "",
  ].join("\n");
}

/** What the start-up step must do before replicating, from what is on disk. */
export type StartDecision =
  | { action: "replicate"; reason: string }
  | { action: "restore"; reason: string };

/** Decides between using the local database and restoring it. */
export function decideStart(state: { dbExists: boolean; markerExists: boolean }): StartDecision {
  if (state.dbExists) return { action: "replicate", reason: "the database file exists" };
  return {
    action: "restore",
    reason: state.markerExists
      ? `the database file is missing although ${MARKER_FILE} says one lived here`
      : "the database file is missing",
  };
}

/** What to do after `litestream restore -if-replica-exists` exited 0. */
export function decideAfterRestore(
  state: { restored: boolean; markerExists: boolean; requireReplica: boolean },
): { ok: true; fresh: boolean } | { ok: false; reason: string } {
  if (state.restored) return { ok: true, fresh: false };
  if (state.markerExists) {
    return {
      ok: false,
      reason: `no replica found, but ${MARKER_FILE} shows this volume had a replicated ` +
        `database: refusing to start an empty one (check BUCKET_NAME and REPLICA_PATH; ` +
        `delete ${MARKER_FILE} only to start empty on purpose)`,
    };
  }
  if (state.requireReplica) {
    return {
      ok: false,
      reason: "no replica found and REQUIRE_REPLICA is set: refusing to start an empty database",
    };
  }
  return { ok: true, fresh: true };
}

/** The environment Litestream needs, with the defaults made explicit (it reads `${VAR}`s). */
export function litestreamEnv(config: StartConfig): Record<string, string> {
  const env: Record<string, string> = { DB_PATH: config.dbPath, DATA_DIR: config.dataDir };
  if (config.replica.kind === "s3") {
    env.REPLICA_PATH = config.replica.path;
    Object.assign(env, litestreamAddressingEnv(config.replica.addressingStyle));
  }
  return env;
}

/**
 * The argv `start_denokv.sh` execs. It starts with `env` so Litestream sees the
 * defaults; the token stays in the inherited environment, never in argv.
 */
export function replicateCommand(config: StartConfig): string[] {
  const denokv =
    `${config.denokvBin} --sqlite-path ${config.dbPath} serve --addr ${config.denokvAddr}`;
  return [
    "env",
    ...Object.entries(litestreamEnv(config)).map(([k, v]) => `${k}=${v}`),
    config.litestreamBin,
    "replicate",
    "-config",
    config.litestreamConfig,
    "-exec",
    denokv,
  ];
}

/** Runs Litestream with `args`; resolves with its exit code and output. */
async function litestream(
  config: StartConfig,
  args: string[],
): Promise<{ code: number; output: string }> {
  const out = await new Deno.Command(config.litestreamBin, {
    args,
    env: litestreamEnv(config),
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, output: (dec.decode(out.stdout) + dec.decode(out.stderr)).trim() };
}

/** Removes `-wal`/`-shm`/Litestream leftovers of a missing database so they never pair with a restore. */
async function removeStrays(config: StartConfig, log: (line: string) => void): Promise<void> {
  for (const suffix of ["-wal", "-shm", "-journal"]) {
    const path = config.dbPath + suffix;
    if (existsSync(path)) {
      await rm(path, { force: true });
      log(`removed stray ${path}`);
    }
  }
  const meta = join(dirname(config.dbPath), `.${config.dbPath.split("/").pop()}-litestream`);
  if (existsSync(meta)) {
    await rm(meta, { recursive: true, force: true });
    log(`removed stale Litestream state ${meta}`);
  }
}

/**
 * Prepares the data directory and database; throws (fail closed) when denokv
 * must not start. Returns the argv to exec.
 */
export async function prepare(
  config: StartConfig,
  log: (line: string) => void = console.error,
): Promise<string[]> {
  await mkdir(config.dataDir, { recursive: true });
  await mkdir(dirname(config.dbPath), { recursive: true });
  if (config.replica.kind === "file") {
    await mkdir(config.replica.dir, { recursive: true });
    await writeFile(config.litestreamConfig, localLitestreamConfig(config));
    log(
      `no BUCKET_NAME set: replicating to the local folder ${config.replica.dir} ` +
        `(local run only; set the S3 variables in production)`,
    );
  } else {
    const r = config.replica;
    log(`replica: s3://${r.bucket}/${r.path} at ${r.endpoint} (${r.region})`);
  }
  const marker = join(config.dataDir, MARKER_FILE);
  const markerExists = existsSync(marker);
  const decision = decideStart({ dbExists: existsSync(config.dbPath), markerExists });
  log(`${decision.reason}: ${decision.action}`);
  if (decision.action === "restore") {
    await removeStrays(config, log);
    const restore = await litestream(config, [
      "restore",
      "-config",
      config.litestreamConfig,
      "-if-replica-exists",
      "-o",
      config.dbPath,
      config.dbPath,
    ]);
    if (restore.code !== 0) {
      await rm(config.dbPath, { force: true });
      throw new Error(
        `restore failed (litestream exited ${restore.code}); denokv not started: ${restore.output}`,
      );
    }
    const after = decideAfterRestore({
      restored: existsSync(config.dbPath),
      markerExists,
      requireReplica: config.requireReplica,
    });
    if (restore.output) log(restore.output);
    if (!after.ok) throw new Error(after.reason);
    log(after.fresh ? "no replica yet: starting a new database" : "restored from the replica");
  }
  if (!markerExists) {
    await writeFile(marker, JSON.stringify({ since: new Date().toISOString() }) + "\n");
  } else {
    await readFile(marker); // unreadable marker: fail here, not later
  }
  return replicateCommand(config);
}

if (import.meta.main) {
  try {
    const config = loadConfig(Deno.env.toObject());
    // One writer per replica: wait here, before any restore, while another machine holds it.
    await claimReplicaLease(Deno.env.toObject(), (line) => console.error(`start_denokv: ${line}`));
    const argv = await prepare(config, (line) => console.error(`start_denokv: ${line}`));
    console.log(argv.join("\n"));
  } catch (err) {
    console.error(`start_denokv: ${err instanceof Error ? err.message : err}`);
    Deno.exit(1);
  }
}
