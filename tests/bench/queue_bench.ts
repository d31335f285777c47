/**
 * Queue benchmark: (a) lib/kv_queue.ts over KV Connect through the proxy and
 * the denokv stand-in, (b) Deno's native queue on a local SQLite file, (c) raw
 * KV Connect atomic writes/s as the ceiling. Prints a Markdown table.
 *
 * Run: `deno run -A tests/bench/queue_bench.ts [--messages 2000] [--latency 200]`
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { KvQueue, KvQueueRunner, withQueues } from "../../lib/kv_queue.ts";
import { openRemoteKv, startStack } from "../_helpers/processes.ts";

interface Result {
  name: string;
  p50: number;
  p99: number;
  perSecond: number;
  writesPerMessage: string;
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * p))];
}

/** Counts atomic commits made through `kv` (each is one KV write round trip). */
function countingKv(kv: Deno.Kv): { kv: Deno.Kv; writes: () => number } {
  let writes = 0;
  const wrapped = new Proxy(kv, {
    get(target, prop) {
      if (prop === "atomic") {
        return () => {
          const op = target.atomic();
          const commit = op.commit.bind(op);
          op.commit = () => {
            writes++;
            return commit();
          };
          return op;
        };
      }
      if (prop === "set" || prop === "delete") {
        const fn = Reflect.get(target, prop, target) as (...a: unknown[]) => unknown;
        return (...a: unknown[]) => {
          writes++;
          return fn.apply(target, a);
        };
      }
      const v = Reflect.get(target, prop, target);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
  return { kv: wrapped, writes: () => writes };
}

/** Latency one at a time, then throughput of `total` enqueued `batch` at a time. */
async function measure(
  name: string,
  enqueue: (n: number) => Promise<unknown>,
  listen: (handler: (n: number) => void) => Promise<() => Promise<void>>,
  latencyRounds: number,
  total: number,
  writes?: () => number,
): Promise<Result> {
  const waiting = new Map<number, () => void>();
  const stop = await listen((n) => waiting.get(n)?.());
  const wait = (n: number) => new Promise<void>((r) => waiting.set(n, r));
  const samples: number[] = [];
  for (let i = 0; i < latencyRounds; i++) {
    const got = wait(i);
    const t0 = performance.now();
    await enqueue(i);
    await got;
    samples.push(performance.now() - t0);
  }
  samples.sort((a, b) => a - b);
  const base = 1_000_000;
  const all = Array.from({ length: total }, (_, i) => wait(base + i));
  const w0 = writes?.() ?? 0;
  const t0 = performance.now();
  for (let i = 0; i < total; i += 50) {
    await Promise.all(
      Array.from({ length: Math.min(50, total - i) }, (_, j) => enqueue(base + i + j)),
    );
  }
  await Promise.all(all);
  const seconds = (performance.now() - t0) / 1000;
  const w = writes ? ((writes() - w0) / total).toFixed(1) : "n/a";
  await stop();
  return {
    name,
    p50: percentile(samples, 0.5),
    p99: percentile(samples, 0.99),
    perSecond: total / seconds,
    writesPerMessage: w,
  };
}

if (import.meta.main) {
  const args = parseArgs({
    options: {
      messages: { type: "string", default: "2000" },
      latency: { type: "string", default: "200" },
    },
  });
  const total = Number(args.values.messages);
  const rounds = Number(args.values.latency);
  const results: Result[] = [];
  await using stack = await startStack();

  {
    const raw = await openRemoteKv(stack.proxy.url);
    const counted = countingKv(raw);
    const kv = counted.kv;
    const queue = new KvQueue(kv, { prefix: ["bench", "typed"] });
    results.push(
      await measure(
        "kv_queue over KV Connect (proxy)",
        (n) => queue.enqueue("n", n),
        (handler) => {
          queue.handle<number>("n", handler);
          const runner = new KvQueueRunner(kv, queue, { concurrency: 32 });
          const running = runner.run();
          return Promise.resolve(async () => {
            await runner.stop();
            await running;
          });
        },
        rounds,
        total,
        counted.writes,
      ),
    );
    raw.close();
  }

  {
    const raw = await openRemoteKv(stack.proxy.url);
    const kv = withQueues(raw, { prefix: ["bench", "compat"], concurrency: 32 });
    results.push(
      await measure(
        "withQueues(kv) over KV Connect (proxy)",
        (n) => kv.enqueue(n),
        (handler) => {
          const listening = kv.listenQueue((n) => handler(n as number));
          return Promise.resolve(async () => {
            kv.close();
            await listening;
          });
        },
        rounds,
        total,
      ),
    );
  }

  {
    const path = join(stack.dir, "native.sqlite");
    const kv = await Deno.openKv(path);
    results.push(
      await measure(
        "Deno native queue, local SQLite",
        (n) => kv.enqueue(n),
        (handler) => {
          kv.listenQueue((n) => handler(n as number));
          return Promise.resolve(() => Promise.resolve(kv.close()));
        },
        rounds,
        total,
      ),
    );
  }

  const ceilingKv = await openRemoteKv(stack.proxy.url);
  const t0 = performance.now();
  for (let i = 0; i < total; i += 50) {
    await Promise.all(
      Array.from(
        { length: Math.min(50, total - i) },
        (_, j) => ceilingKv.set(["bench", "raw", i + j], i + j),
      ),
    );
  }
  const rawPerSecond = total / ((performance.now() - t0) / 1000);
  ceilingKv.close();

  const lines = [
    `Queue benchmark: ${total} messages enqueued 50 at a time; latency over ${rounds} single messages.`,
    "",
    "| setup | p50 ms | p99 ms | messages/s | KV writes per message |",
    "| --- | ---: | ---: | ---: | ---: |",
    ...results.map((r) =>
      `| ${r.name} | ${r.p50.toFixed(1)} | ${r.p99.toFixed(1)} | ${
        r.perSecond.toFixed(0)
      } | ${r.writesPerMessage} |`
    ),
    `| raw KV Connect atomic writes (ceiling) | | | ${rawPerSecond.toFixed(0)} writes/s | 1 |`,
  ];
  Deno.stdout.writeSync(new TextEncoder().encode(lines.join("\n") + "\n"));
}
