/**
 * A process for the cron test: runs kvCron "tick" every second (6-field
 * schedule) under `CRON_PREFIX` on `QUEUE_URL`, recording each run in KV as
 * `[...prefix, "ran", tick, WORKER_RUN]` and printing "tick <ms>".
 */
import { kvCron } from "../../lib/kv_queue.ts";

if (import.meta.main) {
  const prefix = JSON.parse(Deno.env.get("CRON_PREFIX")!) as Deno.KvKey;
  const run = Deno.env.get("WORKER_RUN")!;
  const kv = await Deno.openKv(Deno.env.get("QUEUE_URL")!);
  console.log("ready");
  await kvCron(kv, {
    name: "tick",
    schedule: "* * * * * *",
    prefix,
    leaseMs: 1_000,
    handler: async ({ tick }) => {
      await kv.set([...prefix, "ran", tick, run], Date.now());
      console.log(`tick ${tick}`);
    },
  });
}
