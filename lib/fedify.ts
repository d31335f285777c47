/**
 * Fedify's `MessageQueue` on the queue engine of `kv_queue.ts`, so Fedify and
 * BotKit apps can use a self-hosted denokv (over KV Connect) as their queue.
 * Only the shapes of Fedify's interfaces are known here: nothing is imported
 * from Fedify.
 *
 * @module
 */
import { type EnqueueOptions, KvQueue, KvQueueRunner, type QueueMessage } from "./kv_queue.ts";

/**
 * Retry delays by default: the shape of Fedify's own default retry policy
 * (`createExponentialBackoffPolicy()`: 1 s doubling, ten retries, no jitter
 * here), since `nativeRetrial` hands retries to this queue. Deno's shorter
 * default would give up on a server that is down for two minutes.
 */
export const FEDIFY_BACKOFF_SCHEDULE: readonly number[] = Array.from(
  { length: 10 },
  (_, i) => 1000 * 2 ** i,
);

/** The part of `Temporal.Duration` this module uses. */
export interface DurationLike {
  total(unit: { unit: "millisecond" }): number;
}

/** Fedify's `MessageQueueEnqueueOptions`. */
export interface MessageQueueEnqueueOptions {
  readonly delay?: DurationLike;
  /** Messages with the same ordering key are delivered one at a time, in enqueue order. */
  readonly orderingKey?: string;
}

/** Fedify's `MessageQueueListenOptions`. */
export interface MessageQueueListenOptions {
  signal?: AbortSignal;
}

/** Fedify's `MessageQueueDepth`. */
export interface MessageQueueDepth {
  readonly queued: number;
  readonly ready?: number;
  readonly delayed?: number;
}

/** Options of {@linkcode KvMessageQueue}. */
export interface KvMessageQueueOptions {
  /** Key prefix. Default `["__kvq__", "fedify"]`. */
  prefix?: Deno.KvKey;
  /** Handlers running at once per `listen()`. Default 16. */
  concurrency?: number;
  /** Lease time in ms, renewed while a handler runs. Default 30,000. */
  leaseMs?: number;
  /** Retry delays after a handler throws. Default {@linkcode FEDIFY_BACKOFF_SCHEDULE}. */
  backoffSchedule?: readonly number[];
  /** Called when a handler throws (before the retry or the dead letter). */
  onError?: (error: unknown, message: QueueMessage) => void;
  /** Pending messages after which enqueue throws. Default 100,000. */
  backlogLimit?: number;
  /** How long dead letters are kept (ms). Default three days. */
  deadLetterRetentionMs?: number;
}

const TYPE = "fedify";

function delayMs(options: MessageQueueEnqueueOptions | undefined): number {
  const delay = options?.delay;
  if (delay === undefined) return 0;
  const ms = Math.ceil(delay.total({ unit: "millisecond" }));
  if (!(ms >= 0)) throw new RangeError(`"delay" must not be negative: got ${ms} ms`);
  return ms;
}

/**
 * A Fedify `MessageQueue` over Deno KV that works over KV Connect. Retries
 * are the queue's own (`nativeRetrial`), with the leases, dead letters and
 * crash recovery of {@linkcode KvQueueRunner}.
 *
 * @example
 * ```ts
 * import { KvMessageQueue } from "./fedify.ts";
 * const kv = await Deno.openKv(":memory:");
 * const mq = new KvMessageQueue(kv);
 * const controller = new AbortController();
 * const got = Promise.withResolvers<unknown>();
 * const listening = mq.listen((m) => got.resolve(m), { signal: controller.signal });
 * await mq.enqueue({ activity: "Follow" });
 * await got.promise;
 * controller.abort();
 * await listening;
 * kv.close();
 * ```
 */
export class KvMessageQueue {
  /** Fedify leaves retries to this queue. */
  readonly nativeRetrial = true;
  readonly queue: KvQueue;
  readonly #kv: Deno.Kv;
  readonly #options: KvMessageQueueOptions;

  constructor(kv: Deno.Kv, options: KvMessageQueueOptions = {}) {
    this.#kv = kv;
    this.#options = options;
    this.queue = new KvQueue(kv, {
      prefix: options.prefix ?? ["__kvq__", "fedify"],
      backlogLimit: options.backlogLimit,
      deadLetterRetentionMs: options.deadLetterRetentionMs,
    });
  }

  #enqueueOptions(options: MessageQueueEnqueueOptions | undefined): EnqueueOptions {
    return {
      delayMs: delayMs(options),
      backoffSchedule: this.#options.backoffSchedule ?? FEDIFY_BACKOFF_SCHEDULE,
      orderingKey: options?.orderingKey,
    };
  }

  /** Enqueues one message. */
  async enqueue(message: unknown, options?: MessageQueueEnqueueOptions): Promise<void> {
    await this.queue.enqueue(TYPE, message, this.#enqueueOptions(options));
  }

  /** Enqueues many messages, in as few atomic commits as the server's limits allow. */
  async enqueueMany(
    messages: readonly unknown[],
    options?: MessageQueueEnqueueOptions,
  ): Promise<void> {
    await this.queue.enqueueMany(TYPE, messages, this.#enqueueOptions(options));
  }

  /** Runs `handler` for each message until `options.signal` aborts. */
  async listen(
    handler: (message: unknown) => Promise<void> | void,
    options: MessageQueueListenOptions = {},
  ): Promise<void> {
    const signal = options.signal;
    if (signal?.aborted) return;
    const runner = new KvQueueRunner(this.#kv, this.queue, {
      concurrency: this.#options.concurrency,
      leaseMs: this.#options.leaseMs,
      onError: this.#options.onError,
      dispatch: (m) => handler(m.data),
      dispatchType: TYPE,
    });
    let stopped: Promise<void> = Promise.resolve();
    const stop = () => {
      stopped = runner.stop().catch(() => {});
    };
    signal?.addEventListener("abort", stop, { once: true });
    try {
      await runner.run();
      // Resolve only once running handlers are done, as stop() promises.
      await stopped;
    } finally {
      signal?.removeEventListener("abort", stop);
    }
  }

  /** Messages waiting (not yet handed to a worker). */
  async getDepth(): Promise<MessageQueueDepth> {
    // Counters and a bounded read (see KvQueue.stats()), whatever the backlog.
    const s = await this.queue.stats();
    return { queued: s.ready + s.delayed, ready: s.ready, delayed: s.delayed };
  }
}
