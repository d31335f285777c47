/**
 * Point-in-time restore and rollback (`scripts/restore/`) on a real stack:
 * supervisord runs Litestream and denokv as in the image, fauxqs is the bucket,
 * and the commands run as `deno task restore|rollback` with the machine's
 * environment.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { openRemoteKv, waitFor } from "./_helpers/processes.ts";
import { type FauxS3, startFauxS3 } from "./_helpers/s3.ts";
import { startSupervised, type SupervisedStack } from "./_helpers/supervised.ts";
import { loadRollbackConfig, rollback } from "../scripts/restore/rollback.ts";
import { planRestore } from "../scripts/restore/restore_at.ts";
import { parseTable, rangeFromTables } from "../scripts/restore/replica_range.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Writes `key` through the proxy and waits until a new WAL segment holds it in the bucket. */
async function writeReplicated(
  s3: FauxS3,
  prefix: string,
  stack: SupervisedStack,
  key: string,
): Promise<Date> {
  const before = new Set(await s3.keys(`${prefix}/`));
  const kv = await openRemoteKv(stack.url);
  const at = new Date();
  try {
    assert((await kv.set(["pitr", key], `value ${key}`)).ok);
  } finally {
    kv.close();
  }
  await waitFor(`${key} to reach the bucket`, async () => {
    const keys = await s3.keys(`${prefix}/`);
    return keys.some((k) => !before.has(k) && /\/(wal|snapshots)\//.test(k));
  }, { timeoutMs: 30_000, intervalMs: 100 }).catch((err) => {
    throw new Error(`${err.message}\n--- supervisord output ---\n${stack.supervisord.output}`);
  });
  return at;
}

/** Waits for Litestream's first snapshot, so later writes land as WAL segments of it. */
async function waitFirstSnapshot(s3: FauxS3, prefix: string): Promise<void> {
  await waitFor(
    "Litestream's first snapshot",
    async () => (await s3.keys(`${prefix}/`)).some((k) => k.includes("/snapshots/")),
    {
      timeoutMs: 30_000,
      intervalMs: 200,
    },
  );
}

/** Writes A, waits, notes a time, waits, writes B; returns the times. */
async function writeAThenB(s3: FauxS3, prefix: string, stack: SupervisedStack) {
  await waitFirstSnapshot(s3, prefix);
  const aAt = await writeReplicated(s3, prefix, stack, "A");
  // Litestream's times are whole seconds: keep two of them on each side of `between`.
  await sleep(2_200);
  const between = new Date();
  await sleep(2_200);
  const bAt = await writeReplicated(s3, prefix, stack, "B");
  return { aAt, between, bAt };
}

/** The values under ["pitr"] of a KV (file path or URL). */
async function pitrValues(kv: Deno.Kv): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  for await (const e of kv.list({ prefix: ["pitr"] })) out[String(e.key[1])] = e.value;
  return out;
}

async function valuesInFile(path: string): Promise<Record<string, unknown>> {
  const kv = await Deno.openKv(path);
  try {
    return await pitrValues(kv);
  } finally {
    kv.close();
  }
}

Deno.test({
  name: "restore --list shows a range holding A and B; restore --at between them gives A without B",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "restore-test-" });
    try {
      await using stack = await startSupervised(s3, {
        dataDir: join(dir, "data"),
        replicaPath: "pitr",
      });
      const { aAt, between, bAt } = await writeAThenB(s3, "pitr", stack);

      const list = await stack.task("restore", ["--list"]);
      assert.equal(list.code, 0, list.stderr);
      const m = /restorable from (\S+) to (\S+)/.exec(list.stdout);
      assert(m, list.stdout);
      const [oldest, newest] = [new Date(m[1]), new Date(m[2])];
      assert(oldest <= aAt, `oldest ${m[1]} is after A was written (${aAt.toISOString()})`);
      // Times are whole seconds: B's segment was uploaded in B's second or later.
      assert(
        newest.getTime() >= Math.floor(bAt.getTime() / 1000) * 1000,
        `newest ${m[2]} is before B was written (${bAt.toISOString()})\n${list.stdout}`,
      );

      const copy = join(dir, "at-between.sqlite");
      const res = await stack.task("restore", ["--at", between.toISOString(), "--to", copy]);
      assert.equal(res.code, 0, res.stderr);
      assert.match(res.stdout, /restored the state at .* entries, quick_check ok/);
      assert.deepEqual(await valuesInFile(copy), { A: "value A" });

      // A time after the last upload is the latest state: A and B.
      await sleep(1_100);
      const latest = join(dir, "latest.sqlite");
      const res2 = await stack.task("restore", ["--at", new Date().toISOString(), "--to", latest]);
      assert.equal(res2.code, 0, res2.stderr);
      assert.deepEqual(await valuesInFile(latest), { A: "value A", B: "value B" });

      // Before the first snapshot there is nothing to restore, and nothing is written.
      const early = join(dir, "early.sqlite");
      const res3 = await stack.task("restore", ["--at", "2001-01-01T00:00:00Z", "--to", early]);
      assert.equal(res3.code, 1);
      assert.match(res3.stderr, /nothing restorable at 2001-01-01T00:00:00.000Z/);
      assert(!(await Deno.stat(early).then(() => true, () => false)));
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name:
    "rollback --at on a running stack serves A without B, keeps replicating, keeps the old file",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "rollback-test-" });
    try {
      await using stack = await startSupervised(s3, {
        dataDir: join(dir, "data"),
        replicaPath: "rollback",
      });
      const { between } = await writeAThenB(s3, "rollback", stack);

      const res = await stack.task("rollback", ["--at", between.toISOString()]);
      assert.equal(res.code, 0, `${res.stdout}\n${res.stderr}\n${stack.supervisord.output}`);
      assert.match(res.stderr, /stopped denokv/);
      const down = /answers again ([\d.]+) s after the stop/.exec(res.stderr);
      assert(down, res.stderr);
      console.log(`figure: rollback downtime (stop to denokv answering) ${down[1]} s`);
      assert.match(res.stdout, /previous database is kept in (\S+);/);
      const kept = /kept in (\S+);/.exec(res.stdout)![1];

      // The stack serves the state at `between`.
      let kv = await openRemoteKv(stack.url);
      try {
        assert.deepEqual(await pitrValues(kv), { A: "value A" });
        // A write after the rollback reaches the replica.
        assert((await kv.set(["pitr", "C"], "value C")).ok);
      } finally {
        kv.close();
      }
      // The previous file is kept, with B in it.
      assert.deepEqual(await valuesInFile(join(kept, "denokv.sqlite")), {
        A: "value A",
        B: "value B",
      });
      // The latest state in the bucket (a new generation) has A and C, not B.
      let restored: Record<string, unknown> = {};
      await waitFor("C to be restorable from the bucket", async () => {
        await sleep(1_100);
        const copy = join(dir, `after-${Date.now()}.sqlite`);
        const r = await stack.task("restore", ["--at", new Date().toISOString(), "--to", copy]);
        if (r.code !== 0) throw new Error(r.stderr);
        restored = await valuesInFile(copy);
        return "C" in restored;
      }, { timeoutMs: 60_000, intervalMs: 100 });
      assert.deepEqual(restored, { A: "value A", C: "value C" });
      kv = await openRemoteKv(stack.url);
      try {
        assert.deepEqual(await pitrValues(kv), { A: "value A", C: "value C" });
      } finally {
        kv.close();
      }
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test("rollback refuses before stopping anything when the volume has no room for a copy", async () => {
  const dir = await Deno.makeTempDir({ prefix: "rollback-room-" });
  try {
    const dbPath = join(dir, "denokv.sqlite");
    // A sparse file far larger than any test disk's free space.
    const file = await Deno.create(dbPath);
    await file.truncate(1024 ** 4);
    file.close();
    const config = loadRollbackConfig({
      DENO_KV_ACCESS_TOKEN: "a-long-enough-token",
      DB_PATH: dbPath,
      DATA_DIR: dir,
      BUCKET_NAME: "b",
      AWS_ENDPOINT_URL_S3: "http://127.0.0.1:9",
      AWS_ACCESS_KEY_ID: "id",
      AWS_SECRET_ACCESS_KEY: "secret",
      // Anything that ran supervisorctl or litestream would fail differently.
      SUPERVISORCTL_BIN: join(dir, "no-supervisorctl"),
      LITESTREAM_BIN: join(dir, "no-litestream"),
    });
    await assert.rejects(
      rollback(config, new Date()),
      /not enough room on .* for a second copy: .* nothing was stopped/,
    );
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["denokv.sqlite"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("planRestore passes a time inside a generation on, restores the latest after it", () => {
  const range = rangeFromTables(
    parseTable(`replica  generation  index  size  created
s3  g1  0  100  2026-01-01T10:00:00Z
s3  g2  0  100  2026-01-01T12:00:00Z`),
    parseTable(`replica  generation  index  offset  size  created
s3  g1  0  0  10  2026-01-01T10:00:01Z
s3  g1  1  0  10  2026-01-01T11:00:00Z
s3  g2  0  0  10  2026-01-01T12:30:00Z`),
  );
  assert.deepEqual(range.oldest, new Date("2026-01-01T10:00:00Z"));
  assert.deepEqual(range.newest, new Date("2026-01-01T12:30:00Z"));
  const at = new Date("2026-01-01T10:30:00Z");
  assert.deepEqual(planRestore(range, at), { generation: "g1", timestamp: at });
  assert.deepEqual(planRestore(range, new Date("2026-01-01T13:00:00Z")), { generation: "g2" });
  assert.throws(
    () => planRestore(range, new Date("2026-01-01T11:30:00Z")),
    /nothing restorable at 2026-01-01T11:30:00.000Z: the replica holds 2026-01-01T10:00:00.000Z/,
  );
});
