/**
 * Unit tests of the start-up step (scripts/boot/start_denokv.ts): configuration
 * checks, the restore decisions, and `prepare()` against the real Litestream
 * with a local-folder replica.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import {
  decideAfterRestore,
  decideStart,
  loadConfig,
  MARKER_FILE,
  prepare,
  replicateCommand,
  type StartConfig,
} from "../scripts/boot/start_denokv.ts";
import { ROOT, TEST_TOKEN } from "./_helpers/processes.ts";

const LITESTREAM = join(ROOT, "node_modules/@flydotio/litestream-linux-x64/litestream");

const S3_ENV = {
  DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
  BUCKET_NAME: "bucket",
  AWS_ENDPOINT_URL_S3: "https://fly.storage.tigris.dev",
  AWS_REGION: "auto",
  AWS_ACCESS_KEY_ID: "id",
  AWS_SECRET_ACCESS_KEY: "secret",
};

Deno.test("loadConfig() applies the documented defaults for S3", () => {
  const config = loadConfig(S3_ENV);
  assert.equal(config.appDir, "/app");
  assert.equal(config.dataDir, "/data");
  assert.equal(config.dbPath, "/data/denokv.sqlite");
  assert.equal(config.denokvAddr, "127.0.0.1:4513");
  assert.equal(config.litestreamConfig, "/app/litestream.yml");
  assert.deepEqual(config.replica, {
    kind: "s3",
    bucket: "bucket",
    path: "denokv",
    endpoint: "https://fly.storage.tigris.dev",
    region: "auto",
    addressingStyle: "virtual",
  });
  assert.equal(config.requireReplica, false);
});

Deno.test("loadConfig() rejects a short token and says its length", () => {
  assert.throws(
    () => loadConfig({ ...S3_ENV, DENO_KV_ACCESS_TOKEN: "short" }),
    /DENO_KV_ACCESS_TOKEN must be at least 12 characters: got 5/,
  );
});

Deno.test("loadConfig() accepts any printable token and rejects a control character", () => {
  loadConfig({ ...S3_ENV, DENO_KV_ACCESS_TOKEN: "tok:en!#$ with spaces~" });
  assert.throws(
    () => loadConfig({ ...S3_ENV, DENO_KV_ACCESS_TOKEN: "token\nwith-newline" }),
    /DENO_KV_ACCESS_TOKEN must be printable ASCII .* character 6 of 18/,
  );
});

Deno.test("prepare() retries while the replica cannot be reached, then gives up after maxAttempts", async () => {
  const dir = await Deno.makeTempDir({ prefix: "start-denokv-test-" });
  try {
    const config = await localConfig(dir);
    await Deno.mkdir(join(dir, "replica"));
    await Deno.writeTextFile(join(dir, "replica", "generations"), "not a folder");
    const lines: string[] = [];
    await assert.rejects(
      prepare(config, (l) => lines.push(l), { maxAttempts: 3, firstDelayMs: 10 }),
      /restore failed/,
    );
    assert.equal(
      lines.filter((l) => /restore failed \(attempt \d\), retrying in/.test(l)).length,
      2,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loadConfig() names every missing or empty S3 variable", () => {
  assert.throws(
    () => loadConfig({ ...S3_ENV, AWS_REGION: "", AWS_SECRET_ACCESS_KEY: undefined }),
    /S3 replication needs AWS_REGION, AWS_SECRET_ACCESS_KEY/,
  );
  // Nothing set and no local folder: production without a bucket must not start.
  assert.throws(
    () => loadConfig({ DENO_KV_ACCESS_TOKEN: TEST_TOKEN }),
    /S3 replication needs BUCKET_NAME, AWS_ENDPOINT_URL_S3/,
  );
});

Deno.test("loadConfig() uses a local-folder replica only when LOCAL_REPLICA_DIR is set and no bucket", () => {
  const config = loadConfig({
    DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
    DATA_DIR: "/tmp/d",
    LOCAL_REPLICA_DIR: "/tmp/r",
    DENOKV_URL: "http://127.0.0.1:9999",
  });
  assert.deepEqual(config.replica, { kind: "file", dir: "/tmp/r" });
  assert.equal(config.litestreamConfig, "/tmp/d/.litestream-local.yml");
  assert.equal(config.denokvAddr, "127.0.0.1:9999");
  // A partly configured bucket wins over the local folder, and fails.
  assert.throws(
    () =>
      loadConfig({ DENO_KV_ACCESS_TOKEN: TEST_TOKEN, LOCAL_REPLICA_DIR: "/r", BUCKET_NAME: "b" }),
    /S3 replication needs AWS_ENDPOINT_URL_S3/,
  );
});

Deno.test("loadConfig() rejects paths that would break Litestream's -exec string", () => {
  assert.throws(
    () => loadConfig({ ...S3_ENV, DB_PATH: "/data/my db.sqlite" }),
    /DB_PATH must not contain spaces, quotes or "\$": got "\/data\/my db.sqlite"/,
  );
  assert.throws(() => loadConfig({ ...S3_ENV, DATA_DIR: "data" }), /DATA_DIR must be an absolute/);
  assert.throws(() => loadConfig({ ...S3_ENV, DENOKV_URL: "nope" }), /DENOKV_URL must be a URL/);
  assert.throws(() => loadConfig({ ...S3_ENV, REPLICA_PATH: "/x" }), /REPLICA_PATH must not/);
});

Deno.test("decideStart() restores only when the database file is missing", () => {
  assert.equal(decideStart({ dbExists: true, markerExists: true }).action, "replicate");
  assert.equal(decideStart({ dbExists: false, markerExists: false }).action, "restore");
  assert.match(decideStart({ dbExists: false, markerExists: true }).reason, /says one lived here/);
});

Deno.test("decideAfterRestore() refuses an empty start when a replica was expected", () => {
  const base = { restored: false, markerExists: false, requireReplica: false };
  assert.deepEqual(decideAfterRestore({ ...base, restored: true }), { ok: true, fresh: false });
  assert.deepEqual(decideAfterRestore(base), { ok: true, fresh: true });
  const marker = decideAfterRestore({ ...base, markerExists: true });
  assert.equal(marker.ok, false);
  assert.match(!marker.ok ? marker.reason : "", /refusing to start an empty one/);
  const required = decideAfterRestore({ ...base, requireReplica: true });
  assert.match(!required.ok ? required.reason : "", /REQUIRE_REPLICA is set/);
});

Deno.test("replicateCommand() runs denokv under litestream and never puts the token in argv", () => {
  const argv = replicateCommand(loadConfig(S3_ENV));
  assert.deepEqual(argv, [
    "env",
    "DB_PATH=/data/denokv.sqlite",
    "DATA_DIR=/data",
    "LITESTREAM_ADDR=127.0.0.1:4514",
    "REPLICA_PATH=denokv",
    "S3_FORCE_PATH_STYLE=false",
    "litestream",
    "replicate",
    "-config",
    "/app/litestream.yml",
    "-exec",
    "setpriv --pdeathsig KILL denokv --sqlite-path /data/denokv.sqlite serve --addr 127.0.0.1:4513",
  ]);
  assert.ok(!argv.join(" ").includes(TEST_TOKEN));
});

async function localConfig(dir: string, extra: Record<string, string> = {}): Promise<StartConfig> {
  await Deno.mkdir(join(dir, "data"), { recursive: true });
  return loadConfig({
    DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
    APP_DIR: ROOT,
    DATA_DIR: join(dir, "data"),
    LOCAL_REPLICA_DIR: join(dir, "replica"),
    LITESTREAM_BIN: LITESTREAM,
    ...extra,
  });
}

Deno.test("prepare() starts fresh on an empty replica, writes the marker and removes stray -wal/-shm", async () => {
  const dir = await Deno.makeTempDir({ prefix: "start-denokv-test-" });
  try {
    const config = await localConfig(dir);
    await Deno.writeTextFile(config.dbPath + "-wal", "stale");
    await Deno.writeTextFile(config.dbPath + "-shm", "stale");
    const lines: string[] = [];
    const argv = await prepare(config, (l) => lines.push(l));
    assert.ok(!existsSync(config.dbPath + "-wal"));
    assert.ok(!existsSync(config.dbPath + "-shm"));
    assert.ok(existsSync(join(config.dataDir, MARKER_FILE)));
    assert.ok(lines.some((l) => /replicating to the local folder/.test(l)), lines.join("\n"));
    assert.ok(lines.some((l) => /no replica yet: starting a new database/.test(l)));
    assert.equal(
      argv.at(-1),
      `setpriv --pdeathsig KILL denokv --sqlite-path ${config.dbPath} serve --addr 127.0.0.1:4513`,
    );
    const yml = await Deno.readTextFile(config.litestreamConfig);
    assert.match(yml, /type: file/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("prepare() fails closed when the marker exists but the replica is empty", async () => {
  const dir = await Deno.makeTempDir({ prefix: "start-denokv-test-" });
  try {
    const config = await localConfig(dir);
    await Deno.writeTextFile(join(config.dataDir, MARKER_FILE), "{}\n");
    await assert.rejects(prepare(config, () => {}), /refusing to start an empty one/);
    assert.ok(!existsSync(config.dbPath), "an empty database was created");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("prepare() fails closed with REQUIRE_REPLICA and no replica", async () => {
  const dir = await Deno.makeTempDir({ prefix: "start-denokv-test-" });
  try {
    const config = await localConfig(dir, { REQUIRE_REPLICA: "1" });
    await assert.rejects(prepare(config, () => {}), /REQUIRE_REPLICA is set/);
    assert.ok(!existsSync(config.dbPath));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("prepare() fails closed when Litestream cannot run the restore", async () => {
  const dir = await Deno.makeTempDir({ prefix: "start-denokv-test-" });
  try {
    const config = await localConfig(dir);
    // A replica whose generations folder is a file: Litestream's restore errors out.
    await Deno.mkdir(join(dir, "replica"));
    await Deno.writeTextFile(join(dir, "replica", "generations"), "not a folder");
    await assert.rejects(
      prepare(config, () => {}, { maxAttempts: 1 }),
      /restore failed \(litestream exited 1\); denokv not started: .*not a directory/s,
    );
    assert.ok(!existsSync(config.dbPath));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
