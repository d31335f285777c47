/**
 * A queue worker process for the SIGKILL test: handles "job" messages from
 * `QUEUE_URL` under `QUEUE_PREFIX`, recording each start and finish in KV
 * (tagged with `WORKER_RUN`) and on stdout so the test can kill it mid-handler.
 */
import { KvQueue, KvQueueRunner } from "../../lib/kv_queue.ts";

if (import.meta.main) {
  const url = Deno.env.get("QUEUE_URL")!;
  const prefix = JSON.parse(Deno.env.get("QUEUE_PREFIX")!) as Deno.KvKey;
  const run = Deno.env.get("WORKER_RUN")!;
  const kv = await Deno.openKv(url);
  const queue = new KvQueue(kv, { prefix });
  const out = (line: string) => Deno.stdout.writeSync(new TextEncoder().encode(line + "\n"));
  queue.handle<number>("job", async (n) => {
    const delivery = crypto.randomUUID();
    await kv.set([...prefix, "test-start", n, delivery], run);
    out(`start ${n}`);
    await new Promise((r) => setTimeout(r, 10 + Math.random() * 30));
    await kv.set([...prefix, "test-done", n, delivery], run);
    out(`done ${n}`);
  });
  await new KvQueueRunner(kv, queue, { concurrency: 4, leaseMs: 1_000 }).run();
}
