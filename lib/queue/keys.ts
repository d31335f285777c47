/**
 * The key layout of the queue engine: every key is built by {@linkcode Keys}.
 *
 * Key layout, all under one prefix `P` (default `["__kvq__"]`; `withQueues`
 * uses `["__kvq__", "deno"]`, `KvMessageQueue` `["__kvq__", "fedify"]`):
 *
 * | key                       | value                                            |
 * | ------------------------- | ------------------------------------------------ |
 * | `[...P, "r", due, id]`    | the message's envelope: type, options, attempts, and the owner while leased |
 * | `[...P, "v", id]`         | the message value (up to 64 KiB), unless small enough to ride in the envelope |
 * | `[...P, "i", key]`        | idempotency key → message id, while pending      |
 * | `[...P, "oo", okey]`      | present while the line of an ordering key has messages |
 * | `[...P, "ol", okey]`      | the last place given in that line (written by enqueues only) |
 * | `[...P, "oq", okey, seq]` | a message of that line, head included, by place  |
 * | `[...P, "d", id]`         | dead letter (type, attempts, error, times, ordering key) |
 * | `[...P, "dv", id]`        | dead letter value                                |
 * | `[...P, "dx", failedAt, id]` | dead letters by failure time (retention sweep)  |
 * | `[...P, "deadCount"]`     | `Deno.KvU64` number of dead letters              |
 * | `[...P, "e", id]`        | receipt of the enqueue commit whose first message is `id`, kept `RECEIPT_MS` (see `exact.ts`) |
 * | `[...P, "paused"]`        | `true` while the queue is paused (`KvQueue.pause()`) |
 * | `[...P, "sig"]`           | bumped by enqueues, retries and releases; workers `watch` it |
 * | `[...P, "count"]`         | `Deno.KvU64` number of pending messages          |
 *
 * Cron jobs (`cron.ts`) keep each job's queue under `[...C, name]` (`C`
 * default `["__kvq__", "cron"]`) with the schedule's state at
 * `[...C, name, "state"]`.
 *
 * Every pending message (but those waiting behind another of their ordering
 * key) has exactly one `"r"` entry, ordered by the time it may next be taken. A claim moves that entry to the lease's expiry, with the
 * owner in its value, in one commit checked by versionstamp; renewals move it
 * again. So one ordered index answers "what is due", a crashed worker's
 * message comes back by itself when its lease runs out, and the versionstamp
 * of the entry is the lease token. Claims, completions and enqueues made
 * together share commits (up to 10 checks and under 1 KiB each, see
 * `REQUEST_BUDGET_BYTES`), so a delivered message costs less than one KV
 * write. Only the head of an ordering key's line is in `"r"`; finishing it
 * schedules the next.
 *
 * Leases and due times come from each worker's clock: workers whose clocks
 * differ by more than a third of `leaseMs` may take over each other's live
 * leases (the message then runs twice; at-least-once still holds).
 *
 * @module
 */

/** Builds every key the queue uses; one place, one layout. */
export class Keys {
  constructor(readonly prefix: Deno.KvKey) {}
  schedule(due: number, id: string): Deno.KvKey {
    return [...this.prefix, "r", due, id];
  }
  scheduleRoot(): Deno.KvKey {
    return [...this.prefix, "r"];
  }
  value(id: string): Deno.KvKey {
    return [...this.prefix, "v", id];
  }
  idempotency(key: string): Deno.KvKey {
    return [...this.prefix, "i", key];
  }
  lineOpen(key: string): Deno.KvKey {
    return [...this.prefix, "oo", key];
  }
  lineLast(key: string): Deno.KvKey {
    return [...this.prefix, "ol", key];
  }
  waiting(key: string, seq: number): Deno.KvKey {
    return [...this.prefix, "oq", key, seq];
  }
  waitingIn(key: string): Deno.KvKey {
    return [...this.prefix, "oq", key];
  }
  waitingRoot(): Deno.KvKey {
    return [...this.prefix, "oq"];
  }
  dead(id: string): Deno.KvKey {
    return [...this.prefix, "d", id];
  }
  deadRoot(): Deno.KvKey {
    return [...this.prefix, "d"];
  }
  deadValue(id: string): Deno.KvKey {
    return [...this.prefix, "dv", id];
  }
  /** Dead letters by failure time, for the retention sweep. */
  deadIndex(failedAt: number, id: string): Deno.KvKey {
    return [...this.prefix, "dx", failedAt, id];
  }
  deadIndexRoot(): Deno.KvKey {
    return [...this.prefix, "dx"];
  }
  /** `Deno.KvU64` number of dead letters. */
  deadCount(): Deno.KvKey {
    return [...this.prefix, "deadCount"];
  }
  /** Written (with `expireIn`) by the commit that enqueued `id`: a re-send of it fails its check. */
  receipt(id: string): Deno.KvKey {
    return [...this.prefix, "e", id];
  }
  /** Present (true) while the queue is paused for every runner. */
  paused(): Deno.KvKey {
    return [...this.prefix, "paused"];
  }
  signal(): Deno.KvKey {
    return [...this.prefix, "sig"];
  }
  count(): Deno.KvKey {
    return [...this.prefix, "count"];
  }
}

/** The id at the end of a `"r"` key. */
export function idOf(key: Deno.KvKey): string {
  return key[key.length - 1] as string;
}

/** The due time in a `"r"` key. */
export function dueOf(key: Deno.KvKey): number {
  return key[key.length - 2] as number;
}
