/**
 * The image test's point-in-time restore step: `deno task restore` and
 * `deno task rollback` run inside the booted image (its own `deno`, no dev
 * dependencies) beside its supervisord, as `fly ssh console -C` would run them.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { openRemoteKv, waitFor } from "../_helpers/processes.ts";
import type { MinioS3 } from "../_helpers/minio.ts";
import { type Boot, execInBoot } from "./boot.ts";

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `deno task --cwd /app <task> ...args` inside the machine; throws with its output unless 0. */
async function task(boot: Boot, name: string, args: string[]): Promise<string> {
  const res = await execInBoot(boot, ["deno", "task", "--cwd", "/app", name, ...args]);
  assert.equal(
    res.code,
    0,
    `deno task ${name} ${args.join(" ")} exited ${res.code}\n${res.stdout}\n${res.stderr}`,
  );
  return res.stdout + res.stderr;
}

/** Writes `["pitr", key]` through the proxy; waits until a new WAL segment or snapshot is in the bucket. */
async function writeReplicated(boot: Boot, s3: MinioS3, prefix: string, key: string) {
  const before = new Set(await s3.keys(`${prefix}/`));
  const kv = await openRemoteKv(boot.url);
  const at = new Date();
  try {
    assert.ok((await kv.set(["pitr", key], `value ${key}`)).ok);
  } finally {
    kv.close();
  }
  await waitFor(`${key} to reach the bucket`, async () => {
    const keys = await s3.keys(`${prefix}/`);
    return keys.some((k) => !before.has(k) && /\/(wal|snapshots)\//.test(k));
  }, { timeoutMs: 60_000, intervalMs: 200 });
  return at;
}

/** The values under ["pitr"] of a KV. */
export async function pitrValues(kv: Deno.Kv): Promise<Record<string, unknown>> {
  const out: Record<string, unknown> = {};
  for await (const e of kv.list({ prefix: ["pitr"] })) out[String(e.key[1])] = e.value;
  return out;
}

/** The values under ["pitr"] of a SQLite file the image wrote under /data, opened from the host. */
async function valuesInFile(path: string): Promise<Record<string, unknown>> {
  const kv = await Deno.openKv(path);
  try {
    return await pitrValues(kv);
  } finally {
    kv.close();
  }
}

/** The `restorable from X to Y` line of `restore --list`. */
function listedRange(out: string): { oldest: Date; newest: Date } {
  const m = /restorable from (\S+) to (\S+)/.exec(out);
  assert.ok(m, out);
  return { oldest: new Date(m[1]), newest: new Date(m[2]) };
}

/**
 * Writes A, notes T, writes B; then inside the image: `restore --list` covers
 * both, `restore --at T --to /data/copy.sqlite` holds A without B, and
 * `rollback --at T` serves A without B, keeps the old file and keeps replicating.
 * `dataDir` is the host folder mounted as /data; `prefix` the replica's path in the bucket.
 */
export async function checkPointInTimeRestore(
  boot: Boot,
  s3: MinioS3,
  dataDir: string,
  prefix: string,
): Promise<{ rollbackMs: number }> {
  const aAt = await writeReplicated(boot, s3, prefix, "A");
  // Litestream's times are whole seconds: keep two of them on each side of T.
  await sleep(2_200);
  const between = new Date();
  await sleep(2_200);
  const bAt = await writeReplicated(boot, s3, prefix, "B");

  const list = await task(boot, "restore", ["--list"]);
  const range = listedRange(list);
  assert.ok(range.oldest <= aAt, `oldest is after A (${aAt.toISOString()})\n${list}`);
  assert.ok(
    range.newest.getTime() >= Math.floor(bAt.getTime() / 1000) * 1000,
    `newest is before B (${bAt.toISOString()})\n${list}`,
  );

  const copyOut = await task(boot, "restore", [
    "--at",
    between.toISOString(),
    "--to",
    "/data/copy.sqlite",
  ]);
  assert.match(copyOut, /restored the state at .* entries, quick_check ok/);
  assert.deepEqual(await valuesInFile(join(dataDir, "copy.sqlite")), { A: "value A" });

  const started = performance.now();
  const rolled = await task(boot, "rollback", ["--at", between.toISOString()]);
  const rollbackMs = performance.now() - started;
  const kept = /previous database is kept in \/data\/(before-rollback-\S+);/.exec(rolled);
  assert.ok(kept, rolled);
  // The old file, with B in it, is kept on the volume.
  assert.deepEqual(await valuesInFile(join(dataDir, kept[1], "denokv.sqlite")), {
    A: "value A",
    B: "value B",
  });

  // Through the proxy: the state at T, and a write after the rollback.
  const kv = await openRemoteKv(boot.url);
  try {
    assert.deepEqual(await pitrValues(kv), { A: "value A" });
    assert.ok((await kv.set(["pitr", "C"], "value C")).ok);
  } finally {
    kv.close();
  }
  // C reaches the replica: the latest restorable state has A and C, not B.
  let restored: Record<string, unknown> = {};
  let n = 0;
  await waitFor("C to be restorable from the bucket", async () => {
    await sleep(1_100);
    const name = `after-${n++}.sqlite`;
    await task(boot, "restore", ["--at", new Date().toISOString(), "--to", `/data/${name}`]);
    restored = await valuesInFile(join(dataDir, name));
    return "C" in restored;
  }, { timeoutMs: 90_000, intervalMs: 100 });
  assert.deepEqual(restored, { A: "value A", C: "value C" });
  return { rollbackMs };
}
