/**
 * The replica side of the backup check: Litestream restores into a temp
 * directory (with a config built here, independent of the image's
 * litestream.yml) and `@aws-sdk/client-s3` describes what is in the bucket.
 */
import { ListObjectsV2Command, S3Client } from "@aws-sdk/client-s3";
import type { _Object } from "@aws-sdk/client-s3";
import { join } from "node:path";
import type { S3Config } from "./config.ts";

/** One object of the replica, as listed. */
export interface ReplicaObject {
  key: string;
  size: number;
  lastModified: Date;
}

/** Figures about the replica in the bucket. */
export interface ReplicaHealth {
  objects: number;
  generations: number;
  totalBytes: number;
  newestObjectAt?: Date;
  latestSnapshotAt?: Date;
}

/** Builds an S3 client for Tigris or any S3 endpoint, addressed as `S3_ADDRESSING_STYLE` says. */
export function s3Client(s3: S3Config): S3Client {
  return new S3Client({
    endpoint: s3.endpoint,
    region: s3.region,
    forcePathStyle: s3.forcePathStyle,
    credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
  });
}

/** Lists every object under the replica prefix (all pages). */
export async function listReplica(client: S3Client, s3: S3Config): Promise<ReplicaObject[]> {
  const objects: ReplicaObject[] = [];
  let token: string | undefined;
  do {
    const page = await client.send(
      new ListObjectsV2Command({
        Bucket: s3.bucket,
        Prefix: s3.replicaPath ? `${s3.replicaPath}/` : undefined,
        ContinuationToken: token,
      }),
    );
    for (const o of page.Contents ?? ([] as _Object[])) {
      if (!o.Key) continue;
      objects.push({ key: o.Key, size: o.Size ?? 0, lastModified: o.LastModified ?? new Date(0) });
    }
    token = page.IsTruncated ? page.NextContinuationToken : undefined;
  } while (token);
  return objects;
}

/** Litestream 0.3 lays a replica out as `<path>/generations/<id>/{snapshots,wal}/...`. */
function generationOf(key: string): string | undefined {
  return /(?:^|\/)generations\/([^/]+)\//.exec(key)?.[1];
}

/** Summarises a listing: generations, size, newest object and newest snapshot. */
export function replicaHealth(objects: ReplicaObject[]): ReplicaHealth {
  const generations = new Set<string>();
  let totalBytes = 0;
  let newestObjectAt: Date | undefined;
  let latestSnapshotAt: Date | undefined;
  for (const o of objects) {
    const generation = generationOf(o.key);
    if (generation) generations.add(generation);
    totalBytes += o.size;
    if (!newestObjectAt || o.lastModified > newestObjectAt) newestObjectAt = o.lastModified;
    if (/\/snapshots\//.test(o.key) && (!latestSnapshotAt || o.lastModified > latestSnapshotAt)) {
      latestSnapshotAt = o.lastModified;
    }
  }
  return {
    objects: objects.length,
    generations: generations.size,
    totalBytes,
    newestObjectAt,
    latestSnapshotAt,
  };
}

/** Keys of WAL segments and snapshots: Litestream writes a new key on every sync. */
export function dataKeys(objects: ReplicaObject[]): Set<string> {
  return new Set(
    objects.filter((o) => /\/(wal|snapshots)\//.test(o.key)).map((o) => o.key),
  );
}

/**
 * Waits until Litestream has uploaded something written after `since`: a WAL or
 * snapshot key absent from `before` whose time is not earlier than `since`'s
 * second (S3 times are whole seconds). Returns the object, or undefined on timeout.
 */
export async function waitForUpload(
  client: S3Client,
  s3: S3Config,
  opts: { before: Set<string>; since: Date; timeoutMs: number; intervalMs?: number },
): Promise<ReplicaObject | undefined> {
  const deadline = Date.now() + opts.timeoutMs;
  const floor = Math.floor(opts.since.getTime() / 1000) * 1000;
  while (true) {
    const objects = await listReplica(client, s3);
    const fresh = objects.find((o) =>
      /\/(wal|snapshots)\//.test(o.key) && !opts.before.has(o.key) &&
      o.lastModified.getTime() >= floor
    );
    if (fresh) return fresh;
    if (Date.now() >= deadline) return undefined;
    await new Promise((r) => setTimeout(r, opts.intervalMs ?? 250));
  }
}

/** The environment for a `litestream` command: `env` plus the bucket's credentials. */
export function litestreamCredentials(
  s3: S3Config,
  env: Record<string, string> = {},
): Record<string, string> {
  return {
    ...env,
    LITESTREAM_ACCESS_KEY_ID: s3.accessKeyId,
    LITESTREAM_SECRET_ACCESS_KEY: s3.secretAccessKey,
  };
}

/** A Litestream config that names only the replica, so restore never needs litestream.yml. */
export function restoreConfigYaml(dbPath: string, s3: S3Config): string {
  // JSON strings are valid YAML scalars, which keeps odd characters safe.
  const q = JSON.stringify;
  return [
    "# Written by scripts/backup_check/backup_check.ts for one restore; credentials come from the env.",
    "dbs:",
    `  - path: ${q(dbPath)}`,
    "    replicas:",
    "      - type: s3",
    `        bucket: ${q(s3.bucket)}`,
    `        path: ${q(s3.replicaPath)}`,
    `        endpoint: ${q(s3.endpoint)}`,
    `        region: ${q(s3.region)}`,
    `        force-path-style: ${s3.forcePathStyle}`,
    "",
  ].join("\n");
}

/** The outcome of one `litestream restore`. */
export interface RestoreResult {
  ok: boolean;
  attempts: number;
  ms: number;
  output: string;
}

/** Messages of Litestream 0.3 that say there is nothing to restore: retrying cannot help. */
const PERMANENT = /no matching backups|no generations|no snapshots available|cannot find/i;

/**
 * Restores the latest replica of `dbPath` (or its state at `timestamp`) into
 * `outPath` (which must not exist), retrying once on an error that may be
 * transient. `dbPath` only names the database in the config; it is never written.
 */
export async function restoreReplica(opts: {
  litestreamBin: string;
  dbPath: string;
  outPath: string;
  workDir: string;
  s3: S3Config;
  env?: Record<string, string>;
  /** Point-in-time restore: the state as replicated at this time. */
  timestamp?: Date;
}): Promise<RestoreResult> {
  const configPath = join(opts.workDir, "litestream-restore.yml");
  await Deno.writeTextFile(configPath, restoreConfigYaml(opts.dbPath, opts.s3), { mode: 0o600 });
  const started = performance.now();
  let output = "";
  for (let attempt = 1; attempt <= 2; attempt++) {
    await Deno.remove(opts.outPath).catch(() => {});
    await Deno.remove(`${opts.outPath}.tmp`).catch(() => {});
    const result = await new Deno.Command(opts.litestreamBin, {
      args: [
        "restore",
        "-config",
        configPath,
        "-o",
        opts.outPath,
        ...(opts.timestamp ? ["-timestamp", opts.timestamp.toISOString()] : []),
        opts.dbPath,
      ],
      env: litestreamCredentials(opts.s3, opts.env),
      stdout: "piped",
      stderr: "piped",
    }).output();
    const decoder = new TextDecoder();
    output = (decoder.decode(result.stdout) + decoder.decode(result.stderr)).trim();
    const restored = result.success && await Deno.stat(opts.outPath).then(() => true, () => false);
    if (restored) {
      return { ok: true, attempts: attempt, ms: performance.now() - started, output };
    }
    if (!output) output = `litestream exited ${result.code} without restoring a file`;
    if (PERMANENT.test(output)) {
      return { ok: false, attempts: attempt, ms: performance.now() - started, output };
    }
  }
  return { ok: false, attempts: 2, ms: performance.now() - started, output };
}
