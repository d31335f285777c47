/**
 * lib/kv_queue.ts: stop timeouts past the timer range, exact counters, dead
 * letter retention, and the controls (cancel, list, pause/resume, timeoutMs).
 */
import assert from "node:assert/strict";
import { KvQueue, KvQueueRunner } from "../lib/kv_queue.ts";
import { waitFor } from "./_helpers/processes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

Deno.test(
  "KvQueueRunner.stop() with stopTimeoutMs past 2^31-1 ms waits for the handler (no timer overflow)",
  opts,
  async () => {
    const kv = await Deno.openKv(":memory:");
    try {
      const queue = new KvQueue(kv);
      const runs: { aborted: boolean }[] = [];
      let started = 0;
      queue.handle("slow", async (_d, m) => {
        started++;
        await new Promise((r) => setTimeout(r, 500));
        runs.push({ aborted: m.signal.aborted });
      });
      await queue.enqueue("slow", 1);
      const runner = new KvQueueRunner(kv, queue, { stopTimeoutMs: 2 ** 31 + 1_000 });
      const running = runner.run();
      await waitFor("the handler to start", () => started === 1);
      await runner.stop();
      await running;
      assert.deepEqual(runs, [{ aborted: false }]);
      const s = await queue.stats();
      assert.equal(s.ready + s.delayed + s.running, 0, JSON.stringify(s));
    } finally {
      kv.close();
    }
  },
);

/** Every key under `prefix` whose part after it is `part`. */
async function keysUnder(kv: Deno.Kv, prefix: Deno.KvKey, part: string): Promise<number> {
  return (await Array.fromAsync(kv.list({ prefix: [...prefix, part] }))).length;
}

Deno.test(
  "dead letters go after deadLetterRetentionMs, counted; withQueues keeps none by default, as Deno",
  opts,
  async () => {
    const kv = await Deno.openKv(":memory:");
    try {
      const prefix = ["typed"];
      const queue = new KvQueue(kv, { prefix, deadLetterRetentionMs: 300 });
      queue.handle("doomed", () => {
        throw new Error("always");
      });
      await queue.enqueue("doomed", 1, { backoffSchedule: [] });
      await queue.enqueue("doomed", 2, {
        backoffSchedule: [],
        keysIfUndelivered: [["gave-up", 2]],
      });
      const runner = new KvQueueRunner(kv, queue);
      const running = runner.run();
      await waitFor("two dead letters", async () => (await queue.stats()).dead === 2);
      await runner.stop();
      await running;
      assert.equal(await queue.sweepDead(), 0, "swept before the retention passed");
      await new Promise((r) => setTimeout(r, 400));
      assert.equal(await queue.sweepDead(), 2);
      assert.deepEqual(await queue.stats(), { ready: 0, delayed: 0, running: 0, dead: 0 });
      for (const part of ["d", "dv", "dx"]) {
        assert.equal(await keysUnder(kv, prefix, part), 0, part);
      }
      assert.equal((await kv.get(["gave-up", 2])).value, 2);

      const { withQueues } = await import("../lib/kv_queue.ts");
      const deno = withQueues(kv, { prefix: ["deno"], onError: () => {} });
      const listening = deno.listenQueue(() => {
        throw new Error("always");
      });
      await deno.enqueue("x", { backoffSchedule: [], keysIfUndelivered: [["deno-gave-up"]] });
      await waitFor(
        "keysIfUndelivered",
        async () => (await kv.get(["deno-gave-up"])).value === "x",
      );
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(await keysUnder(kv, ["deno"], "d"), 0);
      assert.deepEqual(await new KvQueue(kv, { prefix: ["deno"] }).stats(), {
        ready: 0,
        delayed: 0,
        running: 0,
        dead: 0,
      });
      deno.close();
      await listening;
    } finally {
      try {
        kv.close();
      } catch { /* closed by withQueues */ }
    }
  },
);

Deno.test(
  "KvQueue.stats() reads counters and at most STATS_SAMPLE index entries, whatever the backlog",
  opts,
  async () => {
    const kv = await Deno.openKv(":memory:");
    try {
      const queue = new KvQueue(kv, { prefix: ["big"] });
      await queue.enqueueMany("n", Array.from({ length: 1500 }, (_, i) => i));
      await queue.enqueueMany("n", Array.from({ length: 300 }, (_, i) => i), { delayMs: 60_000 });
      let listed = 0;
      const counting = new Proxy(kv, {
        get(target, prop) {
          if (prop === "list") {
            return (sel: Deno.KvListSelector, o?: Deno.KvListOptions) => {
              const it = target.list(sel, o);
              return (async function* () {
                for await (const e of it) {
                  listed++;
                  yield e;
                }
              })();
            };
          }
          const v = Reflect.get(target, prop, target);
          return typeof v === "function" ? v.bind(target) : v;
        },
      });
      const s = await new KvQueue(counting, { prefix: ["big"] }).stats();
      assert.ok(listed <= 1000, `listed ${listed}`);
      // Totals exact; past the sample, the rest counts by the last entry read.
      assert.equal(s.ready + s.delayed + s.running, 1800);
      assert.deepEqual(s, { ready: 1800, delayed: 0, running: 0, dead: 0 });
    } finally {
      kv.close();
    }
  },
);

Deno.test(
  "worker SIGKILLed mid-handler: the pending counter equals the index, and reads 0 once drained",
  opts,
  async () => {
    const { join } = await import("node:path");
    const { DENO, openRemoteKv, ROOT, Running, startStack, TEST_TOKEN } = await import(
      "./_helpers/processes.ts"
    );
    await using stack = await startStack();
    const kv = await openRemoteKv(stack.proxy.url);
    const prefix = ["killed", crypto.randomUUID().slice(0, 6)];
    const queue = new KvQueue(kv, { prefix });
    const worker = (run: string) =>
      new Running(
        run,
        new Deno.Command(DENO, {
          args: ["run", "-A", join(ROOT, "tests/queue_fixtures/worker.ts")],
          env: {
            DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
            QUEUE_URL: stack.proxy.url,
            QUEUE_PREFIX: JSON.stringify(prefix),
            WORKER_RUN: run,
          },
          stdout: "piped",
          stderr: "piped",
        }).spawn(),
        0,
      );
    const counter = async () =>
      Number((await kv.get<Deno.KvU64>(queue.keys.count())).value?.value ?? 0n);
    try {
      await queue.enqueueMany("job", Array.from({ length: 120 }, (_, i) => i));
      const victim = worker("victim");
      await waitFor("20 handled", () => (victim.output.match(/^done /gm) ?? []).length >= 20, {
        timeoutMs: 30_000,
      });
      await victim.stop("SIGKILL");
      const indexed =
        (await Array.fromAsync(kv.list({ prefix: queue.keys.scheduleRoot() }))).length;
      assert.equal(await counter(), indexed);
      assert.ok(indexed > 0 && indexed < 120, `indexed ${indexed}`);
      const rescuer = worker("rescuer");
      try {
        await waitFor("drained", async () => await counter() === 0, {
          timeoutMs: 60_000,
          intervalMs: 100,
        });
      } finally {
        await rescuer.stop("SIGKILL");
      }
      assert.equal(
        (await Array.fromAsync(kv.list({ prefix: queue.keys.scheduleRoot() }))).length,
        0,
      );
      assert.deepEqual(await queue.stats(), { ready: 0, delayed: 0, running: 0, dead: 0 });
    } finally {
      kv.close();
    }
  },
);
