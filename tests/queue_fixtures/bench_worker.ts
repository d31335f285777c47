/**
 * A worker process for the multi-process queue benchmark: runs a
 * KvQueueRunner on "n" messages under `QUEUE_PREFIX` with handlers that await
 * `HANDLER_MS`, starts when the bench sets the go key, and on the stop key
 * prints how many messages it handled and how many atomic commits it made.
 */
import { KvQueue, KvQueueRunner } from "../../lib/kv_queue.ts";

/** Counts atomic commits made through `kv`. */
export function countCommits(kv: Deno.Kv): { kv: Deno.Kv; commits: () => number } {
  let commits = 0;
  const wrapped = new Proxy(kv, {
    get(target, prop) {
      if (prop === "atomic") {
        return () => {
          const op = target.atomic();
          const commit = op.commit.bind(op);
          op.commit = () => {
            commits++;
            return commit();
          };
          return op;
        };
      }
      const v = Reflect.get(target, prop, target);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
  return { kv: wrapped, commits: () => commits };
}

if (import.meta.main) {
  const prefix = JSON.parse(Deno.env.get("QUEUE_PREFIX")!) as Deno.KvKey;
  const concurrency = Number(Deno.env.get("CONCURRENCY"));
  const handlerMs = Number(Deno.env.get("HANDLER_MS"));
  const raw = await Deno.openKv(Deno.env.get("QUEUE_URL")!);
  const { kv, commits } = countCommits(raw);
  const queue = new KvQueue(kv, { prefix, backlogLimit: 1_000_000 });
  let handled = 0;
  queue.handle("n", async () => {
    await new Promise((r) => setTimeout(r, handlerMs));
    handled++;
  });
  const control = raw.watch([[...prefix, "bench-go"], [...prefix, "bench-stop"]]).getReader();
  console.log("ready");
  while (true) {
    const { value } = await control.read();
    if (value?.[0].value !== null) break;
  }
  const runner = new KvQueueRunner(kv, queue, { concurrency });
  const running = runner.run();
  while (true) {
    const { value } = await control.read();
    if (value?.[1].value !== null) break;
  }
  await runner.stop();
  await running;
  const cpu = process.cpuUsage();
  console.log(
    `handled ${handled} commits ${commits()} cpu ${Math.round((cpu.user + cpu.system) / 1000)}`,
  );
  control.cancel().catch(() => {});
  raw.close();
  Deno.exit(0);
}
