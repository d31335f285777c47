/**
 * `S3_ADDRESSING_STYLE` reaches both S3 clients: the real Litestream 0.3.13
 * running the repository's litestream.yml with the start-up step's
 * environment (its first request is caught by a loopback HTTP proxy), and the
 * backup check's `@aws-sdk/client-s3` client (its signed request is caught
 * just before it would be sent).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ListObjectsV2Command } from "@aws-sdk/client-s3";
import { litestreamEnv, loadConfig as loadStartConfig } from "../scripts/boot/start_denokv.ts";
import { loadConfig as loadCheckConfig } from "../scripts/backup_check/config.ts";
import { s3Client } from "../scripts/backup_check/replica.ts";
import { ROOT, TEST_TOKEN } from "./_helpers/processes.ts";
import { LITESTREAM_BIN } from "./_helpers/fauxqs.ts";

/** A name that never resolves: only the proxy below ever sees it. */
const ENDPOINT_HOST = "s3.style.invalid";

function envFor(style?: string): Record<string, string> {
  return {
    DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
    BUCKET_NAME: "style-bucket",
    AWS_ENDPOINT_URL_S3: `http://${ENDPOINT_HOST}`,
    AWS_REGION: "us-east-1",
    AWS_ACCESS_KEY_ID: "id",
    AWS_SECRET_ACCESS_KEY: "secret",
    REPLICA_PATH: "denokv",
    ...(style === undefined ? {} : { S3_ADDRESSING_STYLE: style }),
  };
}

/** Where a request went: the host it names and the path it asks for. */
interface Seen {
  host: string;
  path: string;
}

/**
 * Runs `litestream restore` with litestream.yml and the environment the
 * start-up step gives Litestream, through an HTTP proxy on 127.0.0.1 that
 * records the first S3 request and answers 404.
 */
async function litestreamRequest(env: Record<string, string>): Promise<Seen> {
  const seen: Seen[] = [];
  await using proxy = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => {
    const url = new URL(req.url);
    seen.push({ host: req.headers.get("host") ?? url.host, path: url.pathname });
    return new Response("<Error><Code>NoSuchBucket</Code></Error>", { status: 404 });
  });
  const dir = await Deno.makeTempDir({ prefix: "s3-style-" });
  try {
    const config = loadStartConfig({ ...env, APP_DIR: ROOT.replace(/\/$/, ""), DATA_DIR: dir });
    await new Deno.Command(LITESTREAM_BIN, {
      args: [
        "restore",
        "-config",
        config.litestreamConfig,
        "-if-replica-exists",
        "-o",
        join(dir, "out.sqlite"),
        config.dbPath,
      ],
      env: {
        ...env,
        ...litestreamEnv(config),
        LITESTREAM_ACCESS_KEY_ID: env.AWS_ACCESS_KEY_ID,
        LITESTREAM_SECRET_ACCESS_KEY: env.AWS_SECRET_ACCESS_KEY,
        HTTP_PROXY: `http://127.0.0.1:${proxy.addr.port}`,
      },
      clearEnv: true,
      stdout: "piped",
      stderr: "piped",
    }).output();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
  assert.ok(seen.length > 0, "Litestream sent no request through the proxy");
  return seen[0];
}

/** The host and path of the backup check's first listing request, caught before sending. */
async function checkClientRequest(env: Record<string, string>): Promise<Seen> {
  const config = loadCheckConfig(env);
  const client = s3Client(config.s3);
  let seen: Seen | undefined;
  client.middlewareStack.add((_next) => (args) => {
    const req = args.request as { hostname: string; path: string };
    seen = { host: req.hostname, path: req.path };
    return Promise.reject(new Error("caught"));
  }, { step: "finalizeRequest", priority: "low" });
  await assert.rejects(
    client.send(new ListObjectsV2Command({ Bucket: config.s3.bucket, Prefix: "denokv/" })),
    /caught/,
  );
  client.destroy();
  assert.ok(seen);
  return seen;
}

Deno.test("S3_ADDRESSING_STYLE=path: Litestream and the backup check put the bucket in the path", async () => {
  const env = envFor("path");
  const litestream = await litestreamRequest(env);
  assert.equal(litestream.host, ENDPOINT_HOST);
  assert.match(litestream.path, /^\/style-bucket\/?$/);
  const check = await checkClientRequest(env);
  assert.equal(check.host, ENDPOINT_HOST);
  assert.match(check.path, /^\/style-bucket\/?$/);
});

Deno.test("S3_ADDRESSING_STYLE unset: both default to virtual-hosted (bucket in the host name)", async () => {
  for (const env of [envFor(undefined), envFor("virtual")]) {
    const litestream = await litestreamRequest(env);
    assert.equal(litestream.host, `style-bucket.${ENDPOINT_HOST}`);
    assert.equal(litestream.path, "/");
    const check = await checkClientRequest(env);
    assert.equal(check.host, `style-bucket.${ENDPOINT_HOST}`);
    assert.equal(check.path, "/");
  }
});

Deno.test("S3_ADDRESSING_STYLE: a value other than path or virtual is refused by both readers", () => {
  const env = envFor("dns");
  assert.throws(
    () => loadStartConfig(env),
    /"S3_ADDRESSING_STYLE" must be "path" or "virtual": got "dns"/,
  );
  assert.throws(
    () => loadCheckConfig(env),
    /"S3_ADDRESSING_STYLE" must be "path" or "virtual": got "dns"/,
  );
});
