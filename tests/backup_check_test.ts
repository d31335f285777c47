/**
 * End-to-end tests of scripts/backup_check/backup_check.ts as a real subprocess: the denokv
 * stand-in, real Litestream replicating to fauxqs, and an SMTP capture server.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { PutObjectCommand } from "@aws-sdk/client-s3";
import { type BackupFixture, LITESTREAM_BIN, startBackupFixture } from "./_helpers/fauxqs.ts";
import { startSmtpCapture } from "./_helpers/smtp.ts";
import { freePort } from "./_helpers/processes.ts";
import { type CheckRecord, readLatest } from "../scripts/backup_check/history.ts";
import { loadConfig } from "../scripts/backup_check/config.ts";
import { compareDatabases } from "../scripts/backup_check/compare.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
/** Short enough to keep the failing cases quick, long enough for a 500 ms sync interval. */
const CANARY_TIMEOUT_MS = "5000";

async function seed(kv: Deno.Kv): Promise<void> {
  let atomic = kv.atomic();
  for (let i = 0; i < 200; i++) {
    atomic.set(["user", i], { name: `user ${i}`, padding: "x".repeat(200) });
    if (i % 50 === 49) {
      await atomic.commit();
      atomic = kv.atomic();
    }
  }
}

/** What must hold after every run: no temp dir left, $DB_PATH never replaced or joined by restore files. */
interface Before {
  ino: number | null;
  files: string[];
}

async function dataFiles(dataDir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(dataDir)) {
    if (e.name === "reports" || e.name.startsWith("backup-checks.jsonl")) continue;
    names.push(e.name);
  }
  return names.sort();
}

async function before(fx: BackupFixture): Promise<Before> {
  return { ino: (await Deno.stat(fx.dbPath)).ino, files: await dataFiles(fx.dataDir) };
}

async function assertCleanAfter(fx: BackupFixture, was: Before): Promise<void> {
  const left = [];
  for await (const e of Deno.readDir(fx.tmpDir)) left.push(e.name);
  assert.deepEqual(left, [], "the check's temp directory must be removed");
  assert.equal((await Deno.stat(fx.dbPath)).ino, was.ino, "$DB_PATH must be the same file");
  assert.deepEqual(await dataFiles(fx.dataDir), was.files, "nothing restored next to $DB_PATH");
}

/** A dead-man's-switch endpoint that counts its pings. */
function startHeartbeat(): { url: string; pings: () => number } & AsyncDisposable {
  let pings = 0;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, () => {
    pings++;
    return new Response("ok");
  });
  return {
    url: `http://127.0.0.1:${server.addr.port}/ping`,
    pings: () => pings,
    async [Symbol.asyncDispose]() {
      await server.shutdown();
    },
  };
}

async function overwriteWithGarbage(fx: BackupFixture, part: "snapshots" | "wal"): Promise<void> {
  const keys = (await fx.s3.keys("denokv/")).filter((k) => k.includes(`/${part}/`));
  assert.ok(keys.length > 0, `the replica has ${part} objects`);
  for (const key of keys) {
    await fx.s3.client.send(
      new PutObjectCommand({
        Bucket: fx.s3.bucket,
        Key: key,
        Body: crypto.getRandomValues(new Uint8Array(4096)),
      }),
    );
  }
}

async function latest(fx: BackupFixture): Promise<CheckRecord> {
  const record = await readLatest(fx.dataDir);
  assert.ok(record, "a history line is written");
  return record;
}

Deno.test(
  "backup check: a healthy stack PASSES with one e-mail naming canary, integrity, restore time and replica age",
  opts,
  async () => {
    await using fx = await startBackupFixture(seed);
    await using smtp = await startSmtpCapture();
    await using heartbeat = startHeartbeat();
    const was = await before(fx);
    const run = await fx.runCheck({ ...smtp.env(), HEARTBEAT_URL: heartbeat.url });
    assert.equal(run.code, 0, run.stderr);
    assert.equal(heartbeat.pings(), 1, "the heartbeat is pinged on PASS");
    assert.equal(smtp.messages.length, 1);
    const [mail] = smtp.messages;
    const record = await latest(fx);
    assert.equal(record.status, "PASSED");
    assert.equal(record.delivery, "email");
    assert.match(mail.subject, /PASSED/);
    assert.match(mail.subject, /backup-test-app/);
    assert.match(mail.subject, new RegExp(record.startedAt.slice(0, 10)));
    assert.equal(mail.to, "owner@example.test");
    for (const body of [mail.text, mail.html]) {
      assert.ok(body.includes(record.canaryId), "the canary id is named");
      assert.match(body, /quick_check ok, integrity_check ok/);
      assert.match(body, /restored [\d.]+ MB in [\d.]+ s/);
      assert.match(body, /replica age \d+ (s|min|h)/);
    }
    assert.match(mail.text, /201 entries restored, 201 live/);
    await assertCleanAfter(fx, was);
  },
);

Deno.test(
  "backup check: a snapshot overwritten with garbage in the bucket FAILS at the restore step",
  opts,
  async () => {
    await using fx = await startBackupFixture(seed);
    await using smtp = await startSmtpCapture();
    await overwriteWithGarbage(fx, "snapshots");
    const was = await before(fx);
    const run = await fx.runCheck(smtp.env());
    assert.equal(run.code, 1, run.stderr);
    assert.equal(smtp.messages.length, 1);
    const [mail] = smtp.messages;
    assert.match(mail.subject, /FAILED/);
    assert.match(mail.subject, /failed: restore/);
    assert.match(mail.text, /FAIL\s+restore\s.*litestream restore failed/);
    assert.equal((await latest(fx)).failedStep, "restore");
    await assertCleanAfter(fx, was);
  },
);

Deno.test(
  "backup check: a WAL segment overwritten with garbage in the bucket FAILS at the restore step",
  opts,
  async () => {
    await using fx = await startBackupFixture(seed);
    await using smtp = await startSmtpCapture();
    await overwriteWithGarbage(fx, "wal");
    const was = await before(fx);
    const run = await fx.runCheck(smtp.env());
    assert.equal(run.code, 1, run.stderr);
    assert.equal(smtp.messages.length, 1);
    assert.match(smtp.messages[0].subject, /FAILED.*failed: restore/);
    assert.equal((await latest(fx)).failedStep, "restore");
    await assertCleanAfter(fx, was);
  },
);

Deno.test(
  "backup check: a restore that fails once with a transient error is retried and PASSES",
  opts,
  async () => {
    await using fx = await startBackupFixture(seed);
    // A litestream that fails its first call the way a dropped connection would, then is itself.
    const marker = join(fx.dir, "failed-once");
    const flaky = join(fx.dir, "flaky-litestream");
    await Deno.writeTextFile(
      flaky,
      `#!/usr/bin/env bash\nset -euo pipefail\nif [ ! -e ${JSON.stringify(marker)} ]; then\n` +
        `  touch ${
          JSON.stringify(marker)
        }\n  echo "read: connection reset by peer" >&2\n  exit 1\nfi\n` +
        `exec ${JSON.stringify(LITESTREAM_BIN)} "$@"\n`,
    );
    await Deno.chmod(flaky, 0o755);
    const was = await before(fx);
    const run = await fx.runCheck({ LITESTREAM_BIN: flaky });
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stdout, /OK\s+restore\s.*\(attempt 2\)/);
    await assertCleanAfter(fx, was);
  },
);

Deno.test(
  "backup check: an unreachable denokv FAILS at the canary step within its bounds",
  opts,
  async () => {
    await using fx = await startBackupFixture(seed);
    const was = await before(fx);
    const started = Date.now();
    const run = await fx.runCheck({ DENOKV_URL: `http://127.0.0.1:${freePort()}` });
    assert.equal(run.code, 1, run.stderr);
    assert.ok(Date.now() - started < 60_000, "bounded");
    assert.match(run.stdout, /FAIL\s+canary\s/);
    assert.equal((await latest(fx)).failedStep, "canary");
    await assertCleanAfter(fx, was);
  },
);

Deno.test("backup check: a missing replica (wrong prefix) FAILS", opts, async () => {
  await using fx = await startBackupFixture(seed);
  await using smtp = await startSmtpCapture();
  const was = await before(fx);
  const run = await fx.runCheck({
    ...smtp.env(),
    REPLICA_PATH: "no-such-prefix",
    CANARY_TIMEOUT_MS,
  });
  assert.equal(run.code, 1, run.stderr);
  assert.equal(smtp.messages.length, 1);
  const [mail] = smtp.messages;
  assert.match(mail.subject, /FAILED/);
  assert.match(mail.text, /FAIL\s+restore\s/);
  assert.match(mail.text, /FAIL\s+replica\s.*no usable replica/);
  const record = await latest(fx);
  assert.equal(record.status, "FAILED");
  assert.ok(record.checks.filter((c) => !c.ok).length >= 3, JSON.stringify(record.checks));
  await assertCleanAfter(fx, was);
});

Deno.test(
  "backup check: with replication stopped the canary never reaches the replica and the check FAILS naming it",
  opts,
  async () => {
    await using fx = await startBackupFixture(seed);
    await using smtp = await startSmtpCapture();
    await using heartbeat = startHeartbeat();
    await fx.stopReplication();
    const was = await before(fx);
    const run = await fx.runCheck({
      ...smtp.env(),
      CANARY_TIMEOUT_MS,
      HEARTBEAT_URL: heartbeat.url,
    });
    assert.equal(run.code, 1, run.stderr);
    assert.equal(heartbeat.pings(), 0, "no heartbeat on FAIL");
    assert.equal(smtp.messages.length, 1);
    const [mail] = smtp.messages;
    const record = await latest(fx);
    assert.equal(record.failedStep, "canary");
    assert.match(mail.subject, /FAILED.*failed: canary/);
    assert.ok(
      mail.text.includes(`canary ${record.canaryId} did not reach the replica within 5 s`),
      mail.text,
    );
    // The old replica still restores, but without tonight's canary.
    assert.match(mail.text, /OK\s+restore\s/);
    assert.ok(mail.text.includes(`canary ${record.canaryId} missing from the restored copy`));
    await assertCleanAfter(fx, was);
  },
);

Deno.test(
  "backup check: an unreachable SMTP server exits 2, saves the report under $DATA_DIR/reports/ and says why on stderr",
  opts,
  async () => {
    await using fx = await startBackupFixture(seed);
    const was = await before(fx);
    const port = freePort();
    const run = await fx.runCheck({
      SMTP_HOST: "127.0.0.1",
      SMTP_PORT: String(port),
      SMTP_FROM: "backup@example.test",
      ALERT_EMAIL: "owner@example.test",
    });
    assert.equal(run.code, 2, run.stderr);
    assert.match(
      run.stderr,
      new RegExp(`could not e-mail the report via 127\\.0\\.0\\.1:${port}: .*ECONNREFUSED`),
    );
    const reports = [];
    for await (const e of Deno.readDir(join(fx.dataDir, "reports"))) reports.push(e.name);
    const text = reports.find((n) => n.endsWith(".txt"));
    assert.ok(text, `a text report is saved: ${reports}`);
    const saved = await Deno.readTextFile(join(fx.dataDir, "reports", text));
    assert.match(saved, /^Subject: .*Backup check PASSED/);
    assert.ok(run.stderr.includes(join(fx.dataDir, "reports", text)));
    const record = await latest(fx);
    assert.equal(record.delivery, "undelivered");
    await assertCleanAfter(fx, was);
  },
);

Deno.test(
  "backup check: without SMTP_HOST the report is printed and saved, and history keeps one line per run",
  opts,
  async () => {
    await using fx = await startBackupFixture(seed);
    const first = await fx.runCheck();
    assert.equal(first.code, 0, first.stderr);
    assert.match(first.stdout, /^Subject: \[backup-test-app\] Backup check PASSED/);
    const second = await fx.runCheck();
    assert.equal(second.code, 0, second.stderr);
    const lines = (await Deno.readTextFile(join(fx.dataDir, "backup-checks.jsonl"))).trim().split(
      "\n",
    );
    assert.equal(lines.length, 2);
    const ids = lines.map((l) => (JSON.parse(l) as CheckRecord).canaryId);
    assert.notEqual(ids[0], ids[1]);
    assert.equal((await latest(fx)).delivery, "file");
  },
);

Deno.test("loadConfig() applies the DESIGN.md defaults and rejects a short token", () => {
  const base = {
    DENO_KV_ACCESS_TOKEN: "a-long-enough-token",
    BUCKET_NAME: "bucket",
    AWS_ENDPOINT_URL_S3: "https://fly.storage.tigris.dev",
    AWS_ACCESS_KEY_ID: "id",
    AWS_SECRET_ACCESS_KEY: "secret",
  };
  const config = loadConfig(base);
  assert.equal(config.denokvUrl, "http://127.0.0.1:4513");
  assert.equal(config.dbPath, "/data/denokv.sqlite");
  assert.equal(config.s3.replicaPath, "denokv");
  assert.equal(config.smtp, undefined);
  assert.equal(loadConfig({ ...base, FLY_APP_NAME: "my-app" }).appName, "my-app");
  assert.equal(loadConfig({ ...base, DATA_DIR: "/d" }).dbPath, "/d/denokv.sqlite");
  assert.throws(
    () => loadConfig({ ...base, DENO_KV_ACCESS_TOKEN: "short" }),
    /"DENO_KV_ACCESS_TOKEN" must be at least 12 characters: got 5/,
  );
  assert.throws(() => loadConfig({ ...base, SMTP_HOST: "smtp" }), /"SMTP_FROM" must be set/);
  assert.throws(() => loadConfig({ ...base, BUCKET_NAME: "" }), /"BUCKET_NAME" must be set/);
});

Deno.test("compareDatabases() streams two denokv files and counts missing, extra and changed entries", async () => {
  const dir = await Deno.makeTempDir({ prefix: "compare-" });
  try {
    const restoredPath = join(dir, "restored.sqlite");
    const livePath = join(dir, "live.sqlite");
    const restored = await Deno.openKv(restoredPath);
    for (let i = 0; i < 300; i++) await restored.set(["k", i], i);
    await restored.set(["expired"], 1, { expireIn: 1 });
    restored.close();
    await Deno.copyFile(restoredPath, livePath);
    const live = await Deno.openKv(livePath);
    for (let i = 0; i < 10; i++) await live.delete(["k", i]); // extra in the copy
    for (let i = 0; i < 5; i++) await live.set(["new", i], i); // missing from the copy
    for (let i = 100; i < 107; i++) await live.set(["k", i], -i); // changed since
    live.close();
    await new Promise((r) => setTimeout(r, 5));
    assert.deepEqual(compareDatabases(restoredPath, livePath), {
      restored: 300,
      live: 295,
      missing: 5,
      extra: 10,
      changed: 7,
    });
    assert.deepEqual(compareDatabases(livePath, livePath), {
      restored: 295,
      live: 295,
      missing: 0,
      extra: 0,
      changed: 0,
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
