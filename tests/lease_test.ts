/**
 * One writer per replica, against MinIO (an S3 that honours conditional
 * writes): the race for the lease object has exactly one winner, a second
 * stack on the same replica path waits, takes over once the first is killed
 * and its lease goes stale, and a holder cut off from S3 stops denokv before
 * its lease could be taken over. Stacks are the real supervisord.conf with
 * the real Litestream and the denokv the other tests run (tests/_helpers/processes.ts).
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { GetObjectCommand, PutObjectCommand } from "@aws-sdk/client-s3";
import {
  holdLease,
  leaseKey,
  type LeaseRecord,
  loadLeaseConfig,
  ReplicaLease,
} from "../scripts/boot/lease.ts";
import {
  DENO,
  freePort,
  openRemoteKv,
  ROOT,
  Running,
  TEST_PATH,
  TEST_TOKEN,
  waitFor,
} from "./_helpers/processes.ts";
import { startFauxS3 } from "./_helpers/s3.ts";
import { type MinioS3, startMinio, startRelay } from "./_helpers/minio.ts";

/** Short lease times keep the tests quick; their ratios are the production ones. */
const TTL_MS = 12_000;
const RENEW_MS = 2_000;
const BOOT_TIMEOUT_MS = 90_000;

const LITESTREAM_DIR = join(ROOT, "node_modules/@flydotio/litestream-linux-x64");

function leaseEnv(s3: MinioS3, holder: string, replicaPath: string, endpoint?: string) {
  return {
    ...s3.env(replicaPath, endpoint),
    FLY_MACHINE_ID: holder,
    LEASE_TTL_MS: String(TTL_MS),
    LEASE_RENEW_MS: String(RENEW_MS),
  };
}

function lease(s3: MinioS3, holder: string, replicaPath: string): ReplicaLease {
  return new ReplicaLease(loadLeaseConfig(leaseEnv(s3, holder, replicaPath))!);
}

async function readRecord(s3: MinioS3, replicaPath: string): Promise<LeaseRecord> {
  const out = await s3.client.send(
    new GetObjectCommand({ Bucket: s3.bucket, Key: leaseKey(replicaPath) }),
  );
  return JSON.parse(await out.Body!.transformToString());
}

Deno.test("S3 conditional writes: MinIO refuses a second If-None-Match create, fauxqs does not", async () => {
  const put = (client: MinioS3["client"], bucket: string) =>
    client.send(
      new PutObjectCommand({ Bucket: bucket, Key: "once", Body: "x", IfNoneMatch: "*" }),
    ).then(() => 200, (err) => err.$metadata?.httpStatusCode ?? err);
  await using minio = await startMinio();
  assert.equal(await put(minio.client, minio.bucket), 200);
  assert.equal(await put(minio.client, minio.bucket), 412);
  // The emulator the other tests use would let both writers win: not usable for the lease.
  await using faux = await startFauxS3();
  assert.equal(await put(faux.client, faux.bucket), 200);
  assert.equal(await put(faux.client, faux.bucket), 200);
});

Deno.test("ReplicaLease.tryClaim(): ten machines at once, on a fresh path and on a stale lease, exactly one wins", async () => {
  await using s3 = await startMinio();
  const machines = Array.from({ length: 10 }, (_, i) => lease(s3, `machine-${i}`, "race"));
  try {
    const fresh = await Promise.all(machines.map((m) => m.tryClaim()));
    const winners = fresh.filter((a) => a.won);
    assert.equal(winners.length, 1, JSON.stringify(fresh));
    const holder = (await readRecord(s3, "race")).holder;
    assert.equal(machines[fresh.findIndex((a) => a.won)].config.holder, holder);

    // The holder dies: nobody renews; once stale, all ten try to take it over at once.
    await new Promise((r) => setTimeout(r, TTL_MS + 500));
    const takeOvers = await Promise.all(machines.map((m) => m.tryClaim()));
    assert.equal(takeOvers.filter((a) => a.won).length, 1, JSON.stringify(takeOvers));
    for (const a of takeOvers) if (!a.won) assert.match(a.holder, /machine-\d|another machine/);
  } finally {
    for (const m of machines) m.close();
  }
});

Deno.test("ReplicaLease: a live lease of another machine is refused; the holder's renewals keep it", async () => {
  await using s3 = await startMinio();
  const a = lease(s3, "machine-a", "live");
  const b = lease(s3, "machine-b", "live");
  try {
    const first = await a.tryClaim();
    assert.ok(first.won);
    let etag = first.etag;
    for (let i = 0; i < 3; i++) {
      const attempt = await b.tryClaim();
      assert.equal(attempt.won, false);
      assert.ok(!attempt.won && attempt.holder === "machine-a");
      const renewed = await a.renew(etag);
      assert.ok(renewed.ok);
      etag = renewed.etag;
    }
    // A renewal under an ETag that is no longer current and a lease that names someone else fails.
    const taken = await b.tryClaim();
    assert.equal(taken.won, false);
  } finally {
    a.close();
    b.close();
  }
});

Deno.test("holdLease(): a renewal refused because another machine took the lease calls onLost at once", async () => {
  await using s3 = await startMinio();
  const a = lease(s3, "machine-a", "taken");
  const done = new AbortController();
  const lost: string[] = [];
  try {
    assert.ok((await a.tryClaim()).won);
    const holding = holdLease(a, {
      signal: done.signal,
      onLost: (reason) => Promise.resolve(void lost.push(reason)),
    });
    // Another writer replaces the lease outright (as a take-over after a pause would).
    await new Promise((r) => setTimeout(r, RENEW_MS));
    await s3.client.send(
      new PutObjectCommand({
        Bucket: s3.bucket,
        Key: leaseKey("taken"),
        Body: JSON.stringify({
          holder: "machine-b",
          heartbeatAt: new Date().toISOString(),
          ttlMs: TTL_MS,
        }),
      }),
    );
    await waitFor("machine-a to notice", () => lost.length > 0, { timeoutMs: RENEW_MS * 3 });
    assert.match(lost[0], /held by machine-b/);
    done.abort();
    await holding;
    assert.equal((await readRecord(s3, "taken")).holder, "machine-b");
  } finally {
    done.abort();
    a.close();
  }
});

/** One machine: supervisord running the repository's supervisord.conf. */
interface Stack {
  supervisord: Running;
  url: string;
  denokvUrl: string;
  dataDir: string;
}

async function startStack(
  env: Record<string, string>,
): Promise<Stack> {
  const dataDir = await Deno.makeTempDir({ prefix: "lease-stack-" });
  const port = freePort();
  const denokvPort = freePort();
  const path = `${LITESTREAM_DIR}:${TEST_PATH}`;
  const child = new Deno.Command("supervisord", {
    args: ["-n", "-c", join(ROOT, "supervisord.conf")],
    cwd: ROOT,
    env: {
      PATH: path,
      HOME: Deno.env.get("HOME") ?? "/tmp",
      DENO_BIN: DENO,
      DENO_DIR: Deno.env.get("DENO_DIR") ?? join(Deno.env.get("HOME") ?? "/tmp", ".cache/deno"),
      APP_DIR: ROOT.replace(/\/$/, ""),
      DATA_DIR: dataDir,
      PORT: String(port),
      HOSTNAME_BIND: "127.0.0.1",
      DENOKV_URL: `http://127.0.0.1:${denokvPort}`,
      DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
      // Two stacks run at once here: each needs its own Litestream metrics port.
      LITESTREAM_ADDR: `127.0.0.1:${freePort()}`,
      ACCESS_LOG: "off",
      ...env,
    },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  return {
    supervisord: new Running("supervisord", child, port),
    url: `http://127.0.0.1:${port}`,
    denokvUrl: `http://127.0.0.1:${denokvPort}`,
    dataDir,
  };
}

async function status(url: string): Promise<number> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(3_000) });
    await res.body?.cancel();
    return res.status;
  } catch {
    return 0;
  }
}

/** True while denokv accepts connections (any HTTP answer). */
async function denokvUp(stack: Stack): Promise<boolean> {
  return (await status(stack.denokvUrl)) !== 0;
}

async function waitHealthy(stack: Stack, timeoutMs = BOOT_TIMEOUT_MS): Promise<void> {
  await waitFor("/healthz 200", async () => {
    if (stack.supervisord.exited) throw new Error("supervisord exited");
    return (await status(`${stack.url}/healthz`)) === 200;
  }, { timeoutMs, intervalMs: 200 }).catch((err) => {
    throw new Error(`${err.message}\n--- supervisord output ---\n${stack.supervisord.output}`);
  });
}

/** Every process below `pid`, from /proc. */
function descendants(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry.name)]);
    } catch { /* gone */ }
  }
  const out: number[] = [];
  const walk = (p: number) => {
    for (const c of children.get(p) ?? []) {
      walk(c);
      out.push(c);
    }
  };
  walk(pid);
  return out;
}

/** SIGKILLs supervisord and everything under it, as a machine crash would. */
async function killStack(stack: Stack): Promise<void> {
  const all = [stack.supervisord.child.pid, ...descendants(stack.supervisord.child.pid)];
  for (const p of all) {
    try {
      Deno.kill(p, "SIGKILL");
    } catch { /* gone */ }
  }
  await stack.supervisord.done;
  await waitFor(
    "the stack's processes to be gone",
    () => all.every((p) => !existsSync(`/proc/${p}`)),
  );
  await Deno.remove(stack.dataDir, { recursive: true }).catch(() => {});
}

Deno.test({
  name:
    "lease: a second stack on the same replica path waits (503); the first killed, its lease goes stale, the second takes over with the data",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using s3 = await startMinio();
    const a = await startStack(leaseEnv(s3, "machine-a", "shared"));
    let b: Stack | undefined;
    try {
      await waitHealthy(a);
      const kv = await openRemoteKv(a.url);
      await kv.set(["lease-test"], "written on machine-a");
      kv.close();
      // Litestream ships WAL every second; give it a few.
      await new Promise((r) => setTimeout(r, 4_000));

      b = await startStack(leaseEnv(s3, "machine-b", "shared"));
      await waitFor(
        "machine-b to say it waits for machine-a",
        () => /is held by machine-a/.test(b!.supervisord.output),
        { timeoutMs: BOOT_TIMEOUT_MS },
      );
      // The start-up step may say so before machine-b's proxy listens (a slow boot on a busy
      // machine): wait for the proxy to answer at all first.
      await waitFor(
        "machine-b's proxy to answer",
        async () => (await status(`${b!.url}/healthz`)) > 0,
        {
          timeoutMs: BOOT_TIMEOUT_MS,
        },
      );
      // Several renew periods later it still waits: no denokv, /healthz 503; machine-a serves.
      const until = Date.now() + 3 * RENEW_MS;
      while (Date.now() < until) {
        assert.equal(await status(`${b.url}/healthz`), 503);
        assert.equal(await denokvUp(b), false, "machine-b started denokv under a live lease");
        assert.equal(await status(`${a.url}/healthz`), 200);
        await new Promise((r) => setTimeout(r, 500));
      }
      assert.equal((await readRecord(s3, "shared")).holder, "machine-a");

      const lastHeartbeat = Date.parse((await readRecord(s3, "shared")).heartbeatAt);
      await killStack(a);
      await waitHealthy(b, TTL_MS + BOOT_TIMEOUT_MS);
      const took = Date.now();
      assert.ok(
        took >= lastHeartbeat + TTL_MS,
        `machine-b served ${
          took - lastHeartbeat
        } ms after machine-a's last heartbeat (TTL ${TTL_MS})`,
      );
      assert.match(b.supervisord.output, /taken over by machine-b/);
      assert.equal((await readRecord(s3, "shared")).holder, "machine-b");
      const kvB = await openRemoteKv(b.url);
      try {
        assert.equal((await kvB.get(["lease-test"])).value, "written on machine-a");
      } finally {
        kvB.close();
      }
    } finally {
      await killStack(a).catch(() => {});
      if (b) await killStack(b).catch(() => {});
    }
  },
});

Deno.test({
  name:
    "lease: a holder cut off from S3 stops denokv before its lease goes stale, waits, and serves again when S3 is back",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    await using s3 = await startMinio();
    using relay = startRelay(s3.port);
    const a = await startStack(leaseEnv(s3, "machine-a", "cut", relay.url));
    try {
      await waitHealthy(a);
      // Let the renewer arm and renew at least once.
      await waitFor(
        "a renewal after the claim",
        () => /holding .*cut\.lease\.json/.test(a.supervisord.output),
        {
          timeoutMs: 30_000,
        },
      );
      relay.cut();
      const cutAt = Date.now();
      await waitFor("denokv to stop", async () => !(await denokvUp(a)), {
        timeoutMs: TTL_MS * 2,
        intervalMs: 100,
      });
      const stoppedAt = Date.now();
      const lastHeartbeat = Date.parse((await readRecord(s3, "cut")).heartbeatAt);
      assert.ok(
        stoppedAt < lastHeartbeat + TTL_MS,
        `denokv stopped ${
          stoppedAt - lastHeartbeat
        } ms after the last heartbeat (TTL ${TTL_MS}); ` +
          `cut ${stoppedAt - cutAt} ms before`,
      );
      assert.match(a.supervisord.output, /lease lost: no renewal/);
      // While S3 stays away the start-up step waits: denokv does not come back.
      const until = Date.now() + TTL_MS;
      while (Date.now() < until) {
        assert.equal(await denokvUp(a), false, "denokv came back while cut off from S3");
        assert.equal(await status(`${a.url}/healthz`), 503);
        await new Promise((r) => setTimeout(r, 500));
      }
      relay.restore();
      await waitHealthy(a);
      assert.equal((await readRecord(s3, "cut")).holder, "machine-a");
    } finally {
      await killStack(a).catch(() => {});
    }
  },
});
