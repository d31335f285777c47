/**
 * Queue depths for the proxy's metrics: the pending and dead-letter counters
 * the queue engine keeps exactly, and its paused flag, for every known queue
 * prefix. A scrape reads a fixed handful of keys (`getMany` of at most ten),
 * whatever the backlog: never a listing.
 */
import { Gauge, type Registry } from "prom-client";
import { KvQueue } from "../lib/kv_queue.ts";
import type { QueueRef } from "./console/queue_list.ts";

/** Deno KV's limit on the keys of one `getMany`. */
const GET_MANY_KEYS = 10;
/** Keys read per queue: pending count, dead count, paused flag. */
const KEYS_PER_QUEUE = 3;
/** How long a scrape waits for the counters (a stopped denokv must not hold it up). */
const READ_TIMEOUT_MS = 2_000;

/** Where {@linkcode QueueGauges} reads the counters. */
export interface QueueMetricsOptions {
  /** Opens the database the queues live in (KV Connect to denokv in the proxy). */
  openKv: () => Promise<Deno.Kv>;
  queues: readonly QueueRef[];
}

/** One queue's counters as read by {@linkcode readQueueCounters}. */
export interface QueueCounters {
  prefix: Deno.KvKey;
  pending: number;
  dead: number;
  paused: boolean;
}

function count(entry: Deno.KvEntryMaybe<unknown>): number {
  const v = entry.value;
  if (!(v instanceof Deno.KvU64)) return 0;
  // A counter pushed below zero wraps to a huge number: show 0, as stats() does.
  return v.value > BigInt(Number.MAX_SAFE_INTEGER) ? 0 : Number(v.value);
}

/**
 * Reads the engine's exact counters of each queue: `ceil(3 × queues / 10)`
 * `getMany` calls, the same for an empty queue and a backlog of 100,000. The
 * keys come from the engine's own key builder (`KvQueue.keys`), so they
 * follow its layout (`lib/queue/keys.ts`).
 *
 * @example
 * ```ts
 * import { KvQueue } from "../lib/kv_queue.ts";
 * import { readQueueCounters } from "./metrics_queues.ts";
 * const kv = await Deno.openKv(":memory:");
 * await new KvQueue(kv, { prefix: ["jobs"] }).enqueue("x", 1, { delayMs: 60_000 });
 * const [jobs] = await readQueueCounters(kv, [{ prefix: ["jobs"] }]);
 * if (jobs.pending !== 1 || jobs.dead !== 0) throw new Error(JSON.stringify(jobs));
 * kv.close();
 * ```
 */
export async function readQueueCounters(
  kv: Deno.Kv,
  queues: readonly { prefix: Deno.KvKey }[],
): Promise<QueueCounters[]> {
  const keys = queues.flatMap(({ prefix }) => {
    const k = new KvQueue(kv, { prefix }).keys;
    return [k.count(), k.deadCount(), k.paused()];
  });
  const entries: Deno.KvEntryMaybe<unknown>[] = [];
  const perCall = GET_MANY_KEYS - (GET_MANY_KEYS % KEYS_PER_QUEUE);
  for (let i = 0; i < keys.length; i += perCall) {
    entries.push(...await kv.getMany(keys.slice(i, i + perCall)));
  }
  return queues.map(({ prefix }, i) => ({
    prefix,
    pending: count(entries[i * KEYS_PER_QUEUE]),
    dead: count(entries[i * KEYS_PER_QUEUE + 1]),
    paused: entries[i * KEYS_PER_QUEUE + 2].value === true,
  }));
}

/** The label a queue's series carry: its prefix as JSON, e.g. `["__kvq__","deno"]`. */
export function prefixLabel(prefix: Deno.KvKey): string {
  return JSON.stringify(prefix);
}

/** The queue gauges of one registry, refreshed on each scrape. */
export class QueueGauges {
  #opts: QueueMetricsOptions;
  #kv?: Promise<Deno.Kv>;
  /** A read still waiting (denokv down: the KV client retries): later scrapes wait on it, not pile up. */
  #reading?: Promise<QueueCounters[]>;
  #messages: Gauge<"prefix" | "state">;
  #paused: Gauge<"prefix">;
  #failed: Gauge;

  constructor(registry: Registry, opts: QueueMetricsOptions) {
    this.#opts = opts;
    const registers = [registry];
    this.#messages = new Gauge({
      name: "denokv_queue_messages",
      help: "Messages of a queue by state: pending (ready, delayed or running) and dead " +
        "(dead letters kept), from the queue engine's exact counters.",
      labelNames: ["prefix", "state"],
      registers,
    });
    this.#paused = new Gauge({
      name: "denokv_queue_paused",
      help: "1 while the queue is paused for every worker (KvQueue.pause()).",
      labelNames: ["prefix"],
      registers,
    });
    this.#failed = new Gauge({
      name: "denokv_queue_read_failed",
      help: "1 when the queue counters could not be read during this scrape (series then absent).",
      registers,
    });
  }

  /** Reads the counters now and sets the gauges; a failed read removes the series. */
  async update(): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    try {
      this.#reading ??= this.#read().finally(() => this.#reading = undefined);
      const counters = await Promise.race([
        this.#reading,
        new Promise<never>((_, reject) => {
          timer = setTimeout(() => reject(new Error("timed out")), READ_TIMEOUT_MS);
        }),
      ]);
      for (const q of counters) {
        const prefix = prefixLabel(q.prefix);
        this.#messages.set({ prefix, state: "pending" }, q.pending);
        this.#messages.set({ prefix, state: "dead" }, q.dead);
        this.#paused.set({ prefix }, q.paused ? 1 : 0);
      }
      this.#failed.set(0);
    } catch {
      // Stale depths would look like a healthy queue: export none rather than old ones.
      this.#messages.reset();
      this.#paused.reset();
      this.#failed.set(1);
    } finally {
      clearTimeout(timer);
    }
  }

  async #read(): Promise<QueueCounters[]> {
    const kv = await (this.#kv ??= this.#opts.openKv().catch((err) => {
      this.#kv = undefined;
      throw err;
    }));
    return await readQueueCounters(kv, this.#opts.queues);
  }

  close(): void {
    this.#kv?.then((kv) => kv.close(), () => {});
    this.#kv = undefined;
  }
}
