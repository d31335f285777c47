/**
 * The Deno-compatible face: {@linkcode withQueues} puts `enqueue`,
 * `listenQueue` and `atomic().enqueue()` on a `Deno.Kv`.
 *
 * @module
 */
import { CHECKS_PER_COMMIT, MAX_VALUE_BYTES } from "./limits.ts";
import { type DenoEnqueueOptions, denoOptions } from "./deno_options.ts";
import { valueBytes } from "./envelope.ts";
import { KvQueue } from "./producer.ts";
import { KvQueueRunner, type KvQueueRunnerOptions } from "./runner.ts";
import type { KvQueueOptions } from "./types.ts";
import { kvCron } from "./cron.ts";
import type { CronSchedule } from "../cron.ts";

/** Deno.cron's options. */
export interface DenoCronOptions {
  backoffSchedule?: number[];
  signal?: AbortSignal;
}

/** A `Deno.Kv` with queues, and `cron` in Deno.cron's shape. */
export interface KvWithQueues extends Deno.Kv {
  /**
   * `Deno.cron(name, schedule, [options,] handler)` over this KV: each tick
   * runs once across every process running the same name (see
   * `queue/cron.ts` for missed ticks). Resolves when `options.signal` aborts
   * or `close()` is called.
   */
  cron(
    name: string,
    schedule: string | CronSchedule,
    optionsOrHandler: DenoCronOptions | (() => unknown),
    handler?: () => unknown,
  ): Promise<void>;
}

/** Options of {@linkcode withQueues}. */
export interface WithQueuesOptions extends KvQueueOptions, Omit<KvQueueRunnerOptions, "dispatch"> {}

const DENO_TYPE = "deno";

/**
 * Returns `kv` with Deno Queues (`enqueue`, `listenQueue`, and
 * `atomic().enqueue()`) implemented on plain KV atomics, so they work over KV
 * Connect. The message is written in the same atomic commit as the other
 * mutations, so nothing is enqueued when a check fails. Messages live under
 * `["__kvq__", "deno"]` unless `prefix` says otherwise. `close()` stops the
 * listeners (their `listenQueue` promises resolve) and closes `kv` once the
 * final commits of finished handlers are in.
 *
 * @example
 * ```ts
 * import { withQueues } from "../kv_queue.ts";
 * const kv = withQueues(await Deno.openKv(":memory:"));
 * const got = Promise.withResolvers<unknown>();
 * const listening = kv.listenQueue((msg) => got.resolve(msg));
 * await kv.atomic().set(["balance"], 10).enqueue({ paid: 10 }).commit();
 * const msg = await got.promise as { paid: number };
 * if (msg.paid !== 10) throw new Error("wrong message");
 * kv.close();
 * await listening;
 * ```
 */
export function withQueues(kv: Deno.Kv, options: WithQueuesOptions = {}): KvWithQueues {
  const queue = new KvQueue(kv, {
    ...options,
    prefix: options.prefix ?? ["__kvq__", DENO_TYPE],
    // Deno keeps nothing of an undelivered message but keysIfUndelivered.
    deadLetterRetentionMs: options.deadLetterRetentionMs ?? 0,
  });
  const runners = new Set<KvQueueRunner>();
  const crons = new Set<{ stop: AbortController; done: Promise<void> }>();
  const patchAtomic = (op: Deno.AtomicOperation): Deno.AtomicOperation => {
    let enqueued = 0;
    let firstId: string | undefined;
    let checks = 0;
    /** Estimated size of the largest message value, to word a too-large error as Deno does. */
    let largest = 0;
    const check = op.check.bind(op);
    op.check = (...entries: Deno.AtomicCheck[]) => {
      checks += entries.length;
      check(...entries);
      return op;
    };
    op.enqueue = (value: unknown, o?: DenoEnqueueOptions) => {
      const msg = queue.prepare(DENO_TYPE, value, denoOptions(o), Date.now(), true);
      queue.addTo(op, msg);
      firstId ??= msg.id;
      enqueued++;
      largest = Math.max(largest, valueBytes(value, MAX_VALUE_BYTES + 1));
      return op;
    };
    const commit = op.commit.bind(op);
    op.commit = async () => {
      if (enqueued === 0) return await commit();
      await queue.checkBacklog(enqueued);
      // The receipt makes a re-sent commit fail instead of enqueueing twice;
      // it needs one of denokv's 10 checks, so a commit using all of them
      // goes without (its own checks then decide what a re-send does).
      try {
        if (checks >= CHECKS_PER_COMMIT) return await commit();
        queue.addReceipt(op, firstId!);
        const res = await queue.commitEnqueue({ commit }, firstId!);
        if (res.ok) queue.wakeRunners();
        return res;
      } catch (err) {
        if (
          err instanceof TypeError && err.message.startsWith("Value too large") &&
          largest > MAX_VALUE_BYTES
        ) throw new TypeError(`enqueue payload too large (max ${MAX_VALUE_BYTES} bytes)`);
        throw err;
      }
    };
    return op;
  };
  const wrapped: Partial<KvWithQueues> = {
    cron: (name, schedule, optionsOrHandler, handler) => {
      const cronOptions = typeof optionsOrHandler === "function" ? {} : optionsOrHandler ?? {};
      const run = typeof optionsOrHandler === "function" ? optionsOrHandler : handler;
      if (typeof run !== "function") throw new TypeError("Cron handler must be a function");
      const stop = new AbortController();
      cronOptions.signal?.addEventListener("abort", () => stop.abort(), { once: true });
      if (cronOptions.signal?.aborted) stop.abort();
      const done = kvCron(kv, {
        name,
        schedule,
        handler: () => run(),
        backoffSchedule: cronOptions.backoffSchedule,
        // Deno prints each failed run this way (ext/cron/01_cron.ts).
        onError: (error) => console.error(`Exception in cron handler ${name}`, error),
        signal: stop.signal,
      });
      const job = { stop, done: done.catch(() => {}) };
      crons.add(job);
      return done.finally(() => crons.delete(job));
    },
    enqueue: async (value: unknown, o?: DenoEnqueueOptions) => {
      const msg = queue.prepare(DENO_TYPE, value, denoOptions(o), Date.now(), true);
      await queue.checkBacklog(1);
      try {
        return await queue.groupCommit(msg);
      } catch (err) {
        // The only value here is the message: say it as Deno does.
        if (err instanceof TypeError && err.message.startsWith("Value too large")) {
          throw new TypeError(`enqueue payload too large (max ${MAX_VALUE_BYTES} bytes)`);
        }
        throw err;
      }
    },
    listenQueue: (handler: (value: unknown) => Promise<void> | void) => {
      const runner = new KvQueueRunner(kv, queue, {
        ...options,
        stopTimeoutMs: options.stopTimeoutMs ?? 0,
        dispatch: async (m) => {
          try {
            await handler(m.data);
          } catch (error) {
            // Deno prints each failed delivery this way (ext/kv/01_db.ts);
            // an onError given here hears of it instead.
            if (!options.onError) console.error("Exception in queue handler", error);
            throw error;
          }
        },
        dispatchType: DENO_TYPE,
      });
      runners.add(runner);
      return runner.run().finally(() => runners.delete(runner));
    },
    atomic: () => patchAtomic(kv.atomic()),
    close: () => {
      for (const job of crons) job.stop.abort();
      const cronsDone = [...crons].map((j) => j.done);
      const stopping = [...runners].map((r) => ({ r, stopped: r.stop() }));
      const pending = stopping.filter(({ r }) => r.holding > 0);
      if (pending.length === 0 && cronsDone.length === 0) return kv.close();
      // Finished handlers' completions are still committing: close after them.
      Promise.allSettled([...pending.map((p) => p.stopped), ...cronsDone]).then(() => {
        try {
          kv.close();
        } catch { /* closed by the caller meanwhile */ }
      });
    },
  };
  return new Proxy(kv as KvWithQueues, {
    get(target, prop) {
      if (Object.hasOwn(wrapped, prop)) return wrapped[prop as keyof KvWithQueues];
      if (prop === Symbol.dispose) return () => wrapped.close!();
      const v = Reflect.get(target, prop, target);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
}
