/**
 * Queue benchmark: (a) lib/kv_queue.ts over KV Connect through the proxy and
 * the denokv stand-in, (b) Deno's native queue on a local SQLite file, (c) raw
 * KV Connect atomic writes/s as the ceiling. Prints a Markdown table.
 *
 * Then (d) one backlog drained by 1, 2, 4 and 8 worker processes with the same
 * total handler count, handlers awaiting a fixed 20 ms: msgs/s and atomic
 * commits per message for each.
 *
 * Run: `deno run -A tests/bench/queue_bench.ts [--messages 2000] [--latency 200]
 * [--backlog 3000] [--handlers 32] [--processes 1,2,4,8] [--only single|workers]`
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { KvQueue, KvQueueRunner, withQueues } from "../../lib/kv_queue.ts";
import {
  DENO,
  openRemoteKv,
  ROOT,
  Running,
  type Stack,
  startStack,
  TEST_TOKEN,
  waitFor,
} from "../_helpers/processes.ts";

interface WorkersResult {
  processes: number;
  /** Entries read (listed or got) by one stats() call on the full backlog, and its time. */
  statsReads: number;
  statsMs: number;
  perSecond: number;
  writesPerMessage: number;
  enqueuePerSecond: number;
}

/**
 * Enqueues `backlog` messages, starts `processes` workers sharing
 * `handlers` handlers, and times the drain from the go signal until the
 * pending counter reads 0.
 */
async function drainWithWorkers(
  stack: Stack,
  backlog: number,
  processes: number,
  handlers: number,
  handlerMs: number,
): Promise<WorkersResult> {
  const kv = await openRemoteKv(stack.proxy.url);
  // Short, like the default prefix: every key of a message carries it.
  const prefix = ["bw", crypto.randomUUID().slice(0, 6)];
  const queue = new KvQueue(kv, { prefix, backlogLimit: backlog + 1 });
  const e0 = performance.now();
  for (let i = 0; i < backlog; i += 1000) {
    await queue.enqueueMany(
      "n",
      Array.from({ length: Math.min(1000, backlog - i) }, (_, j) => i + j),
    );
  }
  const enqueuePerSecond = backlog / ((performance.now() - e0) / 1000);
  const counted = countingReads(kv);
  const s0 = performance.now();
  const stats = await new KvQueue(counted.kv, { prefix }).stats();
  const statsMs = performance.now() - s0;
  if (stats.ready + stats.delayed + stats.running !== backlog) {
    throw new Error(`stats() says ${JSON.stringify(stats)} for ${backlog}`);
  }
  const workers: Running[] = [];
  try {
    for (let p = 0; p < processes; p++) {
      const child = new Deno.Command(DENO, {
        args: ["run", "-A", join(ROOT, "tests/queue_fixtures/bench_worker.ts")],
        cwd: ROOT,
        env: {
          DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
          QUEUE_URL: stack.proxy.url,
          QUEUE_PREFIX: JSON.stringify(prefix),
          CONCURRENCY: String(Math.max(1, Math.round(handlers / processes))),
          HANDLER_MS: String(handlerMs),
        },
        stdout: "piped",
        stderr: "piped",
      }).spawn();
      workers.push(new Running(`worker-${p}`, child, 0));
    }
    await waitFor("workers ready", () => workers.every((w) => w.output.includes("ready")), {
      timeoutMs: 60_000,
    });
    const t0 = performance.now();
    await kv.set([...prefix, "bench-go"], true);
    const countKey = queue.keys.count();
    await waitFor("the backlog drained", async () => {
      const c = await kv.get<Deno.KvU64>(countKey);
      return (c.value?.value ?? 0n) === 0n;
    }, { timeoutMs: 600_000, intervalMs: 20 });
    const seconds = (performance.now() - t0) / 1000;
    await kv.set([...prefix, "bench-stop"], true);
    await Promise.all(workers.map((w) => w.done));
    let handled = 0;
    let commits = 0;
    for (const w of workers) {
      if (Deno.env.get("BENCH_DEBUG")) console.error(w.output);
      const m = w.output.match(/handled (\d+) commits (\d+)/);
      if (!m) throw new Error(`${w.name} said: ${w.output}`);
      handled += Number(m[1]);
      commits += Number(m[2]);
    }
    if (handled < backlog) throw new Error(`only ${handled} of ${backlog} handled`);
    return {
      processes,
      perSecond: backlog / seconds,
      writesPerMessage: commits / backlog,
      enqueuePerSecond,
      statsReads: counted.reads(),
      statsMs,
    };
  } finally {
    for (const w of workers) if (w.exited === null) await w.stop("SIGKILL");
    kv.close();
  }
}

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

/** Counts entries read through `kv` by `get`, `getMany` and `list`. */
function countingReads(kv: Deno.Kv): { kv: Deno.Kv; reads: () => number } {
  let reads = 0;
  const wrapped = new Proxy(kv, {
    get(target, prop) {
      if (prop === "list") {
        return (sel: Deno.KvListSelector, o?: Deno.KvListOptions) => {
          const it = target.list(sel, o);
          return (async function* () {
            for await (const e of it) {
              reads++;
              yield e;
            }
          })();
        };
      }
      if (prop === "get") reads++;
      if (prop === "getMany") {
        return (keys: Deno.KvKey[]) => {
          reads += keys.length;
          return target.getMany(keys);
        };
      }
      const v = Reflect.get(target, prop, target);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
  return { kv: wrapped, reads: () => reads };
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
      backlog: { type: "string", default: "3000" },
      handlers: { type: "string", default: "32" },
      processes: { type: "string", default: "1,2,4,8" },
      only: { type: "string" },
    },
  });
  const only = args.values.only;
  const total = Number(args.values.messages);
  const rounds = Number(args.values.latency);
  const results: Result[] = [];
  await using stack = await startStack();

  const lines: string[] = [];
  if (only !== "workers") {
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

    lines.push(
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
      "",
    );
  }
  if (only !== "single") {
    const backlog = Number(args.values.backlog);
    const handlers = Number(args.values.handlers);
    const rows: WorkersResult[] = [];
    for (const p of args.values.processes.split(",").map(Number)) {
      rows.push(await drainWithWorkers(stack, backlog, p, handlers, 20));
    }
    const one = rows.find((r) => r.processes === 1) ?? rows[0];
    lines.push(
      `Worker processes: ${backlog} messages drained by ${handlers} handlers in total (20 ms each).`,
      "",
      "| processes | handlers each | enqueue msgs/s | drain msgs/s | vs 1 | commits per message | vs 1 | stats() reads | stats() ms |",
      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
      ...rows.map((r) =>
        `| ${r.processes} | ${Math.round(handlers / r.processes)} | ${
          r.enqueuePerSecond.toFixed(0)
        } | ${r.perSecond.toFixed(0)} | ${(r.perSecond / one.perSecond).toFixed(2)}x | ${
          r.writesPerMessage.toFixed(2)
        } | ${(r.writesPerMessage / one.writesPerMessage).toFixed(2)}x | ${r.statsReads} | ${
          r.statsMs.toFixed(1)
        } |`
      ),
    );
  }
  Deno.stdout.writeSync(new TextEncoder().encode(lines.join("\n") + "\n"));
}
