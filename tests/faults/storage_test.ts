/**
 * Fault matrix, storage side: the volume full, the volume back from an older
 * snapshot, S3 away at boot, SIGTERM in the middle of a restore. Each test
 * runs the real stack (supervisord, Litestream, fauxqs, denokv).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { openRemoteKv, waitFor } from "../_helpers/processes.ts";
import { type FauxS3, startFauxS3 } from "../_helpers/s3.ts";
import { startTcpRelay } from "../_helpers/tcp_relay.ts";
import {
  alive,
  cleanup,
  DENOKV_PROCESS,
  healthz,
  healthzText,
  processesMatching,
  read,
  stackProcesses,
  startSupervisord,
  waitHealthy,
  waitInReplica,
  write,
} from "../_helpers/supervised.ts";
import { RESTORE_LOCK_FILE } from "../../scripts/boot/start_denokv.ts";

/** `size` characters of incompressible text (Litestream compresses what it ships). */
function noise(size: number): string {
  const bytes = crypto.getRandomValues(new Uint8Array(Math.ceil(size / 2)));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("").slice(0, size);
}

/** Boots, writes `keys` values of `size` bytes under ["seed"], stops cleanly: a replica to restore. */
async function seedReplica(
  s3: FauxS3,
  prefix: string,
  dataDir: string,
  keys: number,
  size = 100,
): Promise<void> {
  const stack = await startSupervisord(dataDir, s3.env(prefix));
  try {
    await waitHealthy(stack);
    const kv = await openRemoteKv(stack.url);
    try {
      for (let i = 0; i < keys; i += 10) {
        const op = kv.atomic();
        for (let j = i; j < Math.min(keys, i + 10); j++) op.set(["seed", j], noise(size));
        assert.ok((await op.commit()).ok);
      }
    } finally {
      kv.close();
    }
    assert.equal((await stack.supervisord.stop("SIGTERM")).code, 0);
  } finally {
    await cleanup(stack);
  }
}

Deno.test({
  name: "the volume full: writes fail with a clear error, /healthz says why, nothing corrupted, " +
    "writes and replication resume once space is freed",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "denokv-fault-" });
    const dataDir = join(dir, "data");
    await Deno.mkdir(dataDir);
    const mount = await new Deno.Command("mount", {
      args: ["-t", "tmpfs", "-o", "size=48m", "tmpfs", dataDir],
    }).output();
    assert.equal(mount.code, 0, new TextDecoder().decode(mount.stderr));
    const stack = await startSupervisord(dataDir, s3.env("volume-full"));
    const filler = join(dataDir, "filler");
    try {
      await waitHealthy(stack);
      await write(stack, ["before"], "kept");
      // Fill the volume to the last byte.
      const file = await Deno.open(filler, { write: true, create: true });
      const block = new Uint8Array(256 * 1024);
      try {
        for (;;) await file.write(block);
      } catch (err) {
        assert.ok(String(err).match(/No space left|ENOSPC|os error 28/), String(err));
      }
      for (let size = 4096; size >= 1; size = Math.floor(size / 2)) {
        try {
          for (;;) await file.write(block.subarray(0, size));
        } catch { /* full at this size */ }
      }
      file.close();
      const kv = await openRemoteKv(stack.url);
      try {
        const failed = await Promise.race([
          kv.set(["during"], "x".repeat(60_000)).then(() => null, (err: Error) => err),
          new Promise<string>((r) => setTimeout(() => r("no answer in 30 s"), 30_000)),
        ]);
        assert.ok(failed instanceof Error, `the write did not fail clearly: ${failed}`);
        assert.match(failed.message, /volume is full/);
        await waitFor("/healthz to say the volume is full", async () => {
          const h = await healthzText(stack.url);
          return h.status === 503 && /volume is full/.test(h.text);
        }, { timeoutMs: 20_000 });
        assert.equal((await kv.get(["before"])).value, "kept", "reads still work");
        await Deno.remove(filler);
        await waitHealthy(stack, 30_000);
        await kv.set(["after"], "written");
      } finally {
        kv.close();
      }
      await waitInReplica(s3, "volume-full", ["after"], "written", 60_000);
      await waitInReplica(s3, "volume-full", ["before"], "kept", 10_000);
      assert.equal((await stack.supervisord.stop("SIGTERM")).code, 0);
      const check = await new Deno.Command("sqlite3", {
        args: [join(dataDir, "denokv.sqlite"), "PRAGMA integrity_check"],
        stdout: "piped",
      }).output();
      assert.equal(new TextDecoder().decode(check.stdout).trim(), "ok");
    } finally {
      await cleanup(stack);
      await new Deno.Command("umount", { args: ["-l", dataDir] }).output();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "the volume back from an older snapshot while the replica is newer: start-up restores " +
    "the newer state and never replicates the older file over it",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "denokv-fault-" });
    const dataDir = join(dir, "data");
    const snapshot = join(dir, "snapshot");
    let stack = await startSupervisord(dataDir, s3.env("older-snapshot"));
    try {
      await waitHealthy(stack);
      await write(stack, ["state"], "old");
      await waitInReplica(s3, "older-snapshot", ["state"], "old", 30_000);
      assert.equal((await stack.supervisord.stop("SIGTERM")).code, 0);
      // Fly's volume snapshot: the data folder as it is now.
      await new Deno.Command("cp", { args: ["-a", dataDir, snapshot] }).output();
      stack = await startSupervisord(dataDir, s3.env("older-snapshot"));
      await waitHealthy(stack);
      await write(stack, ["state"], "new");
      await waitInReplica(s3, "older-snapshot", ["state"], "new", 30_000);
      assert.equal((await stack.supervisord.stop("SIGTERM")).code, 0);
      // The volume comes back from the snapshot.
      await Deno.remove(dataDir, { recursive: true });
      await Deno.rename(snapshot, dataDir);
      stack = await startSupervisord(dataDir, s3.env("older-snapshot"));
      await waitHealthy(stack);
      assert.equal(await read(stack, ["state"]), "new");
      assert.match(stack.supervisord.output, /older than the replica/);
      await new Promise((r) => setTimeout(r, 3_000));
      await waitInReplica(s3, "older-snapshot", ["state"], "new", 5_000);
    } finally {
      await cleanup(stack);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "S3 unreachable at boot for 2 minutes: never serves an empty database, retries, serves " +
    "within seconds of S3 returning",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    await using relay = startTcpRelay(Number(new URL(s3.endpoint).port));
    const dir = await Deno.makeTempDir({ prefix: "denokv-fault-" });
    const dataDir = join(dir, "data");
    await seedReplica(s3, "s3-outage", dataDir, 20);
    await Deno.remove(dataDir, { recursive: true });
    relay.off();
    const env = { ...s3.env("s3-outage"), AWS_ENDPOINT_URL_S3: relay.url };
    const stack = await startSupervisord(dataDir, env);
    try {
      const outageEnds = Date.now() + 120_000;
      while (Date.now() < outageEnds) {
        assert.notEqual(await healthz(stack.url), 200, "served during the outage");
        assert.equal(stackProcesses(stack, DENOKV_PROCESS).length, 0, "denokv runs");
        assert.ok(!/FATAL/.test(stack.supervisord.output), stack.supervisord.output);
        assert.equal(stack.supervisord.exited, null);
        await new Promise((r) => setTimeout(r, 1_000));
      }
      relay.on();
      const back = performance.now();
      await waitHealthy(stack, 30_000);
      const ms = performance.now() - back;
      console.log(`figure: serving ${ms.toFixed(0)} ms after S3 came back`);
      assert.ok(ms < 15_000, `served ${ms.toFixed(0)} ms after S3 returned`);
      assert.equal(String(await read(stack, ["seed", 19])).length, 100);
    } finally {
      await cleanup(stack);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "SIGTERM during a restore: the restore stops, the next start restores cleanly, " +
    "never two restores at once",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    await using relay = startTcpRelay(Number(new URL(s3.endpoint).port));
    const dir = await Deno.makeTempDir({ prefix: "denokv-fault-" });
    const dataDir = join(dir, "data");
    // About 2 MB of replica: at 20 KB/s its restore takes well over a minute.
    await seedReplica(s3, "restore-term", dataDir, 400, 5_000);
    await Deno.remove(dataDir, { recursive: true });
    relay.throttle(20_000);
    const env = { ...s3.env("restore-term"), AWS_ENDPOINT_URL_S3: relay.url };
    let stack = await startSupervisord(dataDir, env);
    const restoring = new RegExp(`litestream restore .*${dataDir}`);
    try {
      await waitFor("a restore to run", () => processesMatching(restoring).length === 1, {
        timeoutMs: 60_000,
        intervalMs: 100,
      });
      const [restorePid] = processesMatching(restoring);
      await new Promise((r) => setTimeout(r, 2_000));
      assert.equal((await stack.supervisord.stop("SIGTERM")).code, 0);
      await waitFor("the restore to stop", () => !alive(restorePid), { timeoutMs: 10_000 });
      // Another restore holds the volume's restore lock: this start-up waits for it.
      relay.throttle(0);
      const lock = await Deno.open(join(dataDir, RESTORE_LOCK_FILE), { write: true, create: true });
      await lock.lock(true);
      await cleanup(stack);
      stack = await startSupervisord(dataDir, env);
      try {
        await waitFor(
          "the start-up to wait for the lock",
          () => /waiting for the restore lock/.test(stack.supervisord.output),
          { timeoutMs: 30_000 },
        );
        await new Promise((r) => setTimeout(r, 3_000));
        assert.equal(
          processesMatching(restoring).length,
          0,
          "a restore ran beside the lock holder",
        );
      } finally {
        await lock.unlock();
        lock.close();
      }
      await waitHealthy(stack);
      assert.match(stack.supervisord.output, /restored from the replica/);
      assert.equal(String(await read(stack, ["seed", 399])).length, 5_000);
    } finally {
      await cleanup(stack);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
