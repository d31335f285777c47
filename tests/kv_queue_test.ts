/**
 * Tests for lib/kv_queue.ts. Every behaviour runs twice: on
 * `Deno.openKv(":memory:")` and over KV Connect through the proxy and the
 * denokv stand-in. Process tests (a script importing the library from the
 * proxy's URL, two workers with one SIGKILLed) run over KV Connect only.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  DEFAULT_BACKOFF_SCHEDULE,
  EnqueueManyError,
  KvQueue,
  KvQueueRunner,
  MAX_VALUE_BYTES,
  withQueues,
} from "../lib/kv_queue.ts";
import {
  DENO,
  openRemoteKv,
  ROOT,
  Running,
  type Stack,
  startStack,
  startStandin,
  TEST_TOKEN,
  waitFor,
} from "./_helpers/processes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let stack: Stack | null = null;
// With --filter the teardown test may not run: never leave the stack behind.
globalThis.addEventListener("unload", () => {
  for (const r of [stack?.proxy, stack?.denokv]) {
    try {
      r?.child.kill("SIGKILL");
    } catch { /* already gone */ }
  }
});
let prefixCounter = 0;

interface Backend {
  name: string;
  open(): Promise<Deno.Kv>;
}

const backends: Backend[] = [
  { name: "memory", open: () => Deno.openKv(":memory:") },
  {
    name: "KV Connect",
    open: async () => {
      stack ??= await startStack();
      return await openRemoteKv(stack.proxy.url);
    },
  },
];

/** Registers `fn` once per backend; each run gets a fresh kv and its own prefix. */
function queueTest(
  name: string,
  fn: (kv: Deno.Kv, prefix: Deno.KvKey) => Promise<void>,
): void {
  for (const backend of backends) {
    Deno.test(`${name} (${backend.name})`, opts, async () => {
      const kv = await backend.open();
      try {
        await fn(kv, ["test", ++prefixCounter, crypto.randomUUID()]);
      } finally {
        // withQueues tests close through the wrapper, as Deno's examples do.
        try {
          kv.close();
        } catch { /* already closed */ }
      }
    });
  }
}

/** Runs a runner until `until` holds, then stops it. */
async function runUntil(
  runner: KvQueueRunner,
  what: string,
  until: () => boolean,
  timeoutMs = 20_000,
): Promise<void> {
  const running = runner.run();
  try {
    await waitFor(what, until, { timeoutMs, intervalMs: 10 });
  } finally {
    await runner.stop();
    await running;
  }
}

async function emptyQueue(queue: KvQueue): Promise<void> {
  await waitFor("the queue to be empty", async () => {
    const s = await queue.stats();
    return s.ready + s.delayed + s.running === 0;
  });
}

// --- Deno-compatible face -------------------------------------------------

queueTest(
  "withQueues(): Deno's listenQueue/enqueue example runs unchanged",
  async (raw, prefix) => {
    // From Deno's queue docs; only the withQueues line is added.
    const kv = withQueues(raw, { prefix });
    const seen: unknown[] = [];
    interface Notification {
      forUser: string;
      body: string;
    }
    function isNotification(o: unknown): o is Notification {
      return (o as Notification)?.forUser !== undefined &&
        typeof (o as Notification).forUser === "string";
    }
    const listening = kv.listenQueue((msg: unknown) => {
      if (isNotification(msg)) seen.push(msg);
      else throw new Error("unknown message");
    });
    const message: Notification = { forUser: "alovelace", body: "You've got mail!" };
    const result = await kv.enqueue(message, { delay: 200 });
    assert.equal(result.ok, true);
    assert.equal(typeof result.versionstamp, "string");
    await waitFor("the notification", () => seen.length === 1);
    assert.deepEqual(seen, [message]);
    kv.close();
    await listening;
  },
);

queueTest(
  "withQueues(): Deno's nonce/balance example runs as documented; a failed check enqueues nothing",
  async (raw, prefix) => {
    // Deno's example opens its kv here; the withQueues line is the only addition.
    const kv = withQueues(raw, { prefix });
    await kv.set(["balance", "bob"], 100);
    await kv.set(["balance", "liz"], 0);
    let handled = 0;

    // --- from Deno's queue documentation, unchanged but for the type
    // parameters and `!` that strict TypeScript needs, and the `handled` count ---
    kv.listenQueue(async (msg) => {
      const nonce = await kv.get(["nonces", msg.nonce]);
      if (nonce.value === null) {
        // This messaged was already processed
        return;
      }

      const change = msg.change;
      const bob = await kv.get<number>(["balance", "bob"]);
      const liz = await kv.get<number>(["balance", "liz"]);

      const success = await kv.atomic()
        // Ensure this message was not yet processed by checking its nonce
        .check({ key: nonce.key, versionstamp: nonce.versionstamp })
        .delete(nonce.key)
        .sum(["processed_count"], 1n)
        // Ensure the balances have not changed
        .check(bob, liz)
        .set(["balance", "bob"], bob.value! - change)
        .set(["balance", "liz"], liz.value! + change)
        .commit();
      if (success.ok) handled++;
    });

    // Modify keys AND enqueue messages in the same KV transaction!
    const nonce = crypto.randomUUID();
    await kv
      .atomic()
      .check({ key: ["nonces", nonce], versionstamp: null })
      .enqueue({ nonce: nonce, change: 10 })
      .set(["nonces", nonce], true)
      .sum(["enqueued_count"], 1n)
      .commit();
    // --- end of Deno's example ---

    // The same commit again fails its check: nothing may be enqueued.
    const again = await kv.atomic()
      .check({ key: ["nonces", nonce], versionstamp: null })
      .enqueue({ nonce: nonce, change: 1000 })
      .set(["nonces", nonce], true)
      .commit();
    assert.equal(again.ok, false);

    await waitFor(
      "the transfer",
      async () => (await kv.get<Deno.KvU64>(["processed_count"])).value?.value === 1n,
    );
    await sleep(300);
    assert.equal(handled, 1);
    assert.equal((await kv.get(["balance", "bob"])).value, 90);
    assert.equal((await kv.get(["balance", "liz"])).value, 10);
    assert.equal((await kv.get<Deno.KvU64>(["enqueued_count"])).value?.value, 1n);
    assert.equal((await kv.get(["nonces", nonce])).value, null);
    assert.deepEqual(await new KvQueue(raw, { prefix }).stats(), {
      ready: 0,
      delayed: 0,
      running: 0,
      dead: 0,
    });
    kv.close();
  },
);

queueTest(
  "withQueues(): keysIfUndelivered and backoffSchedule follow Deno's semantics",
  async (raw, prefix) => {
    const kv = withQueues(raw, { prefix });
    let calls = 0;
    const listening = kv.listenQueue(() => {
      calls++;
      throw new Error("always fails");
    });
    await kv.enqueue("lost", {
      keysIfUndelivered: [["undelivered", 1]],
      backoffSchedule: [10, 10],
    });
    await waitFor(
      "the undelivered key",
      async () => (await kv.get(["undelivered", 1])).value === "lost",
    );
    assert.equal(calls, 3);
    kv.close();
    await listening;
  },
);

// --- typed face -----------------------------------------------------------

queueTest("KvQueue.enqueue() delays delivery by delayMs", async (kv, prefix) => {
  const queue = new KvQueue(kv, { prefix });
  const delayMs = 1_500;
  let deliveredAt = 0;
  queue.handle("later", () => {
    deliveredAt = Date.now();
  });
  const runner = new KvQueueRunner(kv, queue);
  const running = runner.run();
  const t0 = Date.now();
  await queue.enqueue("later", 1, { delayMs });
  await sleep(delayMs - 400);
  assert.equal(deliveredAt, 0, "delivered before the delay");
  const s = await queue.stats();
  assert.equal(s.delayed, 1);
  await waitFor("delivery", () => deliveredAt > 0, { timeoutMs: 10_000 });
  assert.ok(deliveredAt - t0 >= delayMs, `delivered after ${deliveredAt - t0} ms`);
  // Generous: "soon after" without timing-fragility on a loaded machine.
  assert.ok(deliveredAt - t0 < delayMs + 3_000, `delivered after ${deliveredAt - t0} ms`);
  await runner.stop();
  await running;
});

queueTest(
  "KvQueueRunner retries a handler that throws twice, then the message is gone",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const attempts: number[] = [];
    queue.handle("flaky", (_data, msg) => {
      attempts.push(msg.attempt);
      if (attempts.length <= 2) throw new Error(`fail ${attempts.length}`);
    });
    const errors: unknown[] = [];
    const runner = new KvQueueRunner(kv, queue, { onError: (e) => errors.push(e) });
    await queue.enqueue("flaky", "x", { backoffSchedule: [20, 20, 20] });
    await runUntil(runner, "three deliveries", () => attempts.length === 3);
    await sleep(200);
    assert.deepEqual(attempts, [1, 2, 3]);
    assert.equal(errors.length, 2);
    assert.deepEqual(await queue.stats(), { ready: 0, delayed: 0, running: 0, dead: 0 });
    assert.equal(
      (await Array.fromAsync(kv.list({ prefix }))).filter((e) =>
        e.key[3] !== "count" && e.key[3] !== "sig"
      ).length,
      0,
    );
  },
);

queueTest(
  "KvQueueRunner dead-letters an always failing message and writes keysIfUndelivered",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    let calls = 0;
    queue.handle("doomed", () => {
      calls++;
      throw new TypeError("nope");
    });
    const runner = new KvQueueRunner(kv, queue);
    const id = await queue.enqueue("doomed", { order: 7 }, {
      maxAttempts: 3,
      backoffSchedule: [10],
      keysIfUndelivered: [["failed", "a"], ["failed", "b"]],
    });
    await runUntil(runner, "the dead letter", () => calls === 3);
    await waitFor("the dead letter", async () => (await queue.stats()).dead === 1);
    assert.deepEqual((await kv.get(["failed", "a"])).value, { order: 7 });
    assert.deepEqual((await kv.get(["failed", "b"])).value, { order: 7 });
    const dead = await queue.listDead();
    assert.equal(dead.length, 1);
    assert.equal(dead[0].id, id);
    assert.equal(dead[0].type, "doomed");
    assert.deepEqual(dead[0].value, { order: 7 });
    assert.equal(dead[0].attempts, 3);
    assert.match(dead[0].error, /TypeError: nope/);

    // Re-queue: it runs again (and succeeds this time).
    const handled: unknown[] = [];
    queue.handle("doomed", (d) => {
      handled.push(d);
    });
    const again = await queue.requeueDead(id);
    assert.ok(again);
    assert.equal((await queue.stats()).dead, 0);
    await runUntil(
      new KvQueueRunner(kv, queue),
      "the re-queued message",
      () => handled.length === 1,
    );
    assert.deepEqual(handled, [{ order: 7 }]);

    // Purge.
    queue.handle("doomed", () => {
      throw new Error("again");
    });
    await queue.enqueue("doomed", 1, { maxAttempts: 1 });
    await queue.enqueue("doomed", 2, { maxAttempts: 1 });
    const r = new KvQueueRunner(kv, queue);
    const running = r.run();
    await waitFor("two dead letters", async () => (await queue.stats()).dead === 2);
    await r.stop();
    await running;
    assert.equal(await queue.purgeDead(), 2);
    assert.deepEqual(await queue.listDead(), []);
  },
);

queueTest(
  "KvQueueRunner renews the lease: a handler running 3x the lease is delivered once",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const leaseMs = 400;
    const deliveries: string[] = [];
    queue.handle("slow", async (_d, msg) => {
      deliveries.push(msg.id);
      await sleep(leaseMs * 3);
    });
    // Two runners (two owners) compete: the second must not steal the renewed lease.
    const a = new KvQueueRunner(kv, queue, { leaseMs });
    const b = new KvQueueRunner(kv, queue, { leaseMs });
    const ra = a.run();
    const rb = b.run();
    const id = await queue.enqueue("slow", null);
    await waitFor("the message to finish", async () => {
      const s = await queue.stats();
      return deliveries.length > 0 && s.ready + s.running + s.delayed === 0;
    });
    await sleep(leaseMs * 2);
    await Promise.all([a.stop(), b.stop()]);
    await Promise.all([ra, rb]);
    assert.deepEqual(deliveries, [id]);
  },
);

queueTest(
  "KvQueueRunner.stop() lets handlers in flight finish; nothing lost or duplicated",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const started = new Map<number, number>();
    const finished = new Map<number, number>();
    queue.handle<number>("job", async (n) => {
      started.set(n, (started.get(n) ?? 0) + 1);
      await sleep(300);
      finished.set(n, (finished.get(n) ?? 0) + 1);
    });
    const total = 30;
    await queue.enqueueMany("job", Array.from({ length: total }, (_, i) => i));
    const first = new KvQueueRunner(kv, queue, { concurrency: 5 });
    const running = first.run();
    await waitFor("five handlers in flight", () => first.inFlight === 5);
    await first.stop();
    await running;
    // Everything that started has finished, and no more was taken.
    assert.equal(first.inFlight, 0);
    assert.deepEqual([...started.keys()].sort(), [...finished.keys()].sort());
    assert.ok(started.size >= 5 && started.size < total, `started ${started.size}`);

    const second = new KvQueueRunner(kv, queue, { concurrency: 10 });
    await runUntil(second, "all jobs", () => finished.size === total);
    for (let i = 0; i < total; i++) assert.equal(finished.get(i), 1, `job ${i}`);
    await emptyQueue(queue);
  },
);

queueTest(
  "KvQueueRunner.stop() gives back a handler that outlives stopTimeoutMs, aborting its signal; this process never runs it twice at once",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const never = Promise.withResolvers<void>();
    const deliveries: number[] = [];
    let aborted: unknown = null;
    queue.handle("stuck", async (_d, msg) => {
      deliveries.push(msg.attempt);
      if (deliveries.length === 1) {
        msg.signal.addEventListener("abort", () => aborted = msg.signal.reason);
        await never.promise;
      }
    });
    const first = new KvQueueRunner(kv, queue, { stopTimeoutMs: 100 });
    const running = first.run();
    await queue.enqueue("stuck", 1);
    await waitFor("the first delivery", () => deliveries.length === 1);
    await first.stop();
    await running;
    assert.match(String(aborted), /no longer held/);
    // The lease was given back at once (not left to expire, 30 s by default),
    // and the delivery that never finished does not count.
    assert.deepEqual(await queue.stats(), { ready: 1, delayed: 0, running: 0, dead: 0 });
    // Another runner of this process leaves it while the old handler runs...
    const second = new KvQueueRunner(kv, queue);
    const secondRunning = second.run();
    await sleep(500);
    assert.deepEqual(deliveries, [1]);
    // ...and takes it once that handler is done.
    never.resolve();
    await waitFor("redelivery", () => deliveries.length === 2, { timeoutMs: 10_000 });
    await second.stop();
    await secondRunning;
    assert.deepEqual(deliveries, [1, 1]);
    await emptyQueue(queue);
  },
);

queueTest(
  "KvQueueRunner: a completion whose lease was taken over does not block the others finishing with it",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const gate = Promise.withResolvers<void>();
    const started: string[] = [];
    queue.handle("g", async (_d, msg) => {
      started.push(msg.id);
      await gate.promise;
    });
    const ids = await queue.enqueueMany("g", [1, 2, 3]);
    const runner = new KvQueueRunner(kv, queue, { concurrency: 3 });
    const running = runner.run();
    await waitFor("three handlers", () => started.length === 3);
    // Another worker takes over the second message's lease (as after a long GC pause).
    const entries = await Array.fromAsync(kv.list<Record<string, unknown>>({
      prefix: queue.keys.scheduleRoot(),
    }));
    const taken = entries.find((e) => e.key.at(-1) === ids[1])!;
    await kv.atomic()
      .delete(taken.key)
      .set(queue.keys.schedule(Date.now() + 60_000, ids[1]), {
        ...taken.value,
        owner: "someone else",
      })
      .commit();
    gate.resolve();
    const pending = async () =>
      (await Array.fromAsync(kv.list({ prefix: queue.keys.scheduleRoot() })))
        .map((e) => e.key.at(-1));
    await waitFor("two messages gone", async () => (await pending()).length === 1);
    assert.deepEqual(await pending(), [ids[1]]);
    assert.equal((await queue.stats()).running, 1);
    await runner.stop();
    await running;
  },
);

queueTest(
  "KvQueue: idempotencyKey makes a second enqueue a no-op while pending",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const a = await queue.enqueue("once", 1, { idempotencyKey: "k" });
    const b = await queue.enqueue("once", 2, { idempotencyKey: "k" });
    assert.equal(a, b);
    assert.equal((await queue.stats()).ready, 1);
    const got: unknown[] = [];
    queue.handle("once", (d) => {
      got.push(d);
    });
    await runUntil(new KvQueueRunner(kv, queue), "delivery", () => got.length === 1);
    await emptyQueue(queue);
    assert.deepEqual(got, [1]);
    // Once handled, the key is free again.
    const c = await queue.enqueue("once", 3, { idempotencyKey: "k" });
    assert.notEqual(c, a);
  },
);

queueTest(
  "KvQueueRunner delivers in FIFO order by due time with concurrency 1",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const order: number[] = [];
    queue.handle<number>("n", (n) => {
      order.push(n);
    });
    await queue.enqueueMany("n", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
    await queue.enqueue("n", -1, { delayMs: 0 });
    await runUntil(
      new KvQueueRunner(kv, queue, { concurrency: 1 }),
      "all",
      () => order.length === 13,
    );
    assert.deepEqual(order, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, -1]);
  },
);

queueTest("KvQueue.stats() counts ready, delayed, running and dead", async (kv, prefix) => {
  const queue = new KvQueue(kv, { prefix });
  await queue.enqueue("a", 1);
  await queue.enqueue("a", 2, { delayMs: 60_000 });
  assert.deepEqual(await queue.stats(), { ready: 1, delayed: 1, running: 0, dead: 0 });
  const hold = Promise.withResolvers<void>();
  queue.handle("a", () => hold.promise);
  const runner = new KvQueueRunner(kv, queue);
  const running = runner.run();
  await waitFor("one running", async () => (await queue.stats()).running === 1);
  assert.deepEqual(await queue.stats(), { ready: 0, delayed: 1, running: 1, dead: 0 });
  hold.resolve();
  await waitFor("none running", async () => (await queue.stats()).running === 0);
  await runner.stop();
  await running;
  assert.deepEqual(await queue.stats(), { ready: 0, delayed: 1, running: 0, dead: 0 });
});

queueTest("KvQueue.enqueue() refuses when the backlog limit is reached", async (kv, prefix) => {
  const queue = new KvQueue(kv, { prefix, backlogLimit: 3 });
  await queue.enqueueMany("x", [1, 2, 3]);
  await assert.rejects(
    () => new KvQueue(kv, { prefix, backlogLimit: 3 }).enqueue("x", 4),
    (e: unknown) =>
      e instanceof RangeError && /backlog is full: 3 pending.*"backlogLimit" is 3/.test(e.message),
  );
});

queueTest(
  "KvQueueRunner wakes on enqueue from another client without polling",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const got: number[] = [];
    queue.handle<number>("w", (n) => {
      got.push(n);
    });
    const runner = new KvQueueRunner(kv, queue);
    const running = runner.run();
    await sleep(300); // the runner is idle now, waiting on its watch
    const t0 = Date.now();
    await queue.enqueue("w", 1);
    await waitFor("delivery", () => got.length === 1);
    const ms = Date.now() - t0;
    await runner.stop();
    await running;
    assert.ok(ms < 3_000, `picked up after ${ms} ms`);
  },
);

queueTest(
  "KvQueue: a 64 KiB value is delivered whole; a larger one fails alone with a clear error",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const got: Uint8Array[] = [];
    queue.handle<Uint8Array>("blob", (data) => {
      got.push(data);
    });
    const max = new Uint8Array(MAX_VALUE_BYTES).map((_, i) => i % 251);
    // Enqueued together, so they would share commits: the oversized one must
    // not take the others down with it.
    const results = await Promise.allSettled([
      queue.enqueue("blob", new Uint8Array([1, 2, 3])),
      queue.enqueue("blob", new Uint8Array(MAX_VALUE_BYTES + 1)),
      queue.enqueue("blob", max),
    ]);
    assert.equal(results[0].status, "fulfilled");
    assert.equal(results[2].status, "fulfilled");
    assert.equal(results[1].status, "rejected");
    assert.match(String((results[1] as PromiseRejectedResult).reason), /too large/i);
    await runUntil(new KvQueueRunner(kv, queue), "two blobs", () => got.length === 2);
    const sizes = got.map((b) => b.length).sort((a, b) => a - b);
    assert.deepEqual(sizes, [3, MAX_VALUE_BYTES]);
    assert.deepEqual(got.find((b) => b.length === MAX_VALUE_BYTES), max);
    await emptyQueue(queue);
  },
);

queueTest(
  "KvQueue.enqueue(): a value KV cannot store fails alone; the others enqueued with it go through",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const results = await Promise.allSettled([
      queue.enqueue("t", { n: 1 }),
      queue.enqueue("t", { n: 2, f: () => 2 }),
      queue.enqueue("t", { n: 3 }),
    ]);
    assert.deepEqual(results.map((r) => r.status), ["fulfilled", "rejected", "fulfilled"]);
    assert.match(String((results[1] as PromiseRejectedResult).reason), /clone/i);
    const got: number[] = [];
    queue.handle<{ n: number }>("t", (d) => {
      got.push(d.n);
    });
    await runUntil(new KvQueueRunner(kv, queue), "two messages", () => got.length === 2);
    assert.deepEqual(got.sort(), [1, 3]);
  },
);

queueTest(
  "KvQueue.enqueueMany(): a failed batch throws EnqueueManyError listing what was enqueued",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const items: unknown[] = Array.from({ length: 40 }, (_, i) => ({ i }));
    items[33] = { i: 33, f: () => 33 };
    const err = await queue.enqueueMany("t", items).then(() => null, (e) => e);
    assert.ok(err instanceof EnqueueManyError, String(err));
    const enqueued = new Set(err.enqueuedIds);
    assert.ok(enqueued.size > 0 && enqueued.size < 40, `${enqueued.size} enqueued`);
    const seen = new Set<string>();
    queue.handle("t", (_d, msg) => {
      seen.add(msg.id);
    });
    await runUntil(
      new KvQueueRunner(kv, queue),
      "the enqueued ones",
      () => seen.size === enqueued.size,
    );
    await sleep(100);
    assert.deepEqual([...seen].sort(), [...enqueued].sort());
  },
);

queueTest(
  "KvQueue: appends on one orderingKey from two clients while it runs: none lost, none twice, order kept",
  async (kv, prefix) => {
    const a = new KvQueue(kv, { prefix });
    const b = new KvQueue(kv, { prefix });
    const seen: string[] = [];
    let running = 0;
    let overlap = false;
    a.handle<string>("o", async (name) => {
      if (++running > 1) overlap = true;
      seen.push(name);
      await sleep(1);
      running--;
    });
    const runner = new KvQueueRunner(kv, a, { concurrency: 8 });
    const run = runner.run();
    const produce = async (q: KvQueue, who: string) => {
      for (let i = 0; i < 60; i++) await q.enqueue("o", `${who}${i}`, { orderingKey: "k" });
    };
    await Promise.all([produce(a, "a"), produce(b, "b")]);
    await waitFor("120 messages", () => seen.length >= 120, { timeoutMs: 30_000 });
    await runner.stop();
    await run;
    assert.equal(seen.length, 120);
    assert.equal(new Set(seen).size, 120, "a message ran twice");
    assert.equal(overlap, false, "two messages of one ordering key ran at once");
    for (const who of ["a", "b"]) {
      const mine = seen.filter((s) => s.startsWith(who)).map((s) => Number(s.slice(1)));
      assert.deepEqual(mine, Array.from({ length: 60 }, (_, i) => i), `order of ${who}`);
    }
    await emptyQueue(a);
  },
);

queueTest(
  "KvQueueRunner: deliveries that never finished count; past the last attempt the message is dead unrun",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    let calls = 0;
    queue.handle("t", () => {
      calls++;
    });
    await queue.enqueue("t", "lost twice", { maxAttempts: 2 });
    // As if two workers had claimed it and died: its envelope counts 2 deliveries.
    const [entry] = await Array.fromAsync(
      kv.list<Record<string, unknown>>({ prefix: queue.keys.scheduleRoot() }),
    );
    await kv.atomic().check(entry).set(entry.key, { ...entry.value, n: 2 }).commit();
    const runner = new KvQueueRunner(kv, queue);
    const running = runner.run();
    await waitFor("the dead letter", async () => (await queue.stats()).dead === 1);
    await runner.stop();
    await running;
    assert.equal(calls, 0);
    const [dead] = await queue.listDead();
    assert.equal(dead.value, "lost twice");
    assert.equal(dead.attempts, 2);
    assert.match(dead.error, /no attempts left: 2 deliveries started and none finished/);
  },
);

queueTest(
  "KvQueueRunner: a message without a handler here goes back for another worker, uncounted",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const errors: unknown[] = [];
    await queue.enqueue("new-type", 1);
    const t0 = Date.now();
    await runUntil(
      new KvQueueRunner(kv, queue, { onError: (e) => errors.push(e) }),
      "the error",
      () => errors.length === 1,
    );
    assert.match(String(errors[0]), /NoHandler: no handler for message type "new-type" here/);
    const [entry] = await Array.fromAsync(
      kv.list<{ n: number; nh: number }>({ prefix: queue.keys.scheduleRoot() }),
    );
    assert.equal(entry.value.n, 0, "the bounce was counted as a delivery");
    assert.equal(entry.value.nh, 1);
    const due = entry.key.at(-2) as number;
    assert.ok(due >= t0 + 4_000, `back in ${due - t0} ms`);
    assert.equal((await queue.stats()).dead, 0);
  },
);

queueTest(
  "withQueues() and KvQueue on one database keep to their own messages by default",
  async (raw) => {
    const compat = withQueues(raw);
    const typed = new KvQueue(raw);
    const denoGot: unknown[] = [];
    const typedGot: unknown[] = [];
    typed.handle("email", (d) => {
      typedGot.push(d);
    });
    const listening = compat.listenQueue((m) => {
      denoGot.push(m);
    });
    const runner = new KvQueueRunner(raw, typed);
    const running = runner.run();
    await compat.enqueue("for listenQueue");
    await typed.enqueue("email", "for the typed runner");
    await waitFor("both", () => denoGot.length === 1 && typedGot.length === 1);
    await sleep(200);
    assert.deepEqual(denoGot, ["for listenQueue"]);
    assert.deepEqual(typedGot, ["for the typed runner"]);
    await runner.stop();
    await running;
    compat.close();
    await listening;
  },
);

// --- ordering keys ------------------------------------------------------------

queueTest(
  "KvQueue: one orderingKey runs one message at a time in enqueue order; other keys run beside it",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const order = new Map<string, number[]>();
    const running = new Map<string, number>();
    let maxPerKey = 0;
    let maxOverall = 0;
    let overall = 0;
    queue.handle<{ key: string; n: number }>("o", async ({ key, n }) => {
      running.set(key, (running.get(key) ?? 0) + 1);
      overall++;
      maxPerKey = Math.max(maxPerKey, running.get(key)!);
      maxOverall = Math.max(maxOverall, overall);
      order.set(key, [...(order.get(key) ?? []), n]);
      await sleep(30);
      running.set(key, running.get(key)! - 1);
      overall--;
    });
    for (let n = 0; n < 5; n++) {
      for (const key of ["a", "b"]) await queue.enqueue("o", { key, n }, { orderingKey: key });
    }
    await queue.enqueueMany("o", [0, 1, 2, 3].map((n) => ({ key: "c", n })), {
      orderingKey: "c",
    });
    const done = () => [...order.values()].reduce((sum, ns) => sum + ns.length, 0) === 14;
    await runUntil(new KvQueueRunner(kv, queue, { concurrency: 8 }), "14 deliveries", done);
    assert.deepEqual(order.get("a"), [0, 1, 2, 3, 4]);
    assert.deepEqual(order.get("b"), [0, 1, 2, 3, 4]);
    assert.deepEqual(order.get("c"), [0, 1, 2, 3]);
    assert.equal(maxPerKey, 1, "two messages of one ordering key ran at once");
    assert.ok(maxOverall >= 2, "different ordering keys never ran side by side");
    await emptyQueue(queue);
    // Every line closed behind its last message.
    for (const part of ["oq", "oo", "ol"]) {
      assert.deepEqual(await Array.fromAsync(kv.list({ prefix: [...prefix, part] })), [], part);
    }
  },
);

queueTest(
  "KvQueue: a failing message holds back its ordering key until its retry succeeds or it is dead",
  async (kv, prefix) => {
    const queue = new KvQueue(kv, { prefix });
    const seen: string[] = [];
    queue.handle<string>("o", (name, msg) => {
      seen.push(`${name}#${msg.attempt}`);
      if (name === "flaky" && msg.attempt === 1) throw new Error("first try fails");
      if (name === "doomed") throw new Error("always fails");
    });
    const options = { orderingKey: "k", backoffSchedule: [50] };
    await queue.enqueue("o", "flaky", options);
    await queue.enqueue("o", "second", options);
    await queue.enqueue("o", "doomed", { ...options, maxAttempts: 2 });
    await queue.enqueue("o", "last", options);
    assert.deepEqual(await queue.stats(), { ready: 1, delayed: 3, running: 0, dead: 0 });
    await runUntil(new KvQueueRunner(kv, queue), "the last message", () => seen.includes("last#1"));
    assert.deepEqual(seen, ["flaky#1", "flaky#2", "second#1", "doomed#1", "doomed#2", "last#1"]);
    await emptyQueue(queue);
    assert.equal((await queue.listDead())[0].value, "doomed");
  },
);

queueTest(
  "KvQueue: concurrent enqueues on one orderingKey from two clients lose nothing",
  async (kv, prefix) => {
    const a = new KvQueue(kv, { prefix });
    const b = new KvQueue(kv, { prefix });
    const ids = await Promise.all(
      Array.from({ length: 20 }, (_, i) => (i % 2 ? a : b).enqueue("o", i, { orderingKey: "k" })),
    );
    assert.equal(new Set(ids).size, 20);
    const seen: number[] = [];
    let running = 0;
    let overlap = false;
    a.handle<number>("o", async (n) => {
      if (++running > 1) overlap = true;
      seen.push(n);
      await sleep(2);
      running--;
    });
    await runUntil(
      new KvQueueRunner(kv, a, { concurrency: 4 }),
      "20 messages",
      () => seen.length === 20,
    );
    assert.deepEqual([...seen].sort((x, y) => x - y), Array.from({ length: 20 }, (_, i) => i));
    assert.equal(overlap, false);
    await emptyQueue(a);
  },
);

queueTest(
  "withQueues(): enqueue and atomic().enqueue respect the backlog limit",
  async (raw, prefix) => {
    const kv = withQueues(raw, { prefix, backlogLimit: 2 });
    await kv.enqueue(1);
    await kv.atomic().set(["x"], 1).enqueue(2).commit();
    const full = (e: unknown) =>
      e instanceof RangeError && /backlog is full: 2 pending.*"backlogLimit" is 2/.test(e.message);
    await assert.rejects(() => kv.enqueue(3), full);
    await assert.rejects(() => kv.atomic().set(["y"], 1).enqueue(3).commit(), full);
    // Nothing of the refused commit was written.
    assert.equal((await raw.get(["y"])).versionstamp, null);
    assert.equal((await new KvQueue(raw, { prefix }).stats()).ready, 2);
  },
);

Deno.test("KvQueue rejects invalid options naming the option and the value", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const queue = new KvQueue(kv);
    await assert.rejects(() => queue.enqueue("t", 1, { delayMs: 3_000_000_000 }), {
      name: "RangeError",
      message: '"delayMs" must be <= 2592000000: got 3000000000',
    });
    await assert.rejects(() => queue.enqueue("t", 1, { delayMs: -1 }), {
      name: "RangeError",
      message: '"delayMs" must be >= 0: got -1',
    });
    await assert.rejects(() => queue.enqueue("t", 1, { delayMs: 1.5 }), {
      name: "TypeError",
      message: '"delayMs" must be an integer: got 1.5',
    });
    await assert.rejects(() => queue.enqueue("t", 1, { maxAttempts: 0 }), {
      name: "RangeError",
      message: '"maxAttempts" must be >= 1: got 0',
    });
    await assert.rejects(() => queue.enqueue("t", 1, { backoffSchedule: [10, -5] }), {
      name: "RangeError",
      message: '"backoffSchedule[1]" must be >= 0: got -5',
    });
    await assert.rejects(
      () => queue.enqueue("t", 1, { keysIfUndelivered: Array.from({ length: 11 }, (_, i) => [i]) }),
      { name: "RangeError", message: '"keysIfUndelivered" must have <= 10 keys: got 11' },
    );
    await assert.rejects(() => queue.enqueue("t", 1, { idempotencyKey: "" }), {
      name: "TypeError",
      message: '"idempotencyKey" must be a non-empty string: got ""',
    });
    await assert.rejects(() => queue.enqueue("t", 1, { orderingKey: "k".repeat(1025) }), {
      name: "RangeError",
      message: '"orderingKey" must be at most 1024 bytes: got 1025 characters',
    });
    await assert.rejects(
      () => queue.enqueue("t", 1, { keysIfUndelivered: [["ok"], ["bad", { x: 1 }]] as never }),
      {
        name: "TypeError",
        message: '"keysIfUndelivered[1]" has a part that is not a KV key part: got [object Object]',
      },
    );
    await assert.rejects(
      () => queue.enqueue("t", 1, { keysIfUndelivered: [["long", "x".repeat(3000)]] }),
      { name: "RangeError", message: /"keysIfUndelivered\[0\]" must be at most 2048 bytes/ },
    );
    assert.throws(() => new KvQueueRunner(kv, queue, { concurrency: 0 }), {
      name: "RangeError",
      message: '"concurrency" must be >= 1: got 0',
    });
    assert.throws(() => new KvQueue(kv, { backlogLimit: 0 }), {
      name: "RangeError",
      message: '"backlogLimit" must be >= 1: got 0',
    });
    const compat = withQueues(kv);
    await assert.rejects(() => compat.enqueue(1, { delay: -10 }), {
      name: "RangeError",
      message: '"delay" must be >= 0: got -10',
    });
    assert.deepEqual(DEFAULT_BACKOFF_SCHEDULE, [100, 1000, 5000, 30000, 60000]);
  } finally {
    kv.close();
  }
});

// --- real processes over KV Connect ----------------------------------------

async function sharedStack(): Promise<Stack> {
  stack ??= await startStack();
  return stack;
}

Deno.test(
  "a real deno run imports withQueues from the proxy's /lib/kv_queue.ts URL and processes a message",
  opts,
  async () => {
    const s = await sharedStack();
    const script = join(s.dir, "use_queue.ts");
    const prefix = ["url-import", crypto.randomUUID()];
    await Deno.writeTextFile(
      script,
      `import { withQueues } from "${s.proxy.url}/lib/kv_queue.ts";
const kv = withQueues(await Deno.openKv(${JSON.stringify(s.proxy.url)}), { prefix: ${
        JSON.stringify(prefix)
      } });
const listening = kv.listenQueue(async (msg) => {
  await kv.set(["url-import-result"], { got: msg, by: "script" });
  kv.close();
});
await listening;
`,
    );
    const kv = withQueues(await openRemoteKv(s.proxy.url), { prefix });
    try {
      await kv.enqueue({ hello: "from the test" });
      const out = await new Deno.Command(DENO, {
        args: [
          "run",
          "--no-config",
          "--reload",
          "--unstable-kv",
          `--allow-import=127.0.0.1:${s.proxy.port}`,
          `--allow-net=127.0.0.1:${s.proxy.port}`,
          "--allow-env=DENO_KV_ACCESS_TOKEN",
          script,
        ],
        env: { DENO_DIR: join(s.dir, "deno_dir"), DENO_KV_ACCESS_TOKEN: TEST_TOKEN },
        // A hung script fails the test instead of hanging the suite.
        signal: AbortSignal.timeout(60_000),
        stdout: "piped",
        stderr: "piped",
      }).output();
      assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
      assert.deepEqual((await kv.get(["url-import-result"])).value, {
        got: { hello: "from the test" },
        by: "script",
      });
    } finally {
      kv.close();
    }
  },
);

function startWorker(s: Stack, prefix: Deno.KvKey, run: string): Running {
  const child = new Deno.Command(DENO, {
    args: ["run", "-A", join(ROOT, "tests/queue_fixtures/worker.ts")],
    cwd: ROOT,
    env: {
      DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
      QUEUE_URL: s.proxy.url,
      QUEUE_PREFIX: JSON.stringify(prefix),
      WORKER_RUN: run,
    },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  return new Running(run, child, 0);
}

const doneLines = (r: Running) => (r.output.match(/^done /gm) ?? []).length;

Deno.test(
  "500 messages, two workers, one SIGKILLed mid-handler 3 times: none lost, duplicates only where killed",
  opts,
  async () => {
    const s = await sharedStack();
    const prefix = ["workers", crypto.randomUUID()];
    const kv = await openRemoteKv(s.proxy.url);
    const total = 500;
    const queue = new KvQueue(kv, { prefix });
    await queue.enqueueMany("job", Array.from({ length: total }, (_, i) => i));
    const killedRuns: string[] = [];
    const steady = startWorker(s, prefix, "steady");
    let victim: Running | null = null;
    try {
      for (let round = 0; round < 3; round++) {
        const run = `victim-${round}`;
        victim = startWorker(s, prefix, run);
        const v = victim;
        await waitFor(`${run} to handle 25 messages`, () => doneLines(v) >= 25, {
          timeoutMs: 30_000,
        });
        // The worker prints "start" before each handler's work; kill while some are open.
        await waitFor(`${run} to be mid-handler`, () => {
          const starts = (v.output.match(/^start /gm) ?? []).length;
          return starts > doneLines(v);
        }, { timeoutMs: 10_000, intervalMs: 1 });
        await v.stop("SIGKILL");
        killedRuns.push(run);
      }
      victim = startWorker(s, prefix, "victim-final");
      await waitFor("every message to be handled", async () => {
        const s = await queue.stats();
        return s.ready + s.delayed + s.running === 0;
      }, { timeoutMs: 60_000, intervalMs: 200 });

      const done = new Map<number, string[]>();
      for await (const e of kv.list<string>({ prefix: [...prefix, "test-done"] })) {
        const n = e.key[e.key.length - 2] as number;
        done.set(n, [...(done.get(n) ?? []), e.value]);
      }
      const startedInKilled = new Set<number>();
      for await (const e of kv.list<string>({ prefix: [...prefix, "test-start"] })) {
        if (killedRuns.includes(e.value)) startedInKilled.add(e.key[e.key.length - 2] as number);
      }
      const missing = Array.from({ length: total }, (_, i) => i).filter((i) => !done.has(i));
      assert.deepEqual(missing, [], "messages never handled");
      const duplicates = [...done].filter(([, runs]) => runs.length > 1).map(([n]) => n);
      for (const n of duplicates) {
        assert.ok(
          startedInKilled.has(n),
          `message ${n} handled twice but was never in a killed worker`,
        );
      }
      assert.ok(steady.output.includes("done "), "the steady worker took part");
      assert.equal((await queue.stats()).dead, 0);
    } finally {
      await victim?.stop("SIGKILL");
      await steady.stop("SIGKILL");
      kv.close();
    }
  },
);

Deno.test(
  "kv_queue's batched commits stay under 1 KiB, so Deno's client sends each in one write",
  opts,
  async () => {
    // Deno's KV client sends a body over 1 KiB in two writes, and Nagle's
    // algorithm holds the second until the server's (delayed) ACK: ~40 ms.
    await using s = await startStack({ tap: true });
    const kv = await openRemoteKv(s.proxy.url);
    try {
      const queue = new KvQueue(kv);
      let seen = 0;
      queue.handle("n", () => {
        seen++;
      });
      const value = (i: number) => ({ i, text: (i % 3 ? "x" : "é").repeat((i * 37) % 40) });
      const total = 250;
      for (let burst = 0; burst < 4; burst++) {
        await Promise.all(Array.from({ length: 50 }, (_, j) => {
          const i = burst * 50 + j;
          return queue.enqueue("n", value(i), {
            idempotencyKey: i % 10 === 0 ? `key-${i}` : undefined,
            keysIfUndelivered: i % 7 === 0 ? [["undelivered", i]] : undefined,
          });
        }));
      }
      await queue.enqueueMany("n", Array.from({ length: 50 }, (_, j) => value(200 + j)));
      await runUntil(
        new KvQueueRunner(kv, queue, { concurrency: 32 }),
        "every message",
        () => seen === total,
      );
      const sizes = s.tap!.requests("/v2/atomic_write").map((r) => r.bodyBytes);
      assert.ok(sizes.length > 0, "no atomic writes were logged");
      assert.ok(Math.max(...sizes) <= 1024, `largest commit ${Math.max(...sizes)} bytes`);
      // Still batched: fewer commits than messages for enqueue, claim and completion together.
      assert.ok(sizes.length < total, `${sizes.length} commits for ${total} messages`);
    } finally {
      kv.close();
    }
  },
);

Deno.test("KvQueueRunner keeps working after denokv restarts under it", opts, async () => {
  // The client retries 503s without end: a stand-in that never came back
  // once hung a whole run here, so the test has a deadline of its own.
  let deadline: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([
    restartScenario(),
    new Promise((_, reject) => {
      deadline = setTimeout(() => reject(new Error("no progress within 60 s")), 60_000);
    }),
  ]).finally(() => clearTimeout(deadline));
});

async function restartScenario(): Promise<void> {
  await using own = await startStack();
  const kv = await openRemoteKv(own.proxy.url);
  const queue = new KvQueue(kv, { prefix: ["restart"] });
  const got: number[] = [];
  queue.handle<number>("r", (n) => {
    got.push(n);
  });
  const runner = new KvQueueRunner(kv, queue);
  const running = runner.run();
  try {
    await queue.enqueue("r", 1);
    await waitFor("the first message", () => got.length === 1);
    const port = own.denokv.port;
    await own.denokv.stop("SIGKILL");
    await sleep(500);
    await using again = await startStandin({ sqlitePath: join(own.dir, "denokv.sqlite"), port });
    await queue.enqueue("r", 2);
    await waitFor("the message sent after the restart", () => got.length === 2, {
      timeoutMs: 20_000,
    });
    assert.deepEqual(got, [1, 2]);
    assert.equal(again.port, port);
  } finally {
    await runner.stop();
    await running;
    kv.close();
  }
}

Deno.test("teardown: stop the shared stack", opts, async () => {
  // deno-lint-ignore no-explicit-any
  const s = stack as any;
  stack = null;
  await s?.[Symbol.asyncDispose]();
});
