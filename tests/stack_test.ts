/**
 * End-to-end tests of the container stack: the real supervisord runs the
 * repository's supervisord.conf with temporary APP_DIR/DATA_DIR, the official
 * denokv (the stand-in where it is not installed), Supercronic and npm's
 * Litestream 0.3.13 first on PATH, and fauxqs as S3.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { existsSync } from "node:fs";
import { DENO, freePort, openRemoteKv, ROOT, Running, waitFor } from "./_helpers/processes.ts";
import { startFauxS3 } from "./_helpers/s3.ts";
import { startSmtpCapture } from "./_helpers/smtp.ts";
import {
  BOOT_TIMEOUT_MS,
  cleanup,
  cmdline,
  DENOKV_PROCESS,
  descendants,
  everyMinuteCrontab,
  generations,
  healthz,
  kill,
  killAll,
  restoreCopy,
  rssKiB,
  stackProcesses,
  startSupervisord,
  SUPERCRONIC_DIR,
  waitHealthy,
} from "./_helpers/supervised.ts";

Deno.test({
  name: "stack: first boot on an empty bucket serves, and a write reaches the bucket within 2 s",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "denokv-stack-" });
    const stack = await startSupervisord(join(dir, "data"), s3.env("first-boot"));
    let kv: Deno.Kv | undefined;
    try {
      const bootMs = await waitHealthy(stack);
      console.log(`figure: start to first served request, empty bucket: ${bootMs.toFixed(0)} ms`);
      // Wait for the initial snapshot so only our write can add objects afterwards.
      await waitFor("the first generation", async () => (await s3.keys("first-boot/")).length > 0, {
        timeoutMs: 20_000,
      });
      await new Promise((r) => setTimeout(r, 1_500));
      const before = new Set(await s3.keys("first-boot/"));
      kv = await openRemoteKv(stack.url);
      await kv.set(["first-boot"], "hello");
      const wroteAt = performance.now();
      let newKey = "";
      await waitFor("a new object in the bucket", async () => {
        newKey = (await s3.keys("first-boot/")).find((k) => !before.has(k)) ?? "";
        return newKey !== "";
      }, { timeoutMs: 10_000, intervalMs: 50 });
      const elapsed = performance.now() - wroteAt;
      console.log(`figure: write visible in the bucket after ${elapsed.toFixed(0)} ms (${newKey})`);
      assert(elapsed <= 2_000, `write reached the bucket after ${elapsed.toFixed(0)} ms`);
      assert(newKey.includes("/wal/"), `expected a WAL segment, got ${newKey}`);
    } finally {
      kv?.close();
      await cleanup(stack);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "stack: after SIGKILL of every process and rm -rf DATA_DIR, 1,000 keys are restored",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "denokv-stack-" });
    const dataDir = join(dir, "data");
    let stack = await startSupervisord(dataDir, s3.env("disaster"));
    let kv: Deno.Kv | undefined;
    try {
      await waitHealthy(stack);
      kv = await openRemoteKv(stack.url);
      const N = 1_000;
      for (let start = 0; start < N; start += 100) {
        const op = kv.atomic();
        for (let i = start; i < start + 100; i++) {
          op.set(["disaster", i], { i, text: `value-${i}` });
        }
        assert((await op.commit()).ok);
      }
      // Figures: resident memory of each process after 1,000 writes.
      let total = 0;
      for (
        const pid of [stack.supervisord.child.pid, ...descendants(stack.supervisord.child.pid)]
      ) {
        const rss = rssKiB(pid);
        total += rss;
        console.log(`figure: RSS ${(rss / 1024).toFixed(1)} MiB  ${cmdline(pid).slice(0, 110)}`);
      }
      console.log(`figure: RSS total ${(total / 1024).toFixed(1)} MiB`);
      kv.close();
      kv = undefined;
      await new Promise((r) => setTimeout(r, 2_000));
      await killAll(stack);
      await Deno.remove(dataDir, { recursive: true });

      stack = await startSupervisord(dataDir, s3.env("disaster"));
      const bootMs = await waitHealthy(stack);
      console.log(
        `figure: start to first served request, with restore of 1,000 keys: ${
          bootMs.toFixed(0)
        } ms`,
      );
      assert(/restored from the replica/.test(stack.supervisord.output), stack.supervisord.output);
      kv = await openRemoteKv(stack.url);
      const got = new Map<number, unknown>();
      for await (const e of kv.list<{ i: number; text: string }>({ prefix: ["disaster"] })) {
        got.set(e.key[1] as number, e.value);
      }
      assert.deepEqual(got.size, N);
      for (let i = 0; i < N; i++) assert.deepEqual(got.get(i), { i, text: `value-${i}` });
    } finally {
      kv?.close();
      await cleanup(stack);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name:
    "stack: with S3 unreachable and no database, denokv never serves, /healthz is 503 and the start-up step waits for S3",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "denokv-stack-" });
    // The right bucket and credentials behind an endpoint nobody listens on.
    const env = { ...s3.env("fail-closed"), AWS_ENDPOINT_URL_S3: `http://127.0.0.1:${freePort()}` };
    const stack = await startSupervisord(join(dir, "data"), env);
    try {
      await waitFor("the proxy to answer", async () => (await healthz(stack.url)) > 0, {
        timeoutMs: BOOT_TIMEOUT_MS,
      });
      // The replica lease comes first (scripts/boot/lease.ts): without S3 the start-up step
      // waits in-process for it, so supervisord never counts a failed start.
      await waitFor(
        "the start-up step to wait for the lease",
        () => /waiting: cannot reach the lease/.test(stack.supervisord.output),
        { timeoutMs: 90_000, intervalMs: 250 },
      );
      const until = Date.now() + 10_000;
      while (Date.now() < until) {
        assert.deepEqual(await healthz(stack.url), 503);
        const conn = await Deno.connect({ hostname: "127.0.0.1", port: stack.denokvPort })
          .catch(() => null);
        if (conn) {
          conn.close();
          throw new Error("denokv is listening without S3");
        }
        await new Promise((r) => setTimeout(r, 500));
      }
      const out = stack.supervisord.output;
      assert(!/entered FATAL state/.test(out), out);
      assert(!/listening on/.test(out.replace(/proxy listening on/g, "")), out);
      assert.deepEqual((await generations(s3, "fail-closed")).size, 0);
      assert(!existsSync(join(dir, "data", "denokv.sqlite")), "an empty database was created");
    } finally {
      await cleanup(stack);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "stack: SIGTERM to supervisord right after a write keeps the write in the replica",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "denokv-stack-" });
    let stack = await startSupervisord(join(dir, "data"), s3.env("graceful"));
    let kv: Deno.Kv | undefined;
    let restored: string | undefined;
    try {
      await waitHealthy(stack);
      kv = await openRemoteKv(stack.url);
      const value = `last-write-${crypto.randomUUID()}`;
      await kv.set(["graceful"], value);
      kv.close();
      kv = undefined;
      const status = await stack.supervisord.stop("SIGTERM");
      assert.deepEqual(status.code, 0, stack.supervisord.output);
      assert.deepEqual(descendants(stack.supervisord.child.pid).length, 0);
      restored = await restoreCopy(s3, "graceful");
      const local = await Deno.openKv(restored);
      try {
        assert.deepEqual((await local.get(["graceful"])).value, value);
      } finally {
        local.close();
      }
      // A normal reboot on the kept volume: no restore, same data.
      stack = await startSupervisord(stack.dataDir, s3.env("graceful"));
      const bootMs = await waitHealthy(stack);
      console.log(
        `figure: start to first served request, database on the volume: ${bootMs.toFixed(0)} ms`,
      );
      assert.match(stack.supervisord.output, /the database file exists.*: replicate/);
      kv = await openRemoteKv(stack.url);
      assert.deepEqual((await kv.get(["graceful"])).value, value);
    } finally {
      kv?.close();
      await cleanup(stack);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      if (restored) await Deno.remove(join(restored, ".."), { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "stack: supervisord restarts a killed denokv; /healthz goes 503 then 200, data intact",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "denokv-stack-" });
    const stack = await startSupervisord(join(dir, "data"), s3.env("restart"));
    let kv: Deno.Kv | undefined;
    try {
      await waitHealthy(stack);
      kv = await openRemoteKv(stack.url);
      await kv.set(["restart"], "before");
      const denokv = stackProcesses(stack, DENOKV_PROCESS);
      assert.deepEqual(denokv.length, 1, "exactly one denokv process");
      kill(denokv[0], "SIGKILL");
      await waitFor("/healthz to report 503", async () => (await healthz(stack.url)) === 503, {
        timeoutMs: 30_000,
        intervalMs: 20,
      });
      await waitHealthy(stack);
      assert(/exited: denokv/.test(stack.supervisord.output), stack.supervisord.output);
      assert.deepEqual((await kv.get(["restart"])).value, "before");
      await kv.set(["restart"], "after");
      assert.deepEqual((await kv.get(["restart"])).value, "after");
    } finally {
      kv?.close();
      await cleanup(stack);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "stack: Supercronic runs the crontab's exact line; an every-minute variant mails PASSED",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    assert.ok(SUPERCRONIC_DIR, "Supercronic is not installed (see .ci/run)");
    await using s3 = await startFauxS3();
    await using smtp = await startSmtpCapture();
    const dir = await Deno.makeTempDir({ prefix: "denokv-stack-" });
    const crontab = await everyMinuteCrontab(dir);
    const stack = await startSupervisord(join(dir, "data"), s3.env("cron"), {
      env: { CRONTAB_PATH: crontab, ...smtp.env() },
    });
    try {
      await waitHealthy(stack);
      const kv = await openRemoteKv(stack.url);
      await kv.set(["cron"], "checked");
      kv.close();
      assert.ok(stackProcesses(stack, /^supercronic /).length === 1, "supercronic is not running");
      await waitFor("a PASSED e-mail", () => smtp.messages.some((m) => /PASSED/.test(m.subject)), {
        timeoutMs: 150_000,
        intervalMs: 500,
      }).catch((err) => {
        throw new Error(`${err.message}\n${stack.supervisord.output}`);
      });
      const out = stack.supervisord.output;
      const line = (await Deno.readTextFile(join(ROOT, "crontab"))).split("\n")
        .find((l) => l.trim() && !l.startsWith("#"))!.trim().split(/\s+/).slice(5).join(" ");
      assert.ok(out.includes(`job.command="${line}"`), `Supercronic did not run: ${line}`);
    } finally {
      await cleanup(stack);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

/** Starts `npm start`'s program with `env`; resolves once /healthz is 200. */
async function startDevStack(dataDir: string, port: number, denokvPort: number): Promise<Running> {
  const env: Record<string, string> = {
    PATH: Deno.env.get("PATH") ?? "",
    HOME: Deno.env.get("HOME") ?? "/tmp",
    DATA_DIR: dataDir,
    PORT: String(port),
    DENOKV_PORT: String(denokvPort),
  };
  if (Deno.env.get("DENO_DIR")) env.DENO_DIR = Deno.env.get("DENO_DIR")!;
  const child = new Deno.Command(DENO, {
    args: ["run", "-A", join(ROOT, "scripts/dev/dev_stack.ts")],
    cwd: ROOT,
    env,
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const dev = new Running("dev_stack", child, port);
  let exited: Deno.CommandStatus | null = null;
  await waitFor("npm start to serve", async () => {
    exited = await Promise.race([dev.done, Promise.resolve(null)]);
    return exited !== null || (await healthz(dev.url)) === 200;
  }, { timeoutMs: BOOT_TIMEOUT_MS, intervalMs: 100 });
  if (exited) {
    throw new Error(`dev_stack exited ${(exited as Deno.CommandStatus).code}: ${dev.output}`);
  }
  return dev;
}

Deno.test({
  name: "npm start: supervisord.conf's programs on embedded defaults, local replica, token once",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "denokv-dev-" });
    const dataDir = join(dir, ".data");
    const port = freePort();
    const denokvPort = freePort();
    let dev: Running | undefined;
    let kv: Deno.Kv | undefined;
    try {
      dev = await startDevStack(dataDir, port, denokvPort);
      const token = (await Deno.readTextFile(join(dataDir, "token"))).trim();
      assert.match(dev.output, new RegExp(`token: +${token} +\\(generated`));
      assert.match(dev.output, /replicating to the local folder/);
      assert.match(dev.output, /programs: denokv, proxy/);
      // Litestream starts its first generation on its first monitor tick (100 ms) after
      // start; a stop before that tick replicates nothing (see litestream.yml).
      await waitFor("a generation in the local replica", () => {
        const dirs = [...Deno.readDirSync(join(dataDir, "replica", "generations"))];
        return dirs.length > 0;
      }, { timeoutMs: 20_000 });
      kv = await openRemoteKv(dev.url, token);
      await kv.set(["dev"], "kept");
      kv.close();
      kv = undefined;
      assert.deepEqual((await dev.stop("SIGTERM")).code, 0);
      // Lose the database but keep the local replica: the start-up step restores it.
      for (const suffix of ["", "-wal", "-shm"]) {
        await Deno.remove(join(dataDir, "denokv.sqlite" + suffix)).catch(() => {});
      }
      dev = await startDevStack(dataDir, port, denokvPort);
      assert.ok(!dev.output.includes(token), "the token is printed only when generated");
      assert.match(dev.output, /restored from the replica/);
      kv = await openRemoteKv(dev.url, token);
      assert.equal((await kv.get(["dev"])).value, "kept");
    } finally {
      kv?.close();
      await dev?.stop("SIGTERM");
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
