/**
 * A replicated stack for backup-check tests and benchmarks: fauxqs (through
 * s3.ts), the denokv stand-in over `$DATA_DIR/denokv.sqlite`, and
 * `litestream replicate` started here with its own config (not the image's
 * litestream.yml).
 */
import { join } from "node:path";
import { type FauxS3, startFauxS3 } from "./s3.ts";
import {
  DENO,
  openRemoteKv,
  ROOT,
  Running,
  startStandin,
  TEST_PATH,
  TEST_TOKEN,
  waitFor,
} from "./processes.ts";

/** What a backup-check run printed and returned. */
export interface CheckRun {
  code: number;
  stdout: string;
  stderr: string;
}

/** A running replicated stack in a fresh directory. */
export interface BackupFixture {
  dir: string;
  dataDir: string;
  dbPath: string;
  /** TMPDIR of the check, so tests can see that its temp dir is gone. */
  tmpDir: string;
  s3: FauxS3;
  denokv: Running;
  litestream: Running;
  /** The environment contract for the check against this stack. */
  env(extra?: Record<string, string>): Record<string, string>;
  /** Runs `deno run -A scripts/backup_check/backup_check.ts` with a clean environment. */
  runCheck(extra?: Record<string, string>): Promise<CheckRun>;
  /** Stops Litestream (replication stopped). */
  stopReplication(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

/**
 * The real Litestream binary: `node_modules/.bin/litestream` is a node wrapper
 * that neither forwards signals nor keeps the exit code.
 */
export const LITESTREAM_BIN = join(
  ROOT,
  "node_modules/@flydotio",
  `litestream-${Deno.build.os}-${Deno.build.arch === "aarch64" ? "arm64" : "x64"}`,
  "litestream",
);

/** The replica prefix the fixture replicates to. */
export const FIXTURE_REPLICA_PATH = "denokv";

function litestreamConfig(dbPath: string, s3: FauxS3): string {
  const q = JSON.stringify;
  return [
    "dbs:",
    `  - path: ${q(dbPath)}`,
    "    replicas:",
    "      - type: s3",
    `        bucket: ${q(s3.bucket)}`,
    `        path: ${q(FIXTURE_REPLICA_PATH)}`,
    `        endpoint: ${q(s3.endpoint)}`,
    "        region: us-east-1",
    "        force-path-style: true",
    "        sync-interval: 500ms",
    "",
  ].join("\n");
}

/**
 * Boots the stack, lets `seed` write through KV Connect, and waits until
 * Litestream has a snapshot in the bucket.
 */
export async function startBackupFixture(
  seed: (kv: Deno.Kv) => Promise<void> = async () => {},
  opts: {
    /** How long Litestream may take for its first snapshot (large benchmark databases). */
    snapshotTimeoutMs?: number;
    /** Another S3 than fauxqs (MinIO takes multi-hundred-MB snapshots; fauxqs stalls on them). */
    startS3?: () => Promise<FauxS3>;
  } = {},
): Promise<BackupFixture> {
  const dir = await Deno.makeTempDir({ prefix: "backup-check-test-" });
  const dataDir = join(dir, "data");
  const tmpDir = join(dir, "tmp");
  await Deno.mkdir(dataDir);
  await Deno.mkdir(tmpDir);
  const dbPath = join(dataDir, "denokv.sqlite");
  const cleanups: (() => Promise<unknown>)[] = [];
  const cleanup = async () => {
    for (const c of cleanups.reverse()) await c().catch(() => {});
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  try {
    const s3 = await (opts.startS3 ?? startFauxS3)();
    cleanups.push(() => s3[Symbol.asyncDispose]());
    const denokv = await startStandin({ sqlitePath: dbPath });
    cleanups.push(() => denokv.stop("SIGKILL"));
    const kv = await openRemoteKv(denokv.url);
    try {
      await seed(kv);
    } finally {
      kv.close();
    }
    const configPath = join(dir, "litestream.yml");
    await Deno.writeTextFile(configPath, litestreamConfig(dbPath, s3));
    const child = new Deno.Command(LITESTREAM_BIN, {
      args: ["replicate", "-config", configPath],
      env: {
        PATH: TEST_PATH,
        LITESTREAM_ACCESS_KEY_ID: s3.env().AWS_ACCESS_KEY_ID,
        LITESTREAM_SECRET_ACCESS_KEY: s3.env().AWS_SECRET_ACCESS_KEY,
      },
      clearEnv: true,
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const litestream = new Running("litestream", child, 0);
    cleanups.push(() => litestream.stop("SIGKILL"));
    await waitFor("Litestream's first snapshot and WAL segment", async () => {
      const status = await Promise.race([litestream.done, Promise.resolve(null)]);
      if (status) throw new Error(`litestream exited ${status.code}: ${litestream.output}`);
      // Litestream uploads the snapshot, then the first WAL segment a moment later.
      const keys = await s3.keys(`${FIXTURE_REPLICA_PATH}/`);
      return ["/snapshots/", "/wal/"].every((part) => keys.some((k) => k.includes(part)));
    }, { timeoutMs: opts.snapshotTimeoutMs ?? 60_000, intervalMs: 200 });
    const env = (extra: Record<string, string> = {}) => ({
      PATH: TEST_PATH,
      HOME: Deno.env.get("HOME") ?? dir,
      ...(Deno.env.get("DENO_DIR") ? { DENO_DIR: Deno.env.get("DENO_DIR")! } : {}),
      TMPDIR: tmpDir,
      DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
      DENOKV_URL: denokv.url,
      DATA_DIR: dataDir,
      DB_PATH: dbPath,
      APP_NAME: "backup-test-app",
      LITESTREAM_BIN,
      ...s3.env(FIXTURE_REPLICA_PATH),
      ...extra,
    });
    return {
      dir,
      dataDir,
      dbPath,
      tmpDir,
      s3,
      denokv,
      litestream,
      env,
      async runCheck(extra = {}) {
        const out = await new Deno.Command(DENO, {
          args: ["run", "-A", join(ROOT, "scripts/backup_check/backup_check.ts")],
          cwd: ROOT,
          env: env(extra),
          clearEnv: true,
          stdout: "piped",
          stderr: "piped",
        }).output();
        const decoder = new TextDecoder();
        return {
          code: out.code,
          stdout: decoder.decode(out.stdout),
          stderr: decoder.decode(out.stderr),
        };
      },
      async stopReplication() {
        await litestream.stop("SIGTERM");
      },
      [Symbol.asyncDispose]: cleanup,
    };
  } catch (err) {
    await cleanup();
    throw err;
  }
}
