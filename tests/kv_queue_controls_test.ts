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

Deno.test(
  "KvQueue.cancel() removes a scheduled, a ready and a waiting-in-line message; not a running one",
  opts,
  async () => {
    const kv = await Deno.openKv(":memory:");
    try {
      const queue = new KvQueue(kv, { prefix: ["cancel"] });
      const seen: string[] = [];
      const release = Promise.withResolvers<void>();
      queue.handle<string>("c", async (d) => {
        seen.push(d);
        if (d === "head") await release.promise;
      });
      const later = await queue.enqueue("c", "later", { delayMs: 60_000 });
      const ready = await queue.enqueue("c", "ready", { idempotencyKey: "k1" });
      await queue.enqueue("c", "head", { orderingKey: "line" });
      const second = await queue.enqueue("c", "second", { orderingKey: "line" });
      await queue.enqueue("c", "third", { orderingKey: "line" });
      assert.equal(await queue.cancel(later), true);
      assert.equal(await queue.cancel(ready), true);
      assert.equal(await queue.cancel(ready), false, "cancelled twice");
      assert.equal(await queue.cancel(second), true);
      assert.equal(await queue.cancel("nope"), false);
      // The idempotency key is free again.
      assert.notEqual(await queue.enqueue("c", "again", { idempotencyKey: "k1" }), ready);
      const runner = new KvQueueRunner(kv, queue);
      const running = runner.run();
      try {
        await waitFor("the head running", () => seen.includes("head"));
        const head = (await queue.listPending("running")).messages[0];
        assert.equal(await queue.cancel(head.id), false, "a running message was cancelled");
        release.resolve();
        await waitFor("the rest", () => seen.length === 3);
        await new Promise((r) => setTimeout(r, 200));
      } finally {
        await runner.stop();
        await running;
      }
      assert.deepEqual(seen.sort(), ["again", "head", "third"]);
      assert.deepEqual(await queue.stats(), { ready: 0, delayed: 0, running: 0, dead: 0 });
    } finally {
      kv.close();
    }
  },
);

Deno.test("KvQueue.listPending() pages through each state with a cursor", opts, async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const queue = new KvQueue(kv, { prefix: ["list"] });
    const ready = await queue.enqueueMany("l", Array.from({ length: 25 }, (_, i) => i));
    const delayed = await queue.enqueueMany("l", [1, 2, 3], { delayMs: 60_000 });
    const waiting = [
      await queue.enqueue("l", "a", { orderingKey: "k" }),
      await queue.enqueue("l", "b", { orderingKey: "k" }),
    ];
    const all = async (state: "ready" | "delayed" | "running" | "waiting") => {
      const ids: string[] = [];
      let cursor: string | undefined;
      let pages = 0;
      do {
        const page = await queue.listPending(state, { limit: 10, cursor });
        ids.push(...page.messages.map((m) => m.id));
        cursor = page.cursor;
        pages++;
      } while (cursor && pages < 20);
      return ids;
    };
    assert.deepEqual(await all("ready"), [...ready, waiting[0]]);
    assert.deepEqual(await all("delayed"), delayed);
    assert.deepEqual(await all("running"), []);
    assert.deepEqual(await all("waiting"), waiting);
    assert.throws(() => queue.listPending("bogus" as never), { name: "TypeError" });
  } finally {
    kv.close();
  }
});

Deno.test(
  "KvQueue.pause() stops every runner claiming, across queues on the same prefix; resume() restarts them",
  opts,
  async () => {
    const kv = await Deno.openKv(":memory:");
    try {
      const prefix = ["pause"];
      const admin = new KvQueue(kv, { prefix });
      const seen: number[] = [];
      const runners = [0, 1].map(() => {
        const q = new KvQueue(kv, { prefix });
        q.handle<number>("p", (n) => {
          seen.push(n);
        });
        return new KvQueueRunner(kv, q);
      });
      const running = runners.map((r) => r.run());
      try {
        await admin.enqueue("p", 1);
        await waitFor("the first message", () => seen.length === 1);
        await admin.pause();
        assert.equal(await admin.isPaused(), true);
        await new Promise((r) => setTimeout(r, 1_000));
        await admin.enqueueMany("p", [2, 3, 4]);
        await new Promise((r) => setTimeout(r, 1_000));
        assert.deepEqual(seen, [1], "a paused queue delivered");
        await admin.resume();
        await waitFor("the rest after resume", () => seen.length === 4, { timeoutMs: 5_000 });
      } finally {
        await Promise.all(runners.map((r) => r.stop()));
        await Promise.all(running);
      }
    } finally {
      kv.close();
    }
  },
);

Deno.test(
  "timeoutMs: a handler running past it has its signal aborted and the attempt fails, then retries",
  opts,
  async () => {
    const kv = await Deno.openKv(":memory:");
    try {
      const queue = new KvQueue(kv, { prefix: ["timeout"] });
      const attempts: { attempt: number; reason?: string }[] = [];
      const errors: unknown[] = [];
      queue.handle("t", async (_d, m) => {
        const entry: { attempt: number; reason?: string } = { attempt: m.attempt };
        attempts.push(entry);
        if (m.attempt === 1) {
          await new Promise<void>((r) => m.signal.addEventListener("abort", () => r()));
          entry.reason = (m.signal.reason as DOMException).name;
        }
      });
      await queue.enqueue("t", 1, { timeoutMs: 200, backoffSchedule: [10] });
      const runner = new KvQueueRunner(kv, queue, { onError: (e) => errors.push(e) });
      const running = runner.run();
      try {
        await waitFor("the retry", () => attempts.length === 2);
        await new Promise((r) => setTimeout(r, 100));
      } finally {
        await runner.stop();
        await running;
      }
      assert.deepEqual(attempts, [{ attempt: 1, reason: "TimeoutError" }, { attempt: 2 }]);
      assert.equal(errors.length, 1);
      assert.equal((errors[0] as DOMException).name, "TimeoutError");
      assert.deepEqual(await queue.stats(), { ready: 0, delayed: 0, running: 0, dead: 0 });
      await assert.rejects(() => queue.enqueue("t", 1, { timeoutMs: 2 ** 31 }), {
        name: "RangeError",
      });
    } finally {
      kv.close();
    }
  },
);

Deno.test(
  "KvQueueRunner under a backlog still fills a lone free slot while long handlers hold the rest",
  opts,
  async () => {
    const kv = await Deno.openKv(":memory:");
    try {
      const queue = new KvQueue(kv, { prefix: ["lone-slot"] });
      const hold = Promise.withResolvers<void>();
      let quick = 0;
      let held = 0;
      queue.handle<number>("m", async (n) => {
        if (n < 7) {
          held++;
          await hold.promise;
        } else quick++;
      });
      await queue.enqueueMany("m", Array.from({ length: 40 }, (_, i) => i));
      const runner = new KvQueueRunner(kv, queue, { concurrency: 8 });
      const running = runner.run();
      try {
        await waitFor("the 33 quick messages beside 7 held ones", () => quick === 33, {
          timeoutMs: 10_000,
        });
        assert.equal(held, 7);
      } finally {
        hold.resolve();
        await runner.stop();
        await running;
      }
    } finally {
      kv.close();
    }
  },
);

Deno.test(
  "dead letters written before the dead counter existed: purge and requeue leave the counter right",
  opts,
  async () => {
    const kv = await Deno.openKv(":memory:");
    try {
      const prefix = ["legacy"];
      const queue = new KvQueue(kv, { prefix });
      // As the engine before the counter stored them: no index entry, no count.
      const old = { type: "m", attempts: 1, error: "Error: old", failedAt: 1, enqueuedAt: 1 };
      await kv.set([...prefix, "d", "old-1"], old);
      await kv.set([...prefix, "dv", "old-1"], "v1");
      await kv.set([...prefix, "d", "old-2"], old);
      await kv.set([...prefix, "dv", "old-2"], "v2");
      assert.equal(await queue.purgeDead(["old-1"]), 1);
      assert.notEqual(await queue.requeueDead("old-2"), null);
      // A new dead letter now counts as one, not as one on top of a wrapped counter.
      queue.handle("m", (v) => {
        if (v !== "v2") throw new Error("always");
      });
      await queue.enqueue("m", "new", { backoffSchedule: [] });
      const runner = new KvQueueRunner(kv, queue);
      const running = runner.run();
      try {
        await waitFor("the new dead letter", async () => (await queue.listDead()).length === 1);
      } finally {
        await runner.stop();
        await running;
      }
      assert.deepEqual(await queue.stats(), { ready: 0, delayed: 0, running: 0, dead: 1 });
      const [letter] = await queue.listDead();
      assert.equal("c" in letter, false, "an internal field leaked into listDead()");
    } finally {
      kv.close();
    }
  },
);
