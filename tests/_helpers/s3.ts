/**
 * Starts the fauxqs S3 emulator (npm) on a free loopback port for end-to-end
 * tests, with a bucket created, and gives an `@aws-sdk/client-s3` client on it.
 */
import { join } from "node:path";
import { CreateBucketCommand, ListObjectsV2Command, S3Client } from "@aws-sdk/client-s3";
import { freePort, ROOT, Running, waitFor } from "./processes.ts";

/** Credentials fauxqs accepts (it does not check them). */
export const S3_CREDENTIALS = { accessKeyId: "test-key-id", secretAccessKey: "test-secret-key" };
/** The region the tests use. */
export const S3_REGION = "us-east-1";

/** A running fauxqs with one bucket. */
export interface FauxS3 {
  server: Running;
  endpoint: string;
  bucket: string;
  client: S3Client;
  /** Every object key under `prefix`. */
  keys(prefix?: string): Promise<string[]>;
  /** The environment Litestream and the start-up step read to reach this bucket. */
  env(replicaPath?: string): Record<string, string>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Every key in `bucket` under `prefix`, across pages. */
export async function listKeys(client: S3Client, bucket: string, prefix = ""): Promise<string[]> {
  const keys: string[] = [];
  let token: string | undefined;
  do {
    const page = await client.send(
      new ListObjectsV2Command({ Bucket: bucket, Prefix: prefix, ContinuationToken: token }),
    );
    for (const o of page.Contents ?? []) if (o.Key) keys.push(o.Key);
    token = page.IsTruncated ? page.NextContinuationToken : undefined;
  } while (token);
  return keys;
}

/** Starts fauxqs with `node` from PATH and creates `bucket`. */
export async function startFauxS3(bucket = "denokv-test"): Promise<FauxS3> {
  const port = freePort();
  const child = new Deno.Command("node", {
    // fauxqs's own CLI forces request logging on; start it quietly through its API.
    args: [
      "--input-type=module",
      "-e",
      `import { startFauxqs } from ${JSON.stringify(join(ROOT, "node_modules/fauxqs/dist/app.js"))};
       await startFauxqs({ port: ${port}, logger: false });`,
    ],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const server = new Running("fauxqs", child, port);
  const endpoint = `http://127.0.0.1:${port}`;
  const client = new S3Client({
    endpoint,
    region: S3_REGION,
    forcePathStyle: true,
    credentials: S3_CREDENTIALS,
  });
  try {
    await waitFor("fauxqs to create the bucket", async () => {
      const status = await Promise.race([server.done, Promise.resolve(null)]);
      if (status) throw new Error(`fauxqs exited ${status.code}: ${server.output}`);
      await client.send(new CreateBucketCommand({ Bucket: bucket }));
      return true;
    }, { timeoutMs: 30_000, intervalMs: 200 });
  } catch (err) {
    await server.stop("SIGKILL");
    throw err;
  }
  return {
    server,
    endpoint,
    bucket,
    client,
    keys: (prefix = "") => listKeys(client, bucket, prefix),
    env(replicaPath = "denokv") {
      return {
        BUCKET_NAME: bucket,
        AWS_ENDPOINT_URL_S3: endpoint,
        AWS_REGION: S3_REGION,
        AWS_ACCESS_KEY_ID: S3_CREDENTIALS.accessKeyId,
        AWS_SECRET_ACCESS_KEY: S3_CREDENTIALS.secretAccessKey,
        REPLICA_PATH: replicaPath,
        // fauxqs serves buckets under its address only: no virtual-hosted names on 127.0.0.1.
        S3_ADDRESSING_STYLE: "path",
      };
    },
    async [Symbol.asyncDispose]() {
      client.destroy();
      await server.stop("SIGKILL");
    },
  };
}
