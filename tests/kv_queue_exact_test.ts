/**
 * lib/kv_queue.ts under re-sent commits: the Deno KV client re-sends a write
 * whose answer was lost (or was a 5xx) although the server applied it. Every
 * commit the engine makes must stay correct when applied twice or when its
 * call fails after it was applied (tests/queue_fixtures/resending_kv.ts).
 */
import assert from "node:assert/strict";
import { kvCron, KvQueue, KvQueueRunner, withQueues } from "../lib/kv_queue.ts";
import { type Mode, resendingKv } from "./queue_fixtures/resending_kv.ts";
import { openRemoteKv, type Stack, startStack, waitFor } from "./_helpers/processes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

let stack: Stack | null = null;
// With --filter the teardown test may not run: never leave the stack behind.
globalThis.addEventListener("unload", () => {
  for (const r of [stack?.proxy, stack?.denokv]) {
    try {
      r?.child.kill("SIGKILL");
    } catch { /* already gone */ }
  }
});

const backends = [
  { name: "memory", open: () => Deno.openKv(":memory:") },
  {
    name: "KV Connect",
    open: async () => {
      stack ??= await startStack();
      return await openRemoteKv(stack.proxy.url);
    },
  },
];

/** Registers `fn` once per backend, each run with its own key prefix. */
function exactTest(
  name: string,
  fn: (open: () => Promise<Deno.Kv>, prefix: Deno.KvKey) => Promise<void>,
): void {
  for (const b of backends) {
    Deno.test(`${name} (${b.name})`, opts, () => fn(b.open, ["exact", crypto.randomUUID()]));
  }
}

/** The queue's pending-message counter, read from KV. */
async function pendingCounter(kv: Deno.Kv, queue: KvQueue): Promise<bigint> {
  return (await kv.get<Deno.KvU64>(queue.keys.count())).value?.value ?? 0n;
}

/** Deliveries seen by a handler: data and attempt per message. */
function recorder(queue: KvQueue, type: string) {
  const seen: { data: unknown; attempt: number; id: string }[] = [];
  queue.handle(type, (data, m) => {
    seen.push({ data, attempt: m.attempt, id: m.id });
  });
  return seen;
}

async function drain(kv: Deno.Kv, queue: KvQueue, until: () => boolean): Promise<void> {
  const runner = new KvQueueRunner(kv, queue, { concurrency: 8, leaseMs: 20_000 });
  const running = runner.run();
  try {
    // Well under leaseMs: a claim reported lost would sit leased until then.
    await waitFor("every message handled", until, { timeoutMs: 10_000, intervalMs: 10 });
    await new Promise((r) => setTimeout(r, 200));
  } finally {
    await runner.stop();
    await running;
  }
}

for (const mode of ["twice", "lost"] as Mode[]) {
  const how = mode === "twice"
    ? "applied twice (the re-send's answer returned)"
    : "applied, then the call failed";

  exactTest(`ordered appends ${how}: each message is in its line once`, async (open, P) => {
    const raw = await open();
    try {
      const r = resendingKv(raw, mode);
      const queue = new KvQueue(r.kv, { prefix: P });
      const seen = recorder(queue, "o");
      for (let i = 0; i < 5; i++) await queue.enqueue("o", i, { orderingKey: "k" });
      await queue.enqueueMany("o", [5, 6, 7], { orderingKey: "k" });
      await drain(r.kv, queue, () => seen.length >= 8);
      assert.deepEqual(seen.map((s) => s.data), [0, 1, 2, 3, 4, 5, 6, 7]);
      assert.deepEqual(await queue.stats(), { ready: 0, delayed: 0, running: 0, dead: 0 });
      assert.equal(await pendingCounter(raw, queue), 0n);
    } finally {
      raw.close();
    }
  });

  exactTest(`enqueues ${how}: one message each, the counter exact`, async (open, P) => {
    const raw = await open();
    try {
      const r = resendingKv(raw, mode);
      const queue = new KvQueue(r.kv, { prefix: P });
      const ids = [
        await queue.enqueue("e", "plain"),
        await queue.enqueue("e", "idem", { idempotencyKey: "once" }),
        ...await queue.enqueueMany("e", ["m1", "m2", "m3"]),
      ];
      assert.equal(new Set(ids).size, 5);
      assert.equal(await pendingCounter(raw, queue), 5n);
      assert.equal((await queue.stats()).ready, 5);
    } finally {
      raw.close();
    }
  });

  exactTest(
    `claims and completions ${how}: first attempt runs once, nothing left`,
    async (open, P) => {
      const raw = await open();
      try {
        // Enqueued normally; only the runner's commits misbehave.
        const queue = new KvQueue(raw, { prefix: P });
        await queue.enqueueMany("c", Array.from({ length: 30 }, (_, i) => i));
        const r = resendingKv(raw, mode);
        const workerQueue = new KvQueue(r.kv, { prefix: P });
        const seen = recorder(workerQueue, "c");
        await drain(r.kv, workerQueue, () => seen.length >= 30);
        assert.equal(seen.length, 30, "a message ran twice");
        assert.deepEqual(seen.map((s) => s.attempt).filter((a) => a !== 1), []);
        assert.deepEqual(await queue.stats(), { ready: 0, delayed: 0, running: 0, dead: 0 });
        assert.equal(await pendingCounter(raw, queue), 0n);
      } finally {
        raw.close();
      }
    },
  );

  exactTest(
    `withQueues atomic().enqueue() ${how}: reported ok, delivered once`,
    async (open, P) => {
      const raw = await open();
      const r = resendingKv(raw, mode);
      const kv = withQueues(r.kv, { prefix: [...P, "deno"] });
      const seen: unknown[] = [];
      const listening = kv.listenQueue((m) => {
        seen.push(m);
      });
      try {
        const entry = await raw.get([...P, "balance"]);
        const res = await kv.atomic().check(entry).set([...P, "balance"], 1).enqueue("paid")
          .commit();
        assert.equal(res.ok, true);
        assert.equal((await kv.enqueue("second")).ok, true);
        await waitFor("both messages", () => seen.length >= 2, { timeoutMs: 10_000 });
        await new Promise((r) => setTimeout(r, 200));
        assert.deepEqual(seen.sort(), ["paid", "second"]);
      } finally {
        kv.close();
        await listening;
      }
    },
  );
}

exactTest("an enqueue re-sent after its message completed does not come back", async (open, P) => {
  const raw = await open();
  try {
    const r = resendingKv(raw, "normal");
    const queue = new KvQueue(r.kv, { prefix: P });
    const seen = recorder(queue, "late");
    await queue.enqueue("late", "plain");
    await queue.enqueue("late", "ordered", { orderingKey: "k" });
    await queue.enqueue("late", "idem", { idempotencyKey: "i" });
    const enqueues = [...r.commits];
    await drain(r.kv, queue, () => seen.length >= 3);
    for (const calls of enqueues) await r.replay(calls);
    await drain(r.kv, queue, () => true);
    assert.deepEqual(seen.map((s) => s.data).sort(), ["idem", "ordered", "plain"]);
    assert.deepEqual(await queue.stats(), { ready: 0, delayed: 0, running: 0, dead: 0 });
    assert.equal(await pendingCounter(raw, queue), 0n);
  } finally {
    raw.close();
  }
});

for (const mode of ["twice", "lost"] as Mode[]) {
  exactTest(
    `lease renewals ${
      mode === "twice" ? "applied twice" : "applied, then the call failed"
    }: the handler keeps its lease`,
    async (open, P) => {
      const raw = await open();
      try {
        const r = resendingKv(raw, mode);
        const queue = new KvQueue(r.kv, { prefix: P });
        const results: { aborted: boolean; attempt: number }[] = [];
        queue.handle("slow", async (_data, m) => {
          // Ten renewals at a third of leaseMs each.
          await new Promise((r) => setTimeout(r, 1_000));
          results.push({ aborted: m.signal.aborted, attempt: m.attempt });
        });
        await queue.enqueue("slow", 1);
        const runner = new KvQueueRunner(r.kv, queue, { leaseMs: 300 });
        const running = runner.run();
        try {
          await waitFor("the handler", () => results.length >= 1, { timeoutMs: 10_000 });
          await new Promise((r) => setTimeout(r, 500));
        } finally {
          await runner.stop();
          await running;
        }
        assert.deepEqual(results, [{ aborted: false, attempt: 1 }]);
        assert.equal(await pendingCounter(raw, queue), 0n);
      } finally {
        raw.close();
      }
    },
  );
}

for (const mode of ["twice", "lost"] as Mode[]) {
  exactTest(
    `cron ticks ${
      mode === "twice" ? "applied twice" : "applied, then the call failed"
    }: each tick runs once`,
    async (open, P) => {
      const raw = await open();
      try {
        const r = resendingKv(raw, mode);
        const ticks: number[] = [];
        const controller = new AbortController();
        const job = kvCron(r.kv, {
          name: "tick",
          schedule: "* * * * * *",
          prefix: P,
          signal: controller.signal,
          handler: ({ tick }) => {
            ticks.push(tick);
          },
        });
        await waitFor("three ticks", () => ticks.length >= 3, { timeoutMs: 10_000 });
        controller.abort();
        await job;
        assert.equal(new Set(ticks).size, ticks.length, `a tick ran twice: ${ticks}`);
      } finally {
        raw.close();
      }
    },
  );
}

Deno.test("teardown: stop the shared stack", opts, async () => {
  // deno-lint-ignore no-explicit-any
  const s = stack as any;
  stack = null;
  await s?.[Symbol.asyncDispose]();
});
