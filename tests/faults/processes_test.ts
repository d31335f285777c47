/**
 * Fault matrix, process side: a process of the real stack (supervisord,
 * Litestream, fauxqs, denokv) killed, hung or gone FATAL, and SIGTERM in the
 * middle of the nightly check. Each test starts from a healthy stack.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { freePort, ROOT, waitFor } from "../_helpers/processes.ts";
import { type FauxS3, startFauxS3 } from "../_helpers/s3.ts";
import {
  alive,
  cleanup,
  DENOKV_PROCESS,
  descendants,
  everyMinuteCrontab,
  healthz,
  kill,
  LITESTREAM_PROCESS,
  onlyProcess,
  read,
  type Stack,
  stackProcesses,
  startSupervisord,
  waitHealthy,
  waitInReplica,
  write,
} from "../_helpers/supervised.ts";

/** Boots a healthy stack on a fresh bucket prefix, runs `fn`, and tears everything down. */
async function withStack(
  prefix: string,
  env: Record<string, string>,
  fn: (stack: Stack, s3: FauxS3) => Promise<void>,
): Promise<void> {
  await using s3 = await startFauxS3();
  const dir = await Deno.makeTempDir({ prefix: "denokv-fault-" });
  const stack = await startSupervisord(join(dir, "data"), s3.env(prefix), { env });
  try {
    await waitHealthy(stack);
    await fn(stack, s3);
  } finally {
    await cleanup(stack);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

Deno.test({
  name: "Litestream killed: denokv stops with it, /healthz 503, a later write reaches the replica",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await withStack("litestream-killed", {}, async (stack, s3) => {
      const litestream = await onlyProcess(stack, LITESTREAM_PROCESS);
      const denokv = await onlyProcess(stack, DENOKV_PROCESS);
      kill(litestream, "SIGKILL");
      await waitFor("denokv to stop with Litestream", () => !alive(denokv), { timeoutMs: 10_000 });
      let saw503 = false;
      await waitFor("/healthz 503", async () => (saw503 = (await healthz(stack.url)) === 503), {
        timeoutMs: 10_000,
        intervalMs: 20,
      }).catch(() => {});
      assert.ok(saw503 || !alive(denokv), "/healthz never said 503 while replication was down");
      await waitHealthy(stack);
      const value = `after-kill-${crypto.randomUUID()}`;
      await write(stack, ["after-kill"], value);
      const ms = await waitInReplica(s3, "litestream-killed", ["after-kill"], value, 60_000);
      console.log(`figure: write after Litestream's restart in the replica after ${ms} ms`);
    });
  },
});

/** SIGSTOPs `pattern`'s process and waits for the watchdog to replace the pair. */
async function hang(stack: Stack, pattern: RegExp): Promise<number> {
  const hung = await onlyProcess(stack, pattern);
  const pair = [
    await onlyProcess(stack, DENOKV_PROCESS),
    await onlyProcess(stack, LITESTREAM_PROCESS),
  ];
  const start = performance.now();
  kill(hung, "SIGSTOP");
  try {
    await waitFor("/healthz to say 503", async () => (await healthz(stack.url)) === 503, {
      timeoutMs: 30_000,
      intervalMs: 200,
    });
    await waitFor("the watchdog to replace the hung pair", async () => {
      if (pair.some(alive)) return false;
      return (await healthz(stack.url)) === 200;
    }, { timeoutMs: 60_000 + 30_000, intervalMs: 500 });
  } finally {
    kill(hung, "SIGCONT");
  }
  return performance.now() - start;
}

Deno.test({
  name: "denokv hung (SIGSTOP): the watchdog restarts the pair within a minute, nothing lost",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await withStack("denokv-hung", {}, async (stack) => {
      await write(stack, ["before-hang"], "kept");
      const ms = await hang(stack, DENOKV_PROCESS);
      console.log(`figure: hung denokv replaced and serving after ${ms.toFixed(0)} ms`);
      assert.ok(ms < 90_000, `took ${ms} ms`);
      assert.equal(await read(stack, ["before-hang"]), "kept");
      assert.match(stack.supervisord.output, /watchdog: /);
    });
  },
});

Deno.test({
  name: "Litestream hung (SIGSTOP): /healthz 503, the watchdog restarts the pair within a " +
    "minute, acknowledged writes reach the replica",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await withStack("litestream-hung", {}, async (stack, s3) => {
      await write(stack, ["before-hang"], "kept");
      const ms = await hang(stack, LITESTREAM_PROCESS);
      console.log(`figure: hung Litestream replaced and serving after ${ms.toFixed(0)} ms`);
      await write(stack, ["after-hang"], "also kept");
      await waitInReplica(s3, "litestream-hung", ["after-hang"], "also kept", 60_000);
      await waitInReplica(s3, "litestream-hung", ["before-hang"], "kept", 10_000);
    });
  },
});

Deno.test({
  name: "a program FATAL in supervisord: supervisord stops the rest and exits non-zero",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "denokv-fault-" });
    // The proxy's port is taken: it exits at once on every start until supervisord gives up.
    const squatter = Deno.listen({ hostname: "127.0.0.1", port: freePort() });
    const port = (squatter.addr as Deno.NetAddr).port;
    const stack = await startSupervisord(join(dir, "data"), s3.env("fatal"), {
      ports: { port, denokvPort: freePort() },
    });
    try {
      await waitFor("denokv to run", () => stackProcesses(stack, DENOKV_PROCESS).length === 1, {
        timeoutMs: 60_000,
      });
      const children = descendants(stack.supervisord.child.pid);
      const status = await Promise.race([
        stack.supervisord.done,
        new Promise<null>((r) => setTimeout(() => r(null), 120_000)),
      ]);
      assert.ok(status !== null, `supervisord still runs:\n${stack.supervisord.output}`);
      assert.notEqual(status.code, 0, stack.supervisord.output);
      assert.match(stack.supervisord.output, /proxy entered FATAL state/);
      assert.match(stack.supervisord.output, /watchdog: proxy entered FATAL: stopping/);
      await waitFor("no process of the stack left", () => children.every((p) => !alive(p)), {
        timeoutMs: 10_000,
      });
    } finally {
      squatter.close();
      await cleanup(stack);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

/**
 * An SMTP server that greets, then answers EHLO with a multi-line reply that
 * never ends, one line every 5 s: the client's inactivity timeout never fires,
 * so a backup check mailing it runs for as long as the test likes.
 */
function stallingSmtp(): { port: number; connected: () => boolean; close(): void } {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.Conn[] = [];
  const encoder = new TextEncoder();
  const timer = setInterval(() => {
    for (const c of conns) c.write(encoder.encode("250-still thinking\r\n")).catch(() => {});
  }, 5_000);
  (async () => {
    for await (const conn of listener) {
      conns.push(conn);
      conn.write(encoder.encode("220 stalling.test ESMTP\r\n")).catch(() => {});
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    connected: () => conns.length > 0,
    close() {
      clearInterval(timer);
      listener.close();
      for (const c of conns) {
        try {
          c.close();
        } catch { /* closed */ }
      }
    },
  };
}

Deno.test({
  name: "SIGTERM during the nightly check: every stop fits kill_timeout, the last acknowledged " +
    "write is in the replica",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const smtp = stallingSmtp();
    const dir = await Deno.makeTempDir({ prefix: "denokv-fault-" });
    const crontab = await everyMinuteCrontab(dir);
    const killTimeout = Number(
      /^kill_timeout\s*=\s*(\d+)/m.exec(await Deno.readTextFile(join(ROOT, "fly.toml")))![1],
    );
    try {
      await withStack("sigterm-check", {
        CRONTAB_PATH: crontab,
        SMTP_HOST: "127.0.0.1",
        SMTP_PORT: String(smtp.port),
        SMTP_FROM: "check@example.test",
        ALERT_EMAIL: "ops@example.test",
      }, async (stack, s3) => {
        await waitFor("the nightly check to be stuck mailing", smtp.connected, {
          timeoutMs: 150_000,
          intervalMs: 200,
        });
        assert.ok(stackProcesses(stack, /backup_check\.ts/).length >= 1, "no check runs");
        const value = `last-${crypto.randomUUID()}`;
        await write(stack, ["last"], value);
        const start = performance.now();
        const status = await Promise.race([
          stack.supervisord.stop("SIGTERM"),
          new Promise<null>((r) => setTimeout(() => r(null), (killTimeout + 15) * 1000)),
        ]);
        const seconds = (performance.now() - start) / 1000;
        console.log(`figure: SIGTERM during the nightly check: stopped in ${seconds.toFixed(1)} s`);
        assert.ok(status !== null && seconds <= killTimeout, `stop took ${seconds} s`);
        assert.equal(status.code, 0, stack.supervisord.output);
        await waitInReplica(s3, "sigterm-check", ["last"], value, 5_000);
      });
    } finally {
      smtp.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
