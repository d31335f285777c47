/**
 * How fresh the replica in the bucket is, for `/metrics` and the console:
 * the newest WAL segment Litestream uploaded, read incrementally (each
 * generation's `wal/` folder is listed from the last key seen, so a scrape
 * costs one small request per generation however long the history is), and
 * whether the local database has changes the bucket does not have yet.
 */
import { ListObjectsV2Command, S3Client } from "@aws-sdk/client-s3";
import type { S3Config } from "../scripts/backup_check/config.ts";

/** What {@linkcode ReplicaWatch.read} reports. */
export interface ReplicaState {
  /** When Litestream last uploaded a WAL segment (S3 time, whole seconds). */
  newestUpload?: Date;
  /** Seconds the local database has been ahead of the bucket; 0 when caught up. */
  lagSeconds: number;
  /** The last listing error, if the latest refresh failed. */
  error?: string;
}

/** S3 times are whole seconds and the machine's clock is not the bucket's. */
const CLOCK_SLACK_MS = 1_500;

/** Watches one Litestream 0.3 replica (`<path>/generations/<id>/wal/...`). */
export class ReplicaWatch {
  #client: S3Client;
  #s3: S3Config;
  #walPath: string;
  #minIntervalMs: number;
  #lastKey = new Map<string, string>();
  #newest?: Date;
  #checkedAt = 0;
  #error?: string;
  #refreshing?: Promise<void>;
  /** When this process last saw the database caught up. */
  #caughtUpAt?: number;
  /** The lower bound of the first change not in the bucket, while one exists. */
  #aheadSince?: number;

  constructor(s3: S3Config, opts: { walPath: string; minIntervalMs?: number }) {
    this.#s3 = s3;
    this.#client = new S3Client({
      endpoint: s3.endpoint,
      region: s3.region,
      forcePathStyle: s3.forcePathStyle,
      credentials: { accessKeyId: s3.accessKeyId, secretAccessKey: s3.secretAccessKey },
      // The SDK's default user agent reads os.release(), which the proxy's permissions
      // (no --allow-sys, set in supervisord.conf) refuse.
      defaultUserAgentProvider: () => Promise.resolve([["denokv-on-fly-proxy"]]),
    });
    this.#walPath = opts.walPath;
    this.#minIntervalMs = opts.minIntervalMs ?? 5_000;
  }

  async #list(prefix: string, opts: { delimiter?: boolean; startAfter?: string }) {
    const keys: { key: string; time?: Date }[] = [];
    const prefixes: string[] = [];
    let token: string | undefined;
    do {
      const page = await this.#client.send(
        new ListObjectsV2Command({
          Bucket: this.#s3.bucket,
          Prefix: prefix,
          Delimiter: opts.delimiter ? "/" : undefined,
          StartAfter: token ? undefined : opts.startAfter,
          ContinuationToken: token,
        }),
      );
      for (const p of page.CommonPrefixes ?? []) if (p.Prefix) prefixes.push(p.Prefix);
      for (const o of page.Contents ?? []) {
        if (o.Key) keys.push({ key: o.Key, time: o.LastModified });
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
    return { keys, prefixes };
  }

  async #refresh(): Promise<void> {
    try {
      const root = this.#s3.replicaPath ? `${this.#s3.replicaPath}/generations/` : "generations/";
      const { prefixes } = await this.#list(root, { delimiter: true });
      for (const generation of prefixes) {
        const { keys } = await this.#list(`${generation}wal/`, {
          startAfter: this.#lastKey.get(generation),
        });
        for (const { key, time } of keys) {
          this.#lastKey.set(generation, key);
          if (time && (!this.#newest || time > this.#newest)) this.#newest = time;
        }
      }
      this.#error = undefined;
    } catch (err) {
      this.#error = err instanceof Error ? err.message : String(err);
    }
    this.#checkedAt = Date.now();
  }

  /** Refreshes from the bucket at most every `minIntervalMs`, then compares with the WAL file. */
  async read(now = Date.now()): Promise<ReplicaState> {
    if (now - this.#checkedAt >= this.#minIntervalMs) {
      this.#refreshing ??= this.#refresh().finally(() => (this.#refreshing = undefined));
      await this.#refreshing;
    }
    // Only the WAL file: a checkpoint rewrites the main file without anything new to ship.
    const walChanged = await Deno.stat(this.#walPath).then((s) => s.mtime?.getTime(), () => null);
    const newest = this.#newest?.getTime();
    const ahead = walChanged != null &&
      (newest === undefined || walChanged > newest + CLOCK_SLACK_MS);
    if (!ahead) {
      this.#caughtUpAt = now;
      this.#aheadSince = undefined;
    } else {
      // The first change not shipped came after both the last upload and the last time
      // this process saw the database caught up.
      this.#aheadSince ??= Math.max(newest ?? 0, this.#caughtUpAt ?? 0) || walChanged;
    }
    return {
      newestUpload: this.#newest,
      lagSeconds: this.#aheadSince === undefined ? 0 : Math.max(0, (now - this.#aheadSince) / 1000),
      error: this.#error,
    };
  }

  close(): void {
    this.#client.destroy();
  }
}
