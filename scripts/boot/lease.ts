/**
 * One writer per replica: a small lease object next to the replica in the
 * bucket (`<REPLICA_PATH>.lease.json`, with the holder's machine id and its
 * last heartbeat), written only with S3 conditional writes (`If-None-Match: *`
 * to create, `If-Match: <etag>` to renew or take over) so that two machines can
 * never both win it. The start-up step claims it before restoring and serving
 * ({@linkcode claimLease}); the watchdog's process keeps renewing it and stops
 * denokv when it cannot ({@linkcode holdLease}).
 */
import { GetObjectCommand, PutObjectCommand, S3Client } from "@aws-sdk/client-s3";
import { s3AddressingStyle } from "./s3_addressing.ts";

/** A lease whose heartbeat is older than this may be taken over by another machine. */
export const DEFAULT_LEASE_TTL_MS = 30_000;
/** How often the holder renews; also how often a waiting machine looks again. */
export const DEFAULT_LEASE_RENEW_MS = 5_000;

/** What the lease object stores. */
export interface LeaseRecord {
  /** `FLY_MACHINE_ID`, else the host name. */
  holder: string;
  /** The holder's clock when it last wrote the lease (ISO 8601). */
  heartbeatAt: string;
  /** The TTL the holder promised to keep: stale once the heartbeat is older. */
  ttlMs: number;
}

/** Everything the lease needs, read from the environment once. */
export interface LeaseConfig {
  bucket: string;
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
  forcePathStyle: boolean;
  /** The object key of the lease. */
  key: string;
  /** This machine's id. */
  holder: string;
  ttlMs: number;
  renewMs: number;
  /**
   * A holder whose last successful renewal started this long ago stops denokv:
   * half the TTL, so the other half covers stopping it and clock skew.
   */
  giveUpMs: number;
}

/** The lease object sits next to the replica, outside Litestream's prefix and the check's listing. */
export function leaseKey(replicaPath: string): string {
  return `${replicaPath}.lease.json`;
}

function positiveInteger(env: Record<string, string | undefined>, name: string, fallback: number) {
  const raw = env[name];
  if (raw === undefined || raw.trim() === "") return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value <= 0) {
    throw new RangeError(`"${name}" must be a positive integer: got ${JSON.stringify(raw)}`);
  }
  return value;
}

/**
 * Reads the lease settings; undefined when no bucket is configured (a local
 * run replicating to a folder has no replica to share).
 */
export function loadLeaseConfig(
  env: Record<string, string | undefined>,
): LeaseConfig | undefined {
  const bucket = (env.BUCKET_NAME ?? "").trim();
  if (bucket === "") return undefined;
  const need = (name: string) => {
    const value = (env[name] ?? "").trim();
    if (value === "") throw new Error(`"${name}" must be set for the replica lease: got nothing`);
    return value;
  };
  const ttlMs = positiveInteger(env, "LEASE_TTL_MS", DEFAULT_LEASE_TTL_MS);
  const renewMs = positiveInteger(env, "LEASE_RENEW_MS", DEFAULT_LEASE_RENEW_MS);
  // Two failed renewals in a row must still leave time before the holder gives up.
  if (renewMs * 4 > ttlMs) {
    throw new RangeError(
      `"LEASE_RENEW_MS" must be at most a quarter of "LEASE_TTL_MS": got ${renewMs} and ${ttlMs}`,
    );
  }
  const holder = (env.FLY_MACHINE_ID ?? "").trim() || Deno.hostname();
  return {
    bucket,
    endpoint: need("AWS_ENDPOINT_URL_S3"),
    region: (env.AWS_REGION ?? "").trim() || "auto",
    accessKeyId: need("AWS_ACCESS_KEY_ID"),
    secretAccessKey: need("AWS_SECRET_ACCESS_KEY"),
    forcePathStyle: s3AddressingStyle(env) === "path",
    key: leaseKey((env.REPLICA_PATH ?? "").trim() || "denokv"),
    holder,
    ttlMs,
    renewMs,
    giveUpMs: Math.floor(ttlMs / 2),
  };
}

/** The lease as read: its record (undefined when unreadable) and the ETag that guards it. */
export interface LeaseState {
  etag: string;
  record?: LeaseRecord;
}

/** The outcome of one claim attempt. */
export type ClaimAttempt =
  | { won: true; etag: string; took: "created" | "renewed" | "taken over" }
  | { won: false; holder: string; heartbeatAgeMs?: number };

function httpStatus(err: unknown): number | undefined {
  return (err as { $metadata?: { httpStatusCode?: number } })?.$metadata?.httpStatusCode;
}

/** 412: the condition did not hold; 409: S3's answer to two conditional writes at once. */
function lostRace(err: unknown): boolean {
  const status = httpStatus(err);
  return status === 412 || status === 409;
}

function parseRecord(text: string): LeaseRecord | undefined {
  try {
    const value = JSON.parse(text);
    if (
      typeof value?.holder === "string" && typeof value?.heartbeatAt === "string" &&
      Number.isFinite(Date.parse(value.heartbeatAt)) && Number.isInteger(value?.ttlMs)
    ) return value;
  } catch { /* unreadable: handled by the caller */ }
  return undefined;
}

/** The lease object of one replica path, read and written with conditional writes only. */
export class ReplicaLease {
  readonly config: LeaseConfig;
  #client: S3Client;
  /** When an unreadable lease was first seen, by ETag: it goes stale after a TTL unchanged. */
  #firstSeen = new Map<string, number>();

  constructor(config: LeaseConfig) {
    this.config = config;
    this.#client = new S3Client({
      endpoint: config.endpoint,
      region: config.region,
      forcePathStyle: config.forcePathStyle,
      credentials: { accessKeyId: config.accessKeyId, secretAccessKey: config.secretAccessKey },
      // One attempt per call: the loops below retry on their own schedule.
      maxAttempts: 1,
    });
  }

  /** Where the lease lives, for messages. */
  get where(): string {
    return `s3://${this.config.bucket}/${this.config.key}`;
  }

  /** Reads the lease; null when there is none. */
  async read(signal?: AbortSignal): Promise<LeaseState | null> {
    try {
      const out = await this.#client.send(
        new GetObjectCommand({ Bucket: this.config.bucket, Key: this.config.key }),
        { abortSignal: signal },
      );
      const text = await out.Body!.transformToString();
      return { etag: out.ETag!, record: parseRecord(text) };
    } catch (err) {
      if (httpStatus(err) === 404) return null;
      throw err;
    }
  }

  /** True when `state` may be taken over: its heartbeat is older than its TTL. */
  isStale(state: LeaseState, now = Date.now()): boolean {
    if (!state.record) {
      const first = this.#firstSeen.get(state.etag) ?? now;
      this.#firstSeen.set(state.etag, first);
      return now - first > this.config.ttlMs;
    }
    return now - Date.parse(state.record.heartbeatAt) > state.record.ttlMs;
  }

  /** Writes a fresh heartbeat under `condition`; the new ETag, or null when the race was lost. */
  async #write(
    condition: { IfNoneMatch: "*" } | { IfMatch: string },
    signal?: AbortSignal,
  ): Promise<string | null> {
    const record: LeaseRecord = {
      holder: this.config.holder,
      heartbeatAt: new Date().toISOString(),
      ttlMs: this.config.ttlMs,
    };
    try {
      const out = await this.#client.send(
        new PutObjectCommand({
          Bucket: this.config.bucket,
          Key: this.config.key,
          Body: JSON.stringify(record) + "\n",
          ContentType: "application/json",
          ...condition,
        }),
        { abortSignal: signal },
      );
      return out.ETag!;
    } catch (err) {
      if (lostRace(err)) return null;
      throw err;
    }
  }

  /** One claim attempt: create, renew our own, or take over a stale lease. */
  async tryClaim(signal?: AbortSignal): Promise<ClaimAttempt> {
    const state = await this.read(signal);
    if (!state) {
      const etag = await this.#write({ IfNoneMatch: "*" }, signal);
      if (etag) return { won: true, etag, took: "created" };
      return { won: false, holder: "another machine (created it just now)" };
    }
    const ours = state.record?.holder === this.config.holder;
    if (ours || this.isStale(state)) {
      const etag = await this.#write({ IfMatch: state.etag }, signal);
      if (etag) return { won: true, etag, took: ours ? "renewed" : "taken over" };
      return { won: false, holder: "another machine (took it just now)" };
    }
    return {
      won: false,
      holder: state.record?.holder ?? "an unreadable lease",
      heartbeatAgeMs: state.record ? Date.now() - Date.parse(state.record.heartbeatAt) : undefined,
    };
  }

  /**
   * Renews the lease this machine holds under `etag`. A lost condition is
   * looked at again: if the lease still names this machine (our own earlier
   * write landed although its answer was lost), its new ETag is adopted.
   */
  async renew(
    etag: string,
    signal?: AbortSignal,
  ): Promise<{ ok: true; etag: string } | { ok: false; holder: string }> {
    const next = await this.#write({ IfMatch: etag }, signal);
    if (next) return { ok: true, etag: next };
    const state = await this.read(signal);
    if (state?.record?.holder === this.config.holder) {
      const again = await this.#write({ IfMatch: state.etag }, signal);
      if (again) return { ok: true, etag: again };
    }
    return { ok: false, holder: state?.record?.holder ?? (state ? "unreadable" : "nobody") };
  }

  close(): void {
    this.#client.destroy();
  }
}

function message(err: unknown): string {
  return err instanceof Error ? `${err.name}: ${err.message}` : String(err);
}

function seconds(ms: number): string {
  return `${(ms / 1000).toFixed(1)} s`;
}

function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done, { once: true });
    function done() {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    }
  });
}

/** Options for {@linkcode claimLease} and {@linkcode holdLease}. */
export interface LeaseLoopOptions {
  log?: (line: string) => void;
  /** Ends the loop (tests; SIGTERM in the CLI). */
  signal?: AbortSignal;
}

/** Repeated waiting lines are printed at most this often. */
const WAIT_LOG_EVERY_MS = 30_000;

/**
 * Claims the lease for this machine, waiting in-process for as long as
 * another machine holds a live one or S3 cannot be reached: fail closed,
 * without exiting (supervisord would count the exits against its retry limit).
 * Resolves with the ETag once this machine holds it.
 */
export async function claimLease(
  lease: ReplicaLease,
  opts: LeaseLoopOptions = {},
): Promise<string> {
  const log = opts.log ?? (() => {});
  const { holder, renewMs, ttlMs } = lease.config;
  let lastLine = "";
  let lastLoggedAt = -Infinity;
  const say = (line: string) => {
    if (line !== lastLine || performance.now() - lastLoggedAt >= WAIT_LOG_EVERY_MS) {
      log(line);
      lastLine = line;
      lastLoggedAt = performance.now();
    }
  };
  while (true) {
    if (opts.signal?.aborted) throw new Error(`gave up claiming ${lease.where}: aborted`);
    try {
      const attempt = await lease.tryClaim(AbortSignal.timeout(renewMs * 2));
      if (attempt.won) {
        log(`lease ${lease.where} ${attempt.took} by ${holder} (TTL ${seconds(ttlMs)})`);
        return attempt.etag;
      }
      const age = attempt.heartbeatAgeMs === undefined
        ? ""
        : ` (heartbeat ${seconds(Math.max(0, attempt.heartbeatAgeMs))} ago, stale after ${
          seconds(ttlMs)
        })`;
      say(
        `waiting: ${lease.where} is held by ${attempt.holder}${age}; this machine (${holder}) ` +
          `does not restore or serve until that lease goes stale`,
      );
    } catch (err) {
      say(`waiting: cannot reach the lease ${lease.where}: ${message(err)}; retrying`);
    }
    await sleep(renewMs, opts.signal);
  }
}

/** Options for {@linkcode holdLease}. */
export interface HoldOptions extends LeaseLoopOptions {
  /** Stops denokv; called when the lease is lost or could not be renewed in time. */
  onLost(reason: string): Promise<void>;
}

/**
 * Keeps renewing the lease while it names this machine. Idle until the
 * start-up step has claimed it; then renews every `renewMs`. When a renewal
 * is refused (another machine holds it) or none has succeeded for `giveUpMs`,
 * calls `onLost` and goes idle again until the start-up step claims anew.
 */
export async function holdLease(lease: ReplicaLease, opts: HoldOptions): Promise<void> {
  const log = opts.log ?? (() => {});
  const { holder, renewMs, giveUpMs } = lease.config;
  let etag: string | undefined;
  /** performance.now() when the last successful write started (its heartbeat). */
  let lastOk = 0;
  /** Bumped on every arm and disarm, so a late answer cannot re-arm a lost lease. */
  let generation = 0;
  let reported = "";
  const lose = (reason: string) => {
    if (etag === undefined) return;
    etag = undefined;
    generation++;
    log(`lease lost: ${reason}; stopping denokv`);
    opts.onLost(reason).catch((err) => log(`could not stop denokv: ${message(err)}`));
  };
  // A renewal that hangs must not hold up the deadline: a timer watches it.
  const watchdog = setInterval(() => {
    if (etag !== undefined && performance.now() - lastOk > giveUpMs) {
      lose(`no renewal of ${lease.where} succeeded for ${seconds(performance.now() - lastOk)}`);
    }
  }, Math.min(250, renewMs));
  try {
    while (!opts.signal?.aborted) {
      const started = performance.now();
      const gen = generation;
      try {
        if (etag === undefined) {
          const state = await lease.read(AbortSignal.timeout(renewMs));
          if (state?.record?.holder === holder && !lease.isStale(state) && gen === generation) {
            etag = state.etag;
            generation++;
            lastOk = started - Math.max(0, Date.now() - Date.parse(state.record.heartbeatAt));
            log(`holding ${lease.where} for ${holder}; renewing every ${seconds(renewMs)}`);
          }
        }
        if (etag !== undefined) {
          const current = generation;
          const result = await lease.renew(etag, AbortSignal.timeout(renewMs));
          if (current === generation) {
            if (result.ok) {
              etag = result.etag;
              lastOk = started;
              reported = "";
            } else {
              lose(`${lease.where} is now held by ${result.holder}`);
            }
          }
        }
      } catch (err) {
        const line = `cannot renew ${lease.where}: ${message(err)}`;
        if (line !== reported) log(line);
        reported = line;
      }
      await sleep(Math.max(0, renewMs - (performance.now() - started)), opts.signal);
    }
  } finally {
    clearInterval(watchdog);
  }
}

/**
 * The start-up step's one call: claims the replica's lease for this machine
 * before anything is restored or served, waiting while another machine holds
 * it. Does nothing for a local run without a bucket.
 */
export async function claimReplicaLease(
  env: Record<string, string | undefined>,
  log: (line: string) => void = console.error,
): Promise<void> {
  const config = loadLeaseConfig(env);
  if (!config) return;
  const lease = new ReplicaLease(config);
  try {
    await claimLease(lease, { log });
  } finally {
    lease.close();
  }
}
