/**
 * Message queues on plain Deno KV atomics, for servers reached over KV Connect
 * (where `kv.enqueue()` is refused and `listenQueue` never fires). This is the
 * published entry: it re-exports the engine in `./queue/`. One engine, two
 * faces: {@linkcode withQueues} (Deno-compatible) and {@linkcode KvQueue} /
 * {@linkcode KvQueueRunner} (typed). The key layout is documented in
 * `./queue/keys.ts`.
 *
 * @module
 */
export {
  DEFAULT_BACKLOG_LIMIT,
  DEFAULT_BACKOFF_SCHEDULE,
  DEFAULT_DEAD_LETTER_RETENTION_MS,
  DEFAULT_LEASE_MS,
  ENQUEUE_BATCH,
  MAX_DELAY_MS,
  MAX_KEYS_IF_UNDELIVERED,
  MAX_VALUE_BYTES,
  STATS_SAMPLE,
} from "./queue/limits.ts";
export {
  type DeadLetter,
  EnqueueManyError,
  type EnqueueOptions,
  type KvQueueOptions,
  type MessageHandler,
  type QueueMessage,
  type QueueStats,
} from "./queue/types.ts";
export { KvQueue } from "./queue/producer.ts";
export type { PendingMessage, PendingPage, PendingState } from "./queue/admin.ts";
export { KvQueueRunner, type KvQueueRunnerOptions } from "./queue/runner.ts";
export {
  type DenoCronOptions,
  type KvWithQueues,
  withQueues,
  type WithQueuesOptions,
} from "./queue/deno.ts";
export { type CronTick, kvCron, type KvCronOptions } from "./queue/cron.ts";
export type { CronSchedule, CronScheduleExpression } from "./cron.ts";
