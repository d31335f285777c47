/**
 * lib/fedify.ts against Fedify's own conformance suite (`testMessageQueue`
 * from @fedify/testing) over KV Connect through the proxy, plus the type-level
 * check that `KvMessageQueue` is a Fedify `MessageQueue`.
 */
import assert from "node:assert/strict";
import type { MessageQueue } from "@fedify/fedify";
import { testMessageQueue } from "@fedify/testing";
import { KvMessageQueue } from "../lib/fedify.ts";
import { openRemoteKv, startStack } from "./_helpers/processes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

Deno.test(
  "KvMessageQueue passes Fedify's testMessageQueue, ordering keys included, over KV Connect",
  opts,
  async () => {
    await using stack = await startStack();
    const kvs: Deno.Kv[] = [];
    const prefix = ["fedify-test", crypto.randomUUID()];
    try {
      await testMessageQueue(
        async () => {
          const kv = await openRemoteKv(stack.proxy.url);
          kvs.push(kv);
          // Typed as Fedify's interface: this line fails type checking if the shapes drift.
          const mq: MessageQueue = new KvMessageQueue(kv, { prefix });
          return mq;
        },
        ({ controller }) => {
          controller.abort();
        },
        { testOrderingKey: true },
      );
    } finally {
      for (const kv of kvs) kv.close();
    }
  },
);

Deno.test("KvMessageQueue.getDepth() counts queued, ready and delayed messages", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const mq = new KvMessageQueue(kv);
    await mq.enqueue("now");
    await mq.enqueueMany(["later 1", "later 2"], { delay: Temporal.Duration.from({ minutes: 5 }) });
    assert.deepEqual(await mq.getDepth(), { queued: 3, ready: 1, delayed: 2 });
    await assert.rejects(
      () => mq.enqueue("x", { delay: Temporal.Duration.from({ seconds: -1 }) }),
      { name: "RangeError", message: '"delay" must not be negative: got -1000 ms' },
    );
  } finally {
    kv.close();
  }
});

Deno.test(
  "KvMessageQueue.listen() retries a failing handler itself (nativeRetrial)",
  opts,
  async () => {
    const kv = await Deno.openKv(":memory:");
    try {
      const mq = new KvMessageQueue(kv, { backoffSchedule: [10, 10] });
      assert.equal(mq.nativeRetrial, true);
      const controller = new AbortController();
      let calls = 0;
      const listening = mq.listen(() => {
        calls++;
        if (calls < 3) throw new Error("transient");
      }, { signal: controller.signal });
      await mq.enqueue({ type: "Create" });
      const deadline = Date.now() + 10_000;
      while (calls < 3 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
      controller.abort();
      await listening;
      assert.equal(calls, 3);
      assert.deepEqual(await mq.getDepth(), { queued: 0, ready: 0, delayed: 0 });
    } finally {
      kv.close();
    }
  },
);
