/**
 * Start-up step of the denokv program under supervisord: validates the
 * environment, takes the volume's restore lock, restores the database from the
 * replica when the file is missing or older than the replica (failing closed
 * on any doubt, retrying while S3 cannot be reached), then prints the command
 * line that `start_denokv.sh` execs: `litestream replicate -exec "denokv ..."`,
 * so denokv never runs before the restore or without replication.
 */
import { existsSync } from "node:fs";
import { mkdir, readFile, rename, rm, writeFile } from "node:fs/promises";
import { dirname, isAbsolute, join } from "node:path";
import { validateToken } from "../../proxy/auth.ts";
import {
  compareWithReplica,
  type Freshness,
  litestreamMetaDir,
  localPosition,
  parseWalList,
} from "./start_denokv_freshness.ts";
import {
  type AddressingStyle,
  litestreamAddressingEnv,
  s3AddressingStyle,
} from "./s3_addressing.ts";
import { claimReplicaLease } from "./lease.ts";
import { litestreamAddr } from "./litestream_addr.ts";

export { MIN_TOKEN_LENGTH } from "../../proxy/auth.ts";
/** The lock file that keeps two restores off one volume (held for the whole start-up step). */
export const RESTORE_LOCK_FILE = ".restore.lock";
/** Longest wait between two attempts to reach the replica: S3 back means serving within seconds. */
export const MAX_RETRY_DELAY_MS = 5_000;
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
  /** `host:port` of Litestream's metrics endpoint (`LITESTREAM_ADDR`). */
  litestreamAddr: string;
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
  validateToken(env.DENO_KV_ACCESS_TOKEN);
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
    litestreamAddr: checkedAddr(litestreamAddr(env)),
  };
}

function checkedAddr(value: string): string {
  if (!/^[\w.-]+:\d+$/.test(value)) {
    throw new Error(`LITESTREAM_ADDR must be host:port: got "${value}"`);
  }
  return value;
}

/** The Litestream config for a local-folder replica (local runs without a bucket). */
export function localLitestreamConfig(config: StartConfig): string {
  if (config.replica.kind !== "file") throw new Error("localLitestreamConfig needs a file replica");
  return [
    "# Generated by scripts/boot/start_denokv.ts for a local run: replica in a local folder.",
    `addr: ${config.litestreamAddr}`,
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
  const env: Record<string, string> = {
    DB_PATH: config.dbPath,
    DATA_DIR: config.dataDir,
    LITESTREAM_ADDR: config.litestreamAddr,
  };
  if (config.replica.kind === "s3") {
    env.REPLICA_PATH = config.replica.path;
    Object.assign(env, litestreamAddressingEnv(config.replica.addressingStyle));
  }
  return env;
}

/**
 * The argv `start_denokv.sh` execs. It starts with `env` so Litestream sees the
 * defaults; the token stays in the inherited environment, never in argv.
 * denokv runs under `setpriv --pdeathsig KILL`: if Litestream dies, denokv
 * dies with it, so supervisord restarts the pair as one unit instead of
 * leaving a denokv nobody replicates (and whose port blocks the restart).
 */
export function replicateCommand(config: StartConfig): string[] {
  const denokv = `setpriv --pdeathsig KILL ${config.denokvBin} --sqlite-path ${config.dbPath} ` +
    `serve --addr ${config.denokvAddr}`;
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
  // If this step dies (SIGTERM to the program, or killed), the restore dies too:
  // never a restore left running into the file the next start restores to.
  const out = await new Deno.Command("setpriv", {
    args: ["--pdeathsig", "KILL", config.litestreamBin, ...args],
    env: litestreamEnv(config),
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, output: (dec.decode(out.stdout) + dec.decode(out.stderr)).trim() };
}

/** Removes `-wal`/`-shm`/Litestream leftovers of a missing database so they never pair with a restore. */
async function removeStrays(config: StartConfig, log: (line: string) => void): Promise<void> {
  // ".tmp" is where an interrupted restore was writing.
  for (const suffix of ["-wal", "-shm", "-journal", ".tmp"]) {
    const path = config.dbPath + suffix;
    if (existsSync(path)) {
      await rm(path, { force: true });
      log(`removed stray ${path}`);
    }
  }
  const meta = litestreamMetaDir(config.dbPath);
  if (existsSync(meta)) {
    await rm(meta, { recursive: true, force: true });
    log(`removed stale Litestream state ${meta}`);
  }
}

/** Options for {@linkcode prepare}. */
export interface PrepareOptions {
  /** Attempts to reach the replica before giving up; default: for as long as it takes. */
  maxAttempts?: number;
  /** Delay before the first retry (ms), doubled up to {@linkcode MAX_RETRY_DELAY_MS}. */
  firstDelayMs?: number;
  /**
   * Claims the replica's lease (one writer per replica) once the volume lock is
   * held; default: {@linkcode claimReplicaLease} on the process environment,
   * which returns at once without a bucket.
   */
  claimLease?: (log: (line: string) => void) => Promise<void>;
}

/** A replica operation that may succeed later (S3 unreachable, a timeout). */
class ReplicaUnreachable extends Error {}

/**
 * Runs `attempt` until it succeeds, waiting longer each time (up to
 * {@linkcode MAX_RETRY_DELAY_MS}) while it throws {@linkcode ReplicaUnreachable}.
 * Any other error ends the start-up at once (fail closed).
 */
async function withRetry<T>(
  what: string,
  attempt: () => Promise<T>,
  log: (line: string) => void,
  opts: PrepareOptions,
): Promise<T> {
  const max = opts.maxAttempts ?? Infinity;
  let delay = opts.firstDelayMs ?? 500;
  for (let n = 1;; n++) {
    try {
      return await attempt();
    } catch (err) {
      if (!(err instanceof ReplicaUnreachable) || n >= max) throw err;
      log(`${what} failed (attempt ${n}), retrying in ${delay} ms: ${err.message}`);
      await new Promise((r) => setTimeout(r, delay));
      delay = Math.min(delay * 2, MAX_RETRY_DELAY_MS);
    }
  }
}

/**
 * Takes the volume's restore lock (an exclusive `flock` released when this
 * process ends): two start-ups never restore into the same folder at once.
 */
async function lockVolume(config: StartConfig, log: (line: string) => void): Promise<Deno.FsFile> {
  const file = await Deno.open(join(config.dataDir, RESTORE_LOCK_FILE), {
    write: true,
    create: true,
  });
  const locking = file.lock(true);
  const first = await Promise.race([locking.then(() => true), delay(200).then(() => false)]);
  if (!first) {
    log(
      `waiting for the restore lock ${
        join(config.dataDir, RESTORE_LOCK_FILE)
      } (another start-up holds it)`,
    );
    await locking;
  }
  return file;
}

function delay(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Compares the database on the volume with the replica (`litestream wal`). */
async function checkFreshness(config: StartConfig): Promise<Freshness> {
  const list = await litestream(config, ["wal", "-config", config.litestreamConfig, config.dbPath]);
  if (list.code !== 0) {
    throw new ReplicaUnreachable(`litestream wal exited ${list.code}: ${list.output}`);
  }
  const local = localPosition(config.dbPath) ?? {
    generation: "",
    index: -1,
    size: 0,
    modified: (await Deno.stat(config.dbPath)).mtime?.getTime() ?? 0,
  };
  return compareWithReplica(local, parseWalList(list.output));
}

/** Moves an older database (and its WAL) aside, keeping it, before the newer one is restored. */
async function setAside(config: StartConfig, log: (line: string) => void): Promise<void> {
  const stamp = new Date().toISOString().replace(/[:.]/g, "-");
  for (const suffix of ["", "-wal"]) {
    if (!existsSync(config.dbPath + suffix)) continue;
    const to = `${config.dbPath}${suffix}.older-${stamp}`;
    await rename(config.dbPath + suffix, to);
    log(`kept the older ${config.dbPath}${suffix} as ${to}`);
  }
}

/** Restores the replica into `config.dbPath`; throws ReplicaUnreachable when it may work later. */
async function restore(config: StartConfig, log: (line: string) => void): Promise<string> {
  await removeStrays(config, log);
  const run = await litestream(config, [
    "restore",
    "-config",
    config.litestreamConfig,
    "-if-replica-exists",
    "-o",
    config.dbPath,
    config.dbPath,
  ]);
  if (run.code !== 0) {
    await rm(config.dbPath, { force: true });
    throw new ReplicaUnreachable(
      `restore failed (litestream exited ${run.code}); denokv not started: ${run.output}`,
    );
  }
  return run.output;
}

/**
 * Prepares the data directory and database; throws (fail closed) when denokv
 * must not start. Returns the argv to exec. The steps, in order: folders and
 * config, the volume lock, the replica's lease, the decision (missing or older
 * than the replica: restore), the restore, the marker.
 */
export async function prepare(
  config: StartConfig,
  log: (line: string) => void = console.error,
  opts: PrepareOptions = {},
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
  const lock = await lockVolume(config, log);
  try {
    // One writer per replica: wait here, before any restore, while another machine holds it.
    await (opts.claimLease ?? ((l) => claimReplicaLease(Deno.env.toObject(), l)))(log);
    const marker = join(config.dataDir, MARKER_FILE);
    const markerExists = existsSync(marker);
    let decision = decideStart({ dbExists: existsSync(config.dbPath), markerExists });
    if (decision.action === "replicate") {
      // A volume back from an older snapshot must not replicate over newer data.
      const fresh = await withRetry(
        "comparing with the replica",
        () => checkFreshness(config),
        log,
        opts,
      );
      if (fresh.older) {
        decision = { action: "restore", reason: fresh.reason };
        await setAside(config, log);
      } else {
        decision = { action: "replicate", reason: `the database file exists (${fresh.reason})` };
      }
    }
    log(`${decision.reason}: ${decision.action}`);
    if (decision.action === "restore") {
      const output = await withRetry("restore", () => restore(config, log), log, opts);
      const after = decideAfterRestore({
        restored: existsSync(config.dbPath),
        markerExists,
        requireReplica: config.requireReplica,
      });
      if (output) log(output);
      if (!after.ok) throw new Error(after.reason);
      log(after.fresh ? "no replica yet: starting a new database" : "restored from the replica");
    }
    if (!markerExists) {
      await writeFile(marker, JSON.stringify({ since: new Date().toISOString() }) + "\n");
    } else {
      await readFile(marker); // unreadable marker: fail here, not later
    }
  } finally {
    lock.close();
  }
  return replicateCommand(config);
}

if (import.meta.main) {
  try {
    const config = loadConfig(Deno.env.toObject());
    const argv = await prepare(config, (line) => console.error(`start_denokv: ${line}`));
    console.log(argv.join("\n"));
  } catch (err) {
    console.error(`start_denokv: ${err instanceof Error ? err.message : err}`);
    Deno.exit(1);
  }
}
