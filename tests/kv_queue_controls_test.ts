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
