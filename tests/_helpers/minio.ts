/**
 * MinIO for tests that need an S3 which honours conditional writes
 * (`If-None-Match: *`, `If-Match`): fauxqs ignores them. Built once from the
 * Go module proxy (`go install github.com/minio/minio@<version>`) into
 * ~/.cache/denokv-on-fly/minio-<version>/bin/minio, started on a free
 * loopback port. Also a TCP relay that can cut one client off from it.
 */
import { join } from "node:path";
import { CreateBucketCommand, S3Client } from "@aws-sdk/client-s3";
import { freePort, Running, waitFor } from "./processes.ts";
import { cacheDir } from "../../scripts/dev/tools.ts";
import { listKeys } from "./s3.ts";

/** The newest MinIO module version on the Go module proxy (its repository is archived). */
export const MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c";
/** Where the build is cached (the machine cache the other real parts use). */
export const MINIO_BIN = join(cacheDir(), `minio-${MINIO_VERSION}`, "bin/minio");
/** MinIO wants at least 3 and 8 characters. */
export const MINIO_CREDENTIALS = {
  accessKeyId: "minio-test",
  secretAccessKey: "minio-test-secret",
};
const REGION = "us-east-1";

/** Builds MinIO into the cache unless it is there (minutes on a cold Go cache). */
export async function ensureMinio(): Promise<string> {
  try {
    await Deno.stat(MINIO_BIN);
    return MINIO_BIN;
  } catch { /* build it */ }
  const out = await new Deno.Command("go", {
    args: ["install", `github.com/minio/minio@${MINIO_VERSION}`],
    env: { GOBIN: join(MINIO_BIN, "..") },
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (!out.success) {
    throw new Error(`go install minio failed: ${new TextDecoder().decode(out.stderr)}`);
  }
  return MINIO_BIN;
}

/** A running MinIO with one bucket. */
export interface MinioS3 {
  server: Running;
  endpoint: string;
  port: number;
  bucket: string;
  client: S3Client;
  /** Every object key under `prefix`. */
  keys(prefix?: string): Promise<string[]>;
  /** The S3 environment of the start-up step, the lease and the backup check. */
  env(replicaPath?: string, endpoint?: string): Record<string, string>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Starts MinIO over a fresh temp dir and creates `bucket`. */
export async function startMinio(bucket = "denokv-lease"): Promise<MinioS3> {
  const bin = await ensureMinio();
  const dir = await Deno.makeTempDir({ prefix: "minio-" });
  const port = freePort();
  const child = new Deno.Command(bin, {
    args: [
      "server",
      dir,
      "--quiet",
      "--address",
      `127.0.0.1:${port}`,
      "--console-address",
      `127.0.0.1:${freePort()}`,
    ],
    env: {
      HOME: dir,
      MINIO_ROOT_USER: MINIO_CREDENTIALS.accessKeyId,
      MINIO_ROOT_PASSWORD: MINIO_CREDENTIALS.secretAccessKey,
      MINIO_BROWSER: "off",
      MINIO_UPDATE: "off",
    },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const server = new Running("minio", child, port);
  const endpoint = `http://127.0.0.1:${port}`;
  const client = new S3Client({
    endpoint,
    region: REGION,
    forcePathStyle: true,
    credentials: MINIO_CREDENTIALS,
  });
  const dispose = async () => {
    client.destroy();
    await server.stop("SIGKILL");
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  };
  try {
    await waitFor("MinIO to create the bucket", async () => {
      if (server.exited) throw new Error(`minio exited ${server.exited.code}: ${server.output}`);
      await client.send(new CreateBucketCommand({ Bucket: bucket }));
      return true;
    }, { timeoutMs: 60_000, intervalMs: 250 });
  } catch (err) {
    await dispose();
    throw err;
  }
  return {
    server,
    endpoint,
    port,
    bucket,
    client,
    keys: (prefix = "") => listKeys(client, bucket, prefix),
    env(replicaPath = "denokv", at = endpoint) {
      return {
        REPLICA_PATH: replicaPath,
        BUCKET_NAME: bucket,
        AWS_ENDPOINT_URL_S3: at,
        AWS_REGION: REGION,
        AWS_ACCESS_KEY_ID: MINIO_CREDENTIALS.accessKeyId,
        AWS_SECRET_ACCESS_KEY: MINIO_CREDENTIALS.secretAccessKey,
        S3_ADDRESSING_STYLE: "path",
      };
    },
    [Symbol.asyncDispose]: dispose,
  };
}

/** A TCP relay to a loopback port that can be cut: then it accepts but never answers. */
export interface Relay {
  url: string;
  /** Drops every open connection; later ones hang unanswered, as a lost network does. */
  cut(): void;
  /** Forwards again. */
  restore(): void;
  [Symbol.dispose](): void;
}

/** Starts a relay on a free loopback port to `127.0.0.1:targetPort`. */
export function startRelay(targetPort: number): Relay {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const open = new Set<Deno.Conn>();
  let cut = false;
  const close = (c: Deno.Conn) => {
    open.delete(c);
    try {
      c.close();
    } catch { /* closed */ }
  };
  (async () => {
    for await (const conn of listener) {
      open.add(conn);
      if (cut) continue; // held open, never read: requests time out
      (async () => {
        let upstream: Deno.Conn | undefined;
        try {
          upstream = await Deno.connect({ hostname: "127.0.0.1", port: targetPort });
          open.add(upstream);
          await Promise.all([
            conn.readable.pipeTo(upstream.writable).catch(() => {}),
            upstream.readable.pipeTo(conn.writable).catch(() => {}),
          ]);
        } catch { /* either side went away */ }
        close(conn);
        if (upstream) close(upstream);
      })();
    }
  })().catch(() => {});
  const { port } = listener.addr as Deno.NetAddr;
  return {
    url: `http://127.0.0.1:${port}`,
    cut() {
      cut = true;
      for (const c of [...open]) close(c);
    },
    restore() {
      cut = false;
      for (const c of [...open]) close(c);
    },
    [Symbol.dispose]() {
      cut = true;
      try {
        listener.close();
      } catch { /* closed */ }
      for (const c of [...open]) close(c);
    },
  };
}
