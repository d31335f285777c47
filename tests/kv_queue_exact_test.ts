/**
 * lib/kv_queue.ts under re-sent commits: the Deno KV client re-sends a write
 * whose answer was lost (or was a 5xx) although the server applied it. Every
 * commit the engine makes must stay correct when applied twice or when its
 * call fails after it was applied (tests/queue_fixtures/resending_kv.ts).
 */
import assert from "node:assert/strict";
import { KvQueue, KvQueueRunner, withQueues } from "../lib/kv_queue.ts";
import { type Mode, resendingKv } from "./queue_fixtures/resending_kv.ts";
import { waitFor } from "./_helpers/processes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

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

  Deno.test(`ordered appends ${how}: each message is in its line once`, opts, async () => {
    const raw = await Deno.openKv(":memory:");
    try {
      const r = resendingKv(raw, mode);
      const queue = new KvQueue(r.kv, { prefix: ["q"] });
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

  Deno.test(`enqueues ${how}: one message each, the counter exact`, opts, async () => {
    const raw = await Deno.openKv(":memory:");
    try {
      const r = resendingKv(raw, mode);
      const queue = new KvQueue(r.kv, { prefix: ["q"] });
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

  Deno.test(
    `claims and completions ${how}: first attempt runs once, nothing left`,
    opts,
    async () => {
      const raw = await Deno.openKv(":memory:");
      try {
        // Enqueued normally; only the runner's commits misbehave.
        const queue = new KvQueue(raw, { prefix: ["q"] });
        await queue.enqueueMany("c", Array.from({ length: 30 }, (_, i) => i));
        const r = resendingKv(raw, mode);
        const workerQueue = new KvQueue(r.kv, { prefix: ["q"] });
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

  Deno.test(`withQueues atomic().enqueue() ${how}: reported ok, delivered once`, opts, async () => {
    const raw = await Deno.openKv(":memory:");
    const r = resendingKv(raw, mode);
    const kv = withQueues(r.kv, { prefix: ["dq"] });
    const seen: unknown[] = [];
    const listening = kv.listenQueue((m) => {
      seen.push(m);
    });
    try {
      const entry = await raw.get(["balance"]);
      const res = await kv.atomic().check(entry).set(["balance"], 1).enqueue("paid").commit();
      assert.equal(res.ok, true);
      assert.equal((await kv.enqueue("second")).ok, true);
      await waitFor("both messages", () => seen.length >= 2, { timeoutMs: 10_000 });
      await new Promise((r) => setTimeout(r, 200));
      assert.deepEqual(seen.sort(), ["paid", "second"]);
    } finally {
      kv.close();
      await listening;
    }
  });
}

Deno.test("an enqueue re-sent after its message completed does not come back", opts, async () => {
  const raw = await Deno.openKv(":memory:");
  try {
    const r = resendingKv(raw, "normal");
    const queue = new KvQueue(r.kv, { prefix: ["q"] });
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
  Deno.test(
    `lease renewals ${
      mode === "twice" ? "applied twice" : "applied, then the call failed"
    }: the handler keeps its lease`,
    opts,
    async () => {
      const raw = await Deno.openKv(":memory:");
      try {
        const r = resendingKv(raw, mode);
        const queue = new KvQueue(r.kv, { prefix: ["q"] });
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
