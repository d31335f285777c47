/**
 * The public shapes of the typed queue API: options, messages, dead letters,
 * stats and errors.
 *
 * @module
 */

/** Options of {@linkcode KvQueue}. */
export interface KvQueueOptions {
  /** Key prefix for everything the queue stores. Default `["__kvq__"]`. */
  prefix?: Deno.KvKey;
  /** Pending messages after which `enqueue` throws. Default 100,000. */
  backlogLimit?: number;
  /**
   * How long a dead letter is kept (ms). Default three days; 0 keeps none
   * (`keysIfUndelivered` still receive the value). `withQueues` defaults to
   * 0, as Deno keeps nothing but `keysIfUndelivered`.
   */
  deadLetterRetentionMs?: number;
}

/** Options of {@linkcode KvQueue.enqueue}. */
export interface EnqueueOptions {
  /** Milliseconds before the message may be delivered (0 to 30 days). */
  delayMs?: number;
  /** Total deliveries before giving up. Default: `backoffSchedule.length + 1`. */
  maxAttempts?: number;
  /** Milliseconds to wait before each retry. Default {@linkcode DEFAULT_BACKOFF_SCHEDULE}. */
  backoffSchedule?: readonly number[];
  /** Keys that receive the value when every attempt failed. */
  keysIfUndelivered?: readonly Deno.KvKey[];
  /** A second enqueue with the same id is a no-op while the first is pending. */
  idempotencyKey?: string;
  /**
   * Messages with the same ordering key are delivered one at a time, in the
   * order they were enqueued (retries included); others run in parallel.
   */
  orderingKey?: string;
  /**
   * A delivery running longer than this many ms fails (a counted attempt,
   * retried by the schedule): `message.signal` aborts with a `TimeoutError`.
   * A handler that ignores the signal may still be running when the retry
   * starts.
   */
  timeoutMs?: number;
}

/** A delivered message as handlers of the typed API see it. */
export interface QueueMessage<T = unknown> {
  id: string;
  type: string;
  data: T;
  /** 1 on first delivery. */
  attempt: number;
  enqueuedAt: number;
  /**
   * Aborted when this worker no longer holds the message: `stop()` gave it
   * back after `stopTimeoutMs`, or another worker took over its lease.
   */
  signal: AbortSignal;
}

/** A message that exhausted its attempts. */
export interface DeadLetter {
  id: string;
  type: string;
  value: unknown;
  attempts: number;
  error: string;
  failedAt: number;
  enqueuedAt: number;
  /** Its ordering key, if it had one: `requeueDead` puts it back in that line. */
  orderingKey?: string;
}

/**
 * Thrown by {@linkcode KvQueue.enqueueMany} when a commit failed after others
 * had gone through: `enqueuedIds` are the messages that are in the queue.
 */
export class EnqueueManyError extends Error {
  override name = "EnqueueManyError";
  constructor(message: string, readonly enqueuedIds: string[], options?: ErrorOptions) {
    super(message, options);
  }
}

/**
 * Counts returned by {@linkcode KvQueue.stats}. Messages waiting behind
 * another of their ordering key count as delayed. `ready + delayed + running`
 * and `dead` are exact (counters); the split is exact up to `STATS_SAMPLE`
 * indexed messages and estimated past that (see `KvQueue.stats()`).
 */
export interface QueueStats {
  ready: number;
  delayed: number;
  running: number;
  dead: number;
}

/** A handler of the typed API. */
export type MessageHandler<T = unknown> = (
  data: T,
  message: QueueMessage<T>,
) => unknown | Promise<unknown>;
