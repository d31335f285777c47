/**
 * Message queues on plain Deno KV atomics, for servers reached over KV Connect
 * (where `kv.enqueue()` is refused and `listenQueue` never fires). One engine,
 * two faces: {@linkcode withQueues} (Deno-compatible) and
 * {@linkcode KvQueue} / {@linkcode KvQueueRunner} (typed).
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
 * | `[...P, "sig"]`           | bumped by enqueues, retries and releases; workers `watch` it |
 * | `[...P, "count"]`         | `Deno.KvU64` number of pending messages          |
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

/** Deno's own default retry schedule (denokv's sqlite backend). */
export const DEFAULT_BACKOFF_SCHEDULE: readonly number[] = [100, 1000, 5000, 30000, 60000];
/** Longest delay Deno Queues accept: 30 days. */
export const MAX_DELAY_MS = 30 * 24 * 60 * 60 * 1000;
/** KV Connect value limit (denokv): 64 KiB per value. */
export const MAX_VALUE_BYTES = 65536;
/**
 * At most this many `keysIfUndelivered`: the dead-letter commit writes the
 * value to each of them plus twice for itself, and must stay under KV
 * Connect's 800 KiB per atomic write with 64 KiB values.
 */
export const MAX_KEYS_IF_UNDELIVERED = 10;
/**
 * Most messages per atomic commit in batch enqueues; small ones are packed
 * under 1 KiB per commit, and one over that goes alone.
 */
export const ENQUEUE_BATCH = 10;
/** Default number of pending messages after which enqueue throws. */
export const DEFAULT_BACKLOG_LIMIT = 100_000;
/** Default lease time; renewed every third of it while a handler runs. */
export const DEFAULT_LEASE_MS = 30_000;

/** denokv allows 10 checks per atomic write: one per claimed or completed message. */
const CHECKS_PER_COMMIT = 10;
/**
 * Deno's KV client (hyper's HTTP/2 over a socket with Nagle's algorithm on,
 * without vectored writes) sends a request body over 1 KiB in a second TCP
 * write, which then waits for the server's ACK of the first: about 40 ms
 * against a Linux server's delayed ACK. Batched commits stay under this many
 * estimated bytes so that each goes out in one write.
 */
const REQUEST_BUDGET_BYTES = 960;
const U64_MOD = 0x10000000000000000n;
/**
 * Values up to this many (estimated) bytes ride in the envelope: no `"v"`
 * entry to write, read or delete, at the price of carrying them in every
 * claim and renewal.
 */
const INLINE_VALUE_BYTES = 128;
/** Commits `enqueueMany` keeps in flight at once. */
const ENQUEUE_MANY_IN_FLIGHT = 4;
/** Commit attempts before an enqueue or completion on a busy ordering key gives up. */
const ORDERED_RETRIES = 50;
/** denokv refuses keys over 2 KiB. */
const MAX_KEY_BYTES = 2048;
/** Idempotency and ordering keys end up inside KV keys: keep them well under that. */
const MAX_NAME_BYTES = 1024;
/**
 * An idle runner looks at the queue at least this often, in case its watch
 * stream died without an error (a half-open connection).
 */
const IDLE_RECHECK_MS = 60_000;
/**
 * A message no handler here can take goes back for another worker, first
 * after this many ms, doubling each time up to an hour; it does not count
 * as a delivery.
 */
const NO_HANDLER_DELAY_MS = 5_000;
/** Messages whose handlers run in this process (across runners): never claimed twice here. */
const RUNNING_HERE = new Set<string>();

/** Options of {@linkcode KvQueue}. */
export interface KvQueueOptions {
  /** Key prefix for everything the queue stores. Default `["__kvq__"]`. */
  prefix?: Deno.KvKey;
  /** Pending messages after which `enqueue` throws. Default 100,000. */
  backlogLimit?: number;
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
 * another of their ordering key count as delayed.
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

/**
 * What a message's `"r"` entry holds. It is rewritten by every claim and
 * renewal and rides in batched commits, so names are short and defaults are
 * left out.
 */
interface Envelope {
  /** Message type. */
  t: string;
  /** Enqueue time (ms). */
  at: number;
  /** Deliveries started so far. */
  n: number;
  /** The worker holding the lease; absent when not leased. */
  o?: string;
  /** `maxAttempts`, when not the schedule's length + 1. */
  max?: number;
  /** `backoffSchedule`, when not Deno's default. */
  b?: number[];
  /** `keysIfUndelivered`. */
  u?: Deno.KvKey[];
  /** Idempotency key. */
  ik?: string;
  /** Ordering key. */
  ok?: string;
  /** Place in its ordering key's line. */
  seq?: number;
  /** 1 when the value rides here in `v` (small values) instead of in a `"v"` entry. */
  iv?: 1;
  /** The value, when `iv`. */
  v?: unknown;
  /** Times it went back because no worker that took it had a handler for its type. */
  nh?: number;
}

/** The attempts a message gets. */
function maxAttemptsOf(env: Envelope): number {
  return env.max ?? (env.b ?? DEFAULT_BACKOFF_SCHEDULE).length + 1;
}

/** An `"oq"` entry: a message waiting for its turn. */
interface Waiting {
  id: string;
  due: number;
  envelope: Envelope;
}

interface Prepared {
  id: string;
  envelope: Envelope;
  value: unknown;
  due: number;
  /** Estimated size of its mutations in a commit. */
  bytes: number;
}

function describe(value: unknown): string {
  try {
    return typeof value === "string" ? JSON.stringify(value) : String(value);
  } catch {
    return typeof value;
  }
}

function checkInteger(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number" || !Number.isInteger(value)) {
    throw new TypeError(`"${name}" must be an integer: got ${describe(value)}`);
  }
  if (value < min) throw new RangeError(`"${name}" must be >= ${min}: got ${value}`);
  if (value > max) throw new RangeError(`"${name}" must be <= ${max}: got ${value}`);
  return value;
}

function checkKey(name: string, key: unknown): Deno.KvKey {
  if (!Array.isArray(key)) {
    throw new TypeError(`"${name}" must be a KV key array: got ${describe(key)}`);
  }
  for (const part of key) {
    const t = typeof part;
    if (
      t !== "string" && t !== "number" && t !== "bigint" && t !== "boolean" &&
      !(part instanceof Uint8Array)
    ) {
      throw new TypeError(`"${name}" has a part that is not a KV key part: got ${describe(part)}`);
    }
  }
  const bytes = keyBytes(key as Deno.KvKey);
  if (bytes > MAX_KEY_BYTES) {
    throw new RangeError(`"${name}" must be at most ${MAX_KEY_BYTES} bytes: got about ${bytes}`);
  }
  return key as Deno.KvKey;
}

function checkName(name: string, value: unknown): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "string" || value.length === 0) {
    throw new TypeError(`"${name}" must be a non-empty string: got ${describe(value)}`);
  }
  if (textBytes(value) > MAX_NAME_BYTES) {
    throw new RangeError(
      `"${name}" must be at most ${MAX_NAME_BYTES} bytes: got ${value.length} characters`,
    );
  }
  return value;
}

let idCounter = 0;
/**
 * Ids sort by creation time, so equal due times keep FIFO order; they are
 * short because every key of a message carries one.
 */
function newId(): string {
  idCounter = (idCounter + 1) % 1679616;
  return Date.now().toString(36).padStart(9, "0") + idCounter.toString(36).padStart(4, "0") +
    crypto.randomUUID().slice(0, 8);
}

function errorText(err: unknown): string {
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  return describe(err);
}

function chunks<T>(items: readonly T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

/** Splits `items` into runs whose `bytes` (plus `fixed` per run) fit the request budget. */
function pack<T>(
  items: readonly T[],
  bytes: (item: T) => number,
  fixed: number,
  max: number,
): T[][] {
  const out: T[][] = [];
  let run: T[] = [];
  let size = fixed;
  for (const item of items) {
    const b = bytes(item);
    if (run.length > 0 && (size + b > REQUEST_BUDGET_BYTES || run.length >= max)) {
      out.push(run);
      run = [];
      size = fixed;
    }
    run.push(item);
    size += b;
  }
  if (run.length > 0) out.push(run);
  return out;
}

/** Bytes of a string in UTF-8 (keys) or V8's one- or two-byte form (values), rounded up. */
function textBytes(s: string): number {
  // deno-lint-ignore no-control-regex
  return /^[\x00-\x7f]*$/.test(s) ? s.length : s.length * 3;
}

/** An upper estimate of a key's size in denokv's key encoding. */
function keyBytes(key: Deno.KvKey): number {
  let n = 0;
  for (const part of key) {
    if (typeof part === "string") n += textBytes(part) + 2;
    else if (part instanceof Uint8Array) n += part.byteLength * 2 + 2;
    else n += 10;
  }
  return n;
}

/**
 * An estimate of a value's size in V8's serialization, which KV uses (tags,
 * varint lengths, small integers as varints). It stops past `cap`, so a huge
 * value costs no more to measure than a small one.
 */
function valueBytes(value: unknown, cap = REQUEST_BUDGET_BYTES): number {
  let n = 2;
  const stack: unknown[] = [value];
  // Children are pushed one at a time against the cap: a sparse array of a
  // billion slots stops after `cap` of them.
  const push = (x: unknown) => {
    n += 1;
    stack.push(x);
    return n > cap;
  };
  while (stack.length > 0) {
    if (n > cap) return n;
    const v = stack.pop();
    if (v === null || typeof v !== "object") {
      if (typeof v === "string") n += textBytes(v) + 3;
      else if (typeof v === "number") n += Number.isInteger(v) && Math.abs(v) < 2 ** 30 ? 3 : 9;
      else if (typeof v === "bigint") n += 4 + 8 * Math.ceil(v.toString(16).length / 16);
      else n += 1;
    } else if (ArrayBuffer.isView(v)) {
      // V8 writes a view's whole backing buffer, not just the view.
      n += v.buffer.byteLength + 16;
    } else if (v instanceof ArrayBuffer) n += v.byteLength + 12;
    else if (v instanceof Date || v instanceof Deno.KvU64) n += 9;
    else if (v instanceof Map) {
      n += 6;
      for (const [k, x] of v) if (push(k) || push(x)) return n;
    } else if (v instanceof Set || Array.isArray(v)) {
      n += 6;
      for (const x of v) if (push(x)) return n;
    } else {
      n += 4;
      for (const k in v) {
        if (!Object.hasOwn(v, k)) continue;
        n += textBytes(k) + 2;
        if (push((v as Record<string, unknown>)[k])) return n;
      }
    }
  }
  return n;
}

/** `-n` as the KvU64 addend `sum` needs (it wraps around). */
function minus(n: number): bigint {
  return U64_MOD - BigInt(n);
}

/** Builds every key the queue uses; one place, one layout. */
class Keys {
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
  signal(): Deno.KvKey {
    return [...this.prefix, "sig"];
  }
  count(): Deno.KvKey {
    return [...this.prefix, "count"];
  }
}

/** The id at the end of a `"r"` key. */
function idOf(key: Deno.KvKey): string {
  return key[key.length - 1] as string;
}

/** The due time in a `"r"` key. */
function dueOf(key: Deno.KvKey): number {
  return key[key.length - 2] as number;
}

/**
 * The typed queue: enqueue messages by type, register handlers, and run them
 * with a {@linkcode KvQueueRunner}.
 *
 * @example
 * ```ts
 * import { KvQueue, KvQueueRunner } from "./kv_queue.ts";
 * const kv = await Deno.openKv(":memory:");
 * const queue = new KvQueue(kv);
 * const done = Promise.withResolvers<string>();
 * queue.handle<{ to: string }>("send-email", (data) => done.resolve(data.to));
 * const runner = new KvQueueRunner(kv, queue);
 * const running = runner.run();
 * await queue.enqueue("send-email", { to: "ada@example.com" });
 * if (await done.promise !== "ada@example.com") throw new Error("wrong message");
 * await runner.stop();
 * await running;
 * kv.close();
 * ```
 */
export class KvQueue {
  readonly kv: Deno.Kv;
  readonly prefix: Deno.KvKey;
  readonly backlogLimit: number;
  /** @internal */
  readonly keys: Keys;
  readonly #handlers = new Map<string, MessageHandler<never>>();
  #countReadAt = 0;
  #countSinceRead = 0;
  #countValue = 0;
  #countRead: Promise<void> | null = null;
  #pending: { msg: Prepared; done: PromiseWithResolvers<Deno.KvCommitResult> }[] = [];
  #flushScheduled = false;
  /** What the signal and counter mutations add to a commit. */
  readonly #signalBytes: number;
  /** Runners of this queue in this process: an enqueue here wakes them at once. */
  readonly #runners = new Set<{ wake(): void }>();
  /** The last enqueue per ordering key in this process: same-key enqueues here go one by one. */
  readonly #lineTails = new Map<string, Promise<unknown>>();

  constructor(kv: Deno.Kv, options: KvQueueOptions = {}) {
    this.kv = kv;
    this.prefix = checkKey("prefix", options.prefix ?? ["__kvq__"]);
    this.backlogLimit = checkInteger(
      "backlogLimit",
      options.backlogLimit ?? DEFAULT_BACKLOG_LIMIT,
      1,
      Number.MAX_SAFE_INTEGER,
    );
    this.keys = new Keys(this.prefix);
    this.#signalBytes = keyBytes(this.keys.signal()) + keyBytes(this.keys.count()) + 70;
  }

  /** Registers the handler for messages of `type` (one per type). */
  handle<T = unknown>(type: string, handler: MessageHandler<T>): this {
    if (typeof type !== "string") {
      throw new TypeError(`"type" must be a string: got ${describe(type)}`);
    }
    if (typeof handler !== "function") {
      throw new TypeError(`"handler" must be a function: got ${describe(handler)}`);
    }
    this.#handlers.set(type, handler as MessageHandler<never>);
    return this;
  }

  /** @internal The handler for `type`, if any. */
  handlerFor(type: string): MessageHandler<unknown> | undefined {
    return this.#handlers.get(type) as MessageHandler<unknown> | undefined;
  }

  /** @internal Registers (or, with `false`, forgets) a runner to wake on local enqueues. */
  attach(runner: { wake(): void }, on = true): void {
    if (on) this.#runners.add(runner);
    else this.#runners.delete(runner);
  }

  /** @internal Wakes this process's runners after an enqueue committed. */
  wakeRunners(): void {
    for (const r of this.#runners) r.wake();
  }

  /** @internal Validates options and builds a message. */
  prepare(type: string, value: unknown, options: EnqueueOptions = {}, now = Date.now()): Prepared {
    if (typeof type !== "string") {
      throw new TypeError(`"type" must be a string: got ${describe(type)}`);
    }
    const delayMs = checkInteger("delayMs", options.delayMs ?? 0, 0, MAX_DELAY_MS);
    const schedule = options.backoffSchedule;
    if (schedule !== undefined) {
      if (!Array.isArray(schedule)) {
        throw new TypeError(`"backoffSchedule" must be an array: got ${describe(schedule)}`);
      }
      if (schedule.length > 100) {
        throw new RangeError(`"backoffSchedule" must have <= 100 entries: got ${schedule.length}`);
      }
      schedule.forEach((ms, i) => checkInteger(`backoffSchedule[${i}]`, ms, 0, MAX_DELAY_MS));
    }
    const maxAttempts = options.maxAttempts === undefined
      ? undefined
      : checkInteger("maxAttempts", options.maxAttempts, 1, 1000);
    const keys = options.keysIfUndelivered ?? [];
    if (!Array.isArray(keys)) {
      throw new TypeError(`"keysIfUndelivered" must be an array of keys: got ${describe(keys)}`);
    }
    if (keys.length > MAX_KEYS_IF_UNDELIVERED) {
      throw new RangeError(
        `"keysIfUndelivered" must have <= ${MAX_KEYS_IF_UNDELIVERED} keys: got ${keys.length}`,
      );
    }
    keys.forEach((k, i) => checkKey(`keysIfUndelivered[${i}]`, k));
    const idempotencyKey = checkName("idempotencyKey", options.idempotencyKey);
    const orderingKey = checkName("orderingKey", options.orderingKey);
    const envelope: Envelope = { t: type, at: now, n: 0 };
    if (schedule !== undefined) envelope.b = [...schedule];
    if (maxAttempts !== undefined && maxAttempts !== maxAttemptsOf(envelope)) {
      envelope.max = maxAttempts;
    }
    if (keys.length > 0) envelope.u = keys.map((k) => [...k]);
    if (idempotencyKey !== undefined) envelope.ik = idempotencyKey;
    if (orderingKey !== undefined) envelope.ok = orderingKey;
    const id = newId();
    const due = now + delayMs;
    const size = valueBytes(value);
    if (size <= INLINE_VALUE_BYTES) {
      envelope.iv = 1;
      envelope.v = value;
    }
    // Protobuf adds about 14 bytes per set and 16 per check.
    const bytes = keyBytes(this.keys.schedule(due, id)) + valueBytes(envelope) + 14 +
      (envelope.iv ? 0 : keyBytes(this.keys.value(id)) + size + 14) +
      (idempotencyKey === undefined ? 0 : 2 * textBytes(idempotencyKey) + 80);
    return { id, envelope, value, due, bytes };
  }

  /**
   * @internal Adds the mutations of one enqueue without an ordering key to
   * `op`; `signal` false leaves the signal and counter to the caller (one
   * each per commit is enough).
   */
  addTo(op: Deno.AtomicOperation, msg: Prepared, signal = true): Deno.AtomicOperation {
    const k = this.keys;
    op.set(k.schedule(msg.due, msg.id), msg.envelope);
    if (!msg.envelope.iv) op.set(k.value(msg.id), msg.value);
    const idem = msg.envelope.ik;
    if (idem !== undefined) {
      op.check({ key: k.idempotency(idem), versionstamp: null }).set(k.idempotency(idem), msg.id);
    }
    if (signal) op.set(k.signal(), msg.id).sum(k.count(), 1n);
    return op;
  }

  /**
   * @internal Throws a `RangeError` when `adding` more messages would pass
   * the backlog limit. Reading the counter on every enqueue would double its
   * cost; a short cache plus local increments keeps the limit close enough.
   */
  async checkBacklog(adding: number): Promise<void> {
    if (
      Date.now() - this.#countReadAt > 200 ||
      this.#countValue + this.#countSinceRead + adding > this.backlogLimit
    ) {
      // Enqueues started together share one read.
      this.#countRead ??= this.#readCount().finally(() => this.#countRead = null);
      await this.#countRead;
    }
    const pending = this.#countValue + this.#countSinceRead;
    if (pending + adding > this.backlogLimit) {
      throw new RangeError(
        `queue backlog is full: ${pending} pending messages, "backlogLimit" is ${this.backlogLimit}`,
      );
    }
    this.#countSinceRead += adding;
  }

  /** Gives back what `checkBacklog` counted for enqueues that did not happen. */
  #unaccount(n: number): void {
    this.#countSinceRead = Math.max(0, this.#countSinceRead - n);
  }

  async #readCount(): Promise<void> {
    const startedAt = Date.now();
    const entry = await this.kv.get<Deno.KvU64>(this.keys.count());
    const raw = entry.value?.value ?? 0n;
    this.#countValue = raw > BigInt(Number.MAX_SAFE_INTEGER) ? 0 : Number(raw);
    this.#countReadAt = startedAt;
    this.#countSinceRead = 0;
  }

  /**
   * Enqueues `data` as a message of `type` and returns its id. With an
   * `idempotencyKey` that is still pending, returns the pending message's id
   * and enqueues nothing.
   *
   * @example
   * ```ts
   * import { KvQueue } from "./kv_queue.ts";
   * const kv = await Deno.openKv(":memory:");
   * const queue = new KvQueue(kv);
   * const a = await queue.enqueue("ping", 1, { idempotencyKey: "once" });
   * const b = await queue.enqueue("ping", 2, { idempotencyKey: "once" });
   * if (a !== b) throw new Error("second enqueue should be a no-op");
   * kv.close();
   * ```
   */
  async enqueue<T = unknown>(type: string, data: T, options: EnqueueOptions = {}): Promise<string> {
    const msg = this.prepare(type, data, options);
    await this.checkBacklog(1);
    const { ik: idempotencyKey, ok: orderingKey } = msg.envelope;
    if (orderingKey !== undefined) return (await this.#enqueueOrdered(orderingKey, [msg]))![0];
    if (idempotencyKey === undefined) {
      await this.groupCommit(msg);
      return msg.id;
    }
    let res: Deno.KvCommitResult | Deno.KvCommitError;
    try {
      res = await this.addTo(this.kv.atomic(), msg).commit();
    } catch (err) {
      this.#unaccount(1);
      throw err;
    }
    if (res.ok) {
      this.wakeRunners();
      return msg.id;
    }
    this.#unaccount(1);
    const existing = await this.kv.get<string>(this.keys.idempotency(idempotencyKey));
    if (existing.value !== null) return existing.value;
    // The pending message finished between our commit and the read: try again.
    return await this.enqueue(type, data, options);
  }

  /**
   * @internal Enqueues made in the same turn of the event loop share one
   * commit ({@linkcode ENQUEUE_BATCH} at most). They carry no checks, so a
   * group can only fail as a whole; one the client refuses before sending
   * (a value it cannot serialize or that is too large) is retried one message
   * per commit, so only the offending message fails.
   */
  groupCommit(msg: Prepared): Promise<Deno.KvCommitResult> {
    const done = Promise.withResolvers<Deno.KvCommitResult>();
    this.#pending.push({ msg, done });
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      setTimeout(() => {
        this.#flushScheduled = false;
        const pending = this.#pending;
        this.#pending = [];
        for (const group of pack(pending, (p) => p.msg.bytes, this.#signalBytes, ENQUEUE_BATCH)) {
          this.#commitGroup(group);
        }
      }, 0);
    }
    return done.promise;
  }

  async #commitGroup(
    group: { msg: Prepared; done: PromiseWithResolvers<Deno.KvCommitResult> }[],
  ): Promise<void> {
    let res: Deno.KvCommitResult;
    try {
      res = await this.#writeBatch(group.map((p) => p.msg));
    } catch (err) {
      // The client refuses oversized writes before sending them too.
      const unsent = err instanceof TypeError || err instanceof DOMException;
      if (group.length > 1 && unsent) {
        for (const one of group) this.#commitGroup([one]);
        return;
      }
      this.#unaccount(group.length);
      for (const { done } of group) done.reject(err);
      return;
    }
    for (const { done } of group) done.resolve(res);
  }

  /**
   * Writes messages without an ordering key or idempotency key (so without
   * checks) in one commit, with one signal and one counter update, and wakes
   * this process's runners. Values are serialized as they are added: one KV
   * cannot store throws here, before anything was sent.
   */
  async #writeBatch(msgs: readonly Prepared[]): Promise<Deno.KvCommitResult> {
    const op = this.kv.atomic();
    for (const msg of msgs) this.addTo(op, msg, false);
    const res = await op.set(this.keys.signal(), msgs[0].id)
      .sum(this.keys.count(), BigInt(msgs.length))
      .commit();
    this.wakeRunners();
    return res as Deno.KvCommitResult;
  }

  /**
   * Appends messages to the line of `orderingKey`. The first message of an
   * empty line opens it (`"oo"`) and is scheduled; the others wait in `"oq"`
   * until the message before them is finished. An append checks only the
   * line's last place (`"ol"`, written by appends alone) and that the line is
   * still open, so finishing a message never has to race with appends; only
   * closing an empty line does. Same-key enqueues of this process go one by
   * one. `extra` adds mutations to the same commit; when that commit fails,
   * `stillValid` says whether to try again (false: give up, return null).
   */
  #enqueueOrdered(
    orderingKey: string,
    msgs: Prepared[],
    extra?: (op: Deno.AtomicOperation) => void,
    stillValid?: () => Promise<boolean>,
  ): Promise<string[] | null> {
    const previous = this.#lineTails.get(orderingKey) ?? Promise.resolve();
    const mine = previous.catch(() => {}).then(() =>
      this.#appendToLine(orderingKey, msgs, extra, stillValid)
    );
    const tail = mine.catch(() => {});
    this.#lineTails.set(orderingKey, tail);
    tail.then(() => {
      if (this.#lineTails.get(orderingKey) === tail) this.#lineTails.delete(orderingKey);
    });
    return mine;
  }

  async #appendToLine(
    orderingKey: string,
    msgs: Prepared[],
    extra?: (op: Deno.AtomicOperation) => void,
    stillValid?: () => Promise<boolean>,
  ): Promise<string[] | null> {
    const k = this.keys;
    const idem = msgs.length === 1 ? msgs[0].envelope.ik : undefined;
    for (let attempt = 0; attempt < ORDERED_RETRIES; attempt++) {
      const [open, last] = await this.kv.getMany<[number, number]>([
        k.lineOpen(orderingKey),
        k.lineLast(orderingKey),
      ]);
      const op = this.kv.atomic().check(open).check(last);
      let seq = last.value ?? 0;
      for (const msg of msgs) {
        msg.envelope.seq = ++seq;
        if (!msg.envelope.iv) op.set(k.value(msg.id), msg.value);
        op.set(k.waiting(orderingKey, seq), { id: msg.id, due: msg.due, envelope: msg.envelope });
      }
      if (open.value === null) {
        // An empty line: the first message is its head at once.
        op.set(k.lineOpen(orderingKey), 1).set(
          k.schedule(msgs[0].due, msgs[0].id),
          msgs[0].envelope,
        );
      }
      op.set(k.lineLast(orderingKey), seq)
        .set(k.signal(), msgs[0].id)
        .sum(k.count(), BigInt(msgs.length));
      if (idem !== undefined) {
        op.check({ key: k.idempotency(idem), versionstamp: null })
          .set(k.idempotency(idem), msgs[0].id);
      }
      extra?.(op);
      if ((await op.commit()).ok) {
        this.wakeRunners();
        return msgs.map((m) => m.id);
      }
      if (idem !== undefined) {
        const existing = await this.kv.get<string>(k.idempotency(idem));
        if (existing.value !== null) {
          this.#unaccount(1);
          return [existing.value];
        }
      }
      if (stillValid && !await stillValid()) {
        this.#unaccount(msgs.length);
        return null;
      }
      // Another process appended or closed the line: try again a moment later.
      await new Promise((r) => setTimeout(r, Math.random() * Math.min(100, 2 ** attempt)));
    }
    this.#unaccount(msgs.length);
    throw new Error(
      `enqueue: the line of ordering key ${JSON.stringify(orderingKey)} kept changing; ` +
        `gave up after ${ORDERED_RETRIES} attempts`,
    );
  }

  /**
   * Enqueues many messages of `type`, up to {@linkcode ENQUEUE_BATCH} per atomic
   * commit with a few commits in flight at once (one at a time with an
   * `orderingKey`, to keep the order), and returns their ids in order. If a
   * commit fails, the others in flight end first and an
   * {@linkcode EnqueueManyError} lists the ids that were enqueued.
   *
   * @example
   * ```ts
   * import { KvQueue } from "./kv_queue.ts";
   * const kv = await Deno.openKv(":memory:");
   * const queue = new KvQueue(kv);
   * const ids = await queue.enqueueMany("resize", ["a.png", "b.png", "c.png"]);
   * if (ids.length !== 3) throw new Error("expected three ids");
   * kv.close();
   * ```
   */
  async enqueueMany<T = unknown>(
    type: string,
    items: readonly T[],
    options: Omit<EnqueueOptions, "idempotencyKey"> = {},
  ): Promise<string[]> {
    if ((options as EnqueueOptions).idempotencyKey !== undefined) {
      throw new TypeError(`"idempotencyKey" is not supported by enqueueMany: use enqueue`);
    }
    const prepared = items.map((d) => this.prepare(type, d, options));
    const batches = pack(prepared, (m) => m.bytes, this.#signalBytes, ENQUEUE_BATCH);
    const orderingKey = options.orderingKey;
    const enqueued = new Set<string>();
    const commit = async (batch: Prepared[]) => {
      await this.checkBacklog(batch.length);
      if (orderingKey !== undefined) await this.#enqueueOrdered(orderingKey, batch);
      else {
        await this.#writeBatch(batch).catch((err) => {
          this.#unaccount(batch.length);
          throw err;
        });
      }
      for (const m of batch) enqueued.add(m.id);
    };
    let next = 0;
    let stop = false;
    const lane = async () => {
      try {
        while (!stop && next < batches.length) await commit(batches[next++]);
      } catch (err) {
        stop = true;
        throw err;
      }
    };
    const lanes = orderingKey === undefined ? ENQUEUE_MANY_IN_FLIGHT : 1;
    const results = await Promise.allSettled(Array.from({ length: lanes }, lane));
    const failed = results.find((r) => r.status === "rejected") as PromiseRejectedResult;
    if (failed) {
      const ids = prepared.map((m) => m.id).filter((id) => enqueued.has(id));
      const reason = failed.reason instanceof Error ? failed.reason.message : String(failed.reason);
      throw new EnqueueManyError(
        `enqueueMany: ${ids.length} of ${prepared.length} messages enqueued, then: ${reason}`,
        ids,
        { cause: failed.reason },
      );
    }
    return prepared.map((m) => m.id);
  }

  /**
   * Counts of ready, delayed, running (leased) and dead messages. It reads
   * every pending message's small envelope (not its value), so it costs one
   * list of the queue's size.
   *
   * @example
   * ```ts
   * import { KvQueue } from "./kv_queue.ts";
   * const kv = await Deno.openKv(":memory:");
   * const queue = new KvQueue(kv);
   * await queue.enqueue("now", 1);
   * await queue.enqueue("later", 2, { delayMs: 60_000 });
   * const s = await queue.stats();
   * if (s.ready !== 1 || s.delayed !== 1) throw new Error(JSON.stringify(s));
   * kv.close();
   * ```
   */
  async stats(): Promise<QueueStats> {
    const now = Date.now();
    let ready = 0;
    let delayed = 0;
    let running = 0;
    let heads = 0;
    for await (const e of this.kv.list<Envelope>({ prefix: this.keys.scheduleRoot() })) {
      const due = dueOf(e.key);
      if (e.value.o !== undefined && due > now) running++;
      else if (due <= now) ready++;
      else delayed++;
      if (e.value.ok !== undefined) heads++;
    }
    let inLines = 0;
    for await (const _ of this.kv.list({ prefix: this.keys.waitingRoot() })) inLines++;
    let dead = 0;
    for await (const _ of this.kv.list({ prefix: this.keys.deadRoot() })) dead++;
    // Each line's head is also in "r"; the rest of a line waits for its turn.
    return { ready, delayed: delayed + inLines - heads, running, dead };
  }

  /**
   * The dead-letter list, oldest first.
   *
   * @example
   * ```ts
   * import { KvQueue } from "./kv_queue.ts";
   * const kv = await Deno.openKv(":memory:");
   * const queue = new KvQueue(kv);
   * const letters = await queue.listDead({ limit: 10 });
   * if (letters.length !== 0) throw new Error("a new queue has no dead letters");
   * kv.close();
   * ```
   */
  async listDead(options: { limit?: number } = {}): Promise<DeadLetter[]> {
    const out: DeadLetter[] = [];
    const limit = options.limit === undefined
      ? undefined
      : checkInteger("limit", options.limit, 1, 1e9);
    for await (
      const e of this.kv.list<Omit<DeadLetter, "value" | "id">>({ prefix: this.keys.deadRoot() }, {
        limit,
      })
    ) {
      const id = idOf(e.key);
      const v = await this.kv.get(this.keys.deadValue(id));
      out.push({ ...e.value, id, value: v.value });
    }
    return out;
  }

  /**
   * Puts a dead letter back in the queue with fresh attempts (at the end of
   * its ordering key's line, if it had one); returns the new id, or null if
   * the letter is gone (another call took it first).
   *
   * @example
   * ```ts
   * import { KvQueue } from "./kv_queue.ts";
   * const kv = await Deno.openKv(":memory:");
   * const queue = new KvQueue(kv);
   * if (await queue.requeueDead("no-such-id") !== null) throw new Error("expected null");
   * kv.close();
   * ```
   */
  async requeueDead(id: string, options: EnqueueOptions = {}): Promise<string | null> {
    const k = this.keys;
    const [d, v] = await this.kv.getMany<[Omit<DeadLetter, "value" | "id">, unknown]>([
      k.dead(id),
      k.deadValue(id),
    ]);
    if (d.value === null) return null;
    const msg = this.prepare(d.value.type, v.value, {
      orderingKey: d.value.orderingKey,
      ...options,
    });
    await this.checkBacklog(1);
    const takeLetter = (op: Deno.AtomicOperation) =>
      op.check(d).delete(k.dead(id)).delete(k.deadValue(id));
    const orderingKey = msg.envelope.ok;
    if (orderingKey !== undefined) {
      const ids = await this.#enqueueOrdered(
        orderingKey,
        [msg],
        takeLetter,
        async () => (await this.kv.get(k.dead(id))).versionstamp === d.versionstamp,
      );
      return ids === null ? null : ids[0];
    }
    const res = await takeLetter(this.addTo(this.kv.atomic(), msg)).commit();
    if (!res.ok) {
      this.#unaccount(1);
      return null;
    }
    this.wakeRunners();
    return msg.id;
  }

  /**
   * Deletes dead letters (all, or those in `ids`) and returns how many went.
   *
   * @example
   * ```ts
   * import { KvQueue } from "./kv_queue.ts";
   * const kv = await Deno.openKv(":memory:");
   * const queue = new KvQueue(kv);
   * if (await queue.purgeDead() !== 0) throw new Error("nothing to purge");
   * kv.close();
   * ```
   */
  async purgeDead(ids?: readonly string[]): Promise<number> {
    const targets: string[] = [];
    if (ids) targets.push(...ids);
    else {
      for await (const e of this.kv.list({ prefix: this.keys.deadRoot() })) {
        targets.push(idOf(e.key));
      }
    }
    // Two mutations per letter: stay far under the 1000-mutation limit.
    for (const part of chunks(targets, 200)) {
      const op = this.kv.atomic();
      for (const id of part) op.delete(this.keys.dead(id)).delete(this.keys.deadValue(id));
      await op.commit();
    }
    return targets.length;
  }
}

/** Options of {@linkcode KvQueueRunner}. */
export interface KvQueueRunnerOptions {
  /** Handlers running at once in this process. Default 16. */
  concurrency?: number;
  /** Lease time in ms; renewed every third of it. Default 30,000. */
  leaseMs?: number;
  /** How long `stop()` waits for running handlers before releasing them. Default 30,000. */
  stopTimeoutMs?: number;
  /**
   * Called when a handler throws (the message is retried or dead-lettered),
   * and when a message has no handler here (it goes back for another worker).
   */
  onError?: (error: unknown, message: QueueMessage) => void;
  /** @internal Replaces per-type dispatch (used by `withQueues` and `fedify.ts`). */
  dispatch?: (message: QueueMessage) => unknown | Promise<unknown>;
  /** @internal With `dispatch`: the one message type it handles. */
  dispatchType?: string;
}

/** A message this runner holds the lease of. */
interface Held {
  id: string;
  envelope: Envelope;
  value: unknown;
  /** Its `"r"` key now (moved by every renewal) and the versionstamp that proves the lease. */
  key: Deno.KvKey;
  stamp: string;
  /** True while its handler runs. */
  running: boolean;
  /** Set when a renewal found the lease taken over, or stop() gave it back. */
  lost: boolean;
  /** Aborts the handler's `message.signal` when the message is lost. */
  abort: AbortController;
}

/** Thrown in place of a handler for a message claimed after `stop()`. */
class StopSignal extends Error {}

/** Thrown in place of a handler when this worker has none for the message's type. */
class NoHandler extends Error {
  override name = "NoHandler";
}

/** Waits for `promise`, or `ms` at most. */
async function within(promise: Promise<unknown> | null, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  await Promise.race([promise, new Promise((r) => timer = setTimeout(r, ms))]);
  clearTimeout(timer);
}

/**
 * Runs handlers registered on a {@linkcode KvQueue}: claims due messages with
 * versionstamp-checked leases, renews them while handlers run, retries
 * failures by the message's backoff schedule and dead-letters the rest.
 * Wakes on `kv.watch` of the queue's signal key, on enqueues through the
 * same `KvQueue`, or when the next delayed message or lease expiry it saw is
 * due (and at least every minute when idle).
 *
 * @example
 * ```ts
 * import { KvQueue, KvQueueRunner } from "./kv_queue.ts";
 * const kv = await Deno.openKv(":memory:");
 * const queue = new KvQueue(kv);
 * let seen = 0;
 * queue.handle("tick", () => { seen++; });
 * const runner = new KvQueueRunner(kv, queue, { concurrency: 4 });
 * const running = runner.run();
 * await queue.enqueueMany("tick", [1, 2, 3]);
 * while (seen < 3) await new Promise((r) => setTimeout(r, 10));
 * await runner.stop();
 * await running;
 * kv.close();
 * ```
 */
export class KvQueueRunner {
  readonly kv: Deno.Kv;
  readonly queue: KvQueue;
  readonly concurrency: number;
  readonly leaseMs: number;
  readonly stopTimeoutMs: number;
  readonly #onError?: (error: unknown, message: QueueMessage) => void;
  readonly #dispatch?: (message: QueueMessage) => unknown | Promise<unknown>;
  readonly #dispatchType?: string;
  /** Short: it is written into every leased envelope. */
  readonly #owner = crypto.randomUUID().slice(0, 13);
  /** Messages held, from claim until their final commit. */
  readonly #held = new Map<string, { held: Held; done: Promise<void> }>();
  /** Handlers running now; `concurrency` bounds this. */
  #active = 0;
  #running: Promise<void> | null = null;
  #stopping = false;
  #wakePending = false;
  #wake: (() => void) | null = null;
  #watch: ReadableStreamDefaultReader<Deno.KvEntryMaybe<unknown>[]> | null = null;
  #completions: { held: Held; done: PromiseWithResolvers<void> }[] = [];
  #flushScheduled = false;
  readonly #waker = { wake: () => this.#poke() };

  constructor(kv: Deno.Kv, queue: KvQueue, options: KvQueueRunnerOptions = {}) {
    this.kv = kv;
    this.queue = queue;
    this.concurrency = checkInteger("concurrency", options.concurrency ?? 16, 1, 1000);
    this.leaseMs = checkInteger("leaseMs", options.leaseMs ?? DEFAULT_LEASE_MS, 30, MAX_DELAY_MS);
    this.stopTimeoutMs = checkInteger(
      "stopTimeoutMs",
      options.stopTimeoutMs ?? 30_000,
      0,
      MAX_DELAY_MS,
    );
    this.#onError = options.onError;
    this.#dispatch = options.dispatch;
    this.#dispatchType = options.dispatchType;
  }

  /** Number of handlers running now. */
  get inFlight(): number {
    return this.#active;
  }

  /** @internal Messages held, handlers running or final commits pending. */
  get holding(): number {
    return this.#held.size;
  }

  /**
   * Processes messages until {@linkcode stop} is called; resolves once
   * stopped. Called while a stop is under way, it starts again after it.
   */
  run(): Promise<void> {
    if (this.#running) {
      return this.#stopping ? this.#running.then(() => this.run()) : this.#running;
    }
    this.#stopping = false;
    this.queue.attach(this.#waker);
    this.#running = this.#loop().finally(() => {
      this.queue.attach(this.#waker, false);
      this.#running = null;
    });
    return this.#running;
  }

  /**
   * Stops taking messages, waits up to `stopTimeoutMs` for running handlers
   * (and their final commits), then releases the leases of those still
   * running so other workers can take them at once; their `message.signal`
   * aborts. This process never runs a message again while its old handler
   * is still running.
   */
  async stop(): Promise<void> {
    this.#stopping = true;
    this.#poke();
    // The loop may sit in a KV call the client retries while the server is
    // unreachable: give it a moment to end, but do not wait for that.
    await within(this.#running, 1_000);
    await within(Promise.all([...this.#held.values()].map((h) => h.done)), this.stopTimeoutMs);
    for (const { held } of this.#held.values()) {
      if (!held.running || held.lost) continue;
      this.#lose(held);
      await this.#release(held).catch(() => {});
    }
    this.#held.clear();
    await within(this.#running, Math.max(this.stopTimeoutMs, 1_000));
  }

  #poke(): void {
    this.#wakePending = true;
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  #lose(held: Held): void {
    held.lost = true;
    held.abort.abort(new Error("the message's lease is no longer held by this worker"));
  }

  #startWatch(): void {
    (async () => {
      let pause = 100;
      while (!this.#stopping) {
        try {
          const reader = this.kv.watch([this.queue.keys.signal()]).getReader();
          this.#watch = reader;
          while (!this.#stopping) {
            const { done } = await reader.read();
            if (done) break;
            pause = 100;
            this.#poke();
          }
        } catch {
          // The server went away (restart, network): due-time timers still
          // fire; re-open the watch with a growing pause.
        }
        if (this.#stopping) break;
        await new Promise((r) => setTimeout(r, pause));
        pause = Math.min(pause * 2, 5_000);
        this.#poke();
      }
    })();
  }

  /** Free handler slots; completions still committing count half, so they cannot pile up. */
  #free(): number {
    return Math.min(this.concurrency - this.#active, 2 * this.concurrency - this.#held.size);
  }

  async #loop(): Promise<void> {
    this.#startWatch();
    try {
      while (!this.#stopping) {
        this.#wakePending = false;
        let nextDue: number;
        try {
          nextDue = await this.#fill();
        } catch {
          // The server may be briefly unreachable; look again after a pause.
          nextDue = Date.now() + 1000;
        }
        if (this.#stopping) break;
        if (this.#wakePending) continue;
        const wait = Math.min(nextDue - Date.now(), IDLE_RECHECK_MS);
        const full = this.#free() <= 0;
        if (wait <= 0 && !full) continue;
        await new Promise<void>((resolve) => {
          let timer: ReturnType<typeof setTimeout> | undefined;
          this.#wake = () => {
            clearTimeout(timer);
            resolve();
          };
          // When full, a finishing handler pokes.
          if (!full) timer = setTimeout(() => this.#poke(), Math.max(wait, 0) + 1);
        });
      }
    } finally {
      this.#wake = null;
      // Not awaited: a watch stream may only notice the cancel at its next
      // frame, and stopping must not wait for that.
      this.#watch?.cancel().catch(() => {});
      this.#watch = null;
    }
  }

  /**
   * Claims due messages until the slots are full or none is due, and returns
   * when the earliest entry it saw but could not take yet is due. One list
   * answers both: entries are ordered by due time.
   */
  async #fill(): Promise<number> {
    const root = this.queue.keys.scheduleRoot();
    while (!this.#stopping) {
      const free = this.#free();
      if (free <= 0) return Infinity;
      const now = Date.now();
      const due: Deno.KvEntry<Envelope>[] = [];
      let nextDue = Infinity;
      let listed = 0;
      let ownExpired = false;
      for await (
        const e of this.kv.list<Envelope>({ prefix: root }, { limit: free, batchSize: free })
      ) {
        listed++;
        const at = dueOf(e.key);
        if (at > now) {
          nextDue = at;
          break;
        }
        // A lease that ran out while its handler still runs in this process
        // (renewals failing, or released by a stop that timed out): leave it.
        const id = idOf(e.key);
        if (this.#held.has(id) || RUNNING_HERE.has(id)) ownExpired = true;
        else due.push(e);
      }
      const lost = due.length > 0 && !await this.#claim(due, now);
      if (this.#stopping) break;
      // A lost race means another worker moved entries: look again at once.
      if (lost) continue;
      if (ownExpired) return Math.min(nextDue, Date.now() + 250);
      if (listed === free && nextDue === Infinity) continue;
      return nextDue;
    }
    return Infinity;
  }

  /** Estimated bytes of one claim: check, delete and a set of the moved envelope. */
  #claimBytes(e: Deno.KvEntry<Envelope>): number {
    return 3 * keyBytes(e.key) + valueBytes(e.value) + this.#owner.length + 50;
  }

  /** Claims `entries` in commits of up to ten; false if any of them was lost to another worker. */
  async #claim(entries: Deno.KvEntry<Envelope>[], now: number): Promise<boolean> {
    const groups = pack(entries, (e) => this.#claimBytes(e), 0, CHECKS_PER_COMMIT);
    const results = await Promise.all(groups.map((group) => this.#claimGroup(group, now)));
    return !results.includes(false);
  }

  async #claimGroup(
    group: Deno.KvEntry<Envelope>[],
    now: number,
    read?: Promise<Map<string, unknown>>,
  ): Promise<boolean> {
    const k = this.queue.keys;
    const until = now + this.leaseMs;
    const op = this.kv.atomic();
    const claimed = group.map((e) => {
      const id = idOf(e.key);
      const envelope: Envelope = {
        ...e.value,
        o: this.#owner,
        n: e.value.n + 1,
      };
      const key = k.schedule(until, id);
      op.check(e).delete(e.key).set(key, envelope);
      return { id, envelope, key };
    });
    // The value never changes while the message is pending: read the ones
    // not in their envelope alongside the claim instead of after it.
    read ??= this.#readValues(claimed.filter((c) => !c.envelope.iv).map((c) => c.id));
    const [res, values] = await Promise.all([op.commit(), read]);
    if (!res.ok) {
      if (group.length === 1) return false;
      // Another worker took some of them: claim the rest one by one, or a
      // worker taking one at a time from the head would starve this one.
      const alone = await Promise.all(
        group.map((e) => this.#claimGroup([e], now, Promise.resolve(values))),
      );
      return !alone.includes(false);
    }
    for (const c of claimed) {
      const held: Held = {
        ...c,
        value: c.envelope.iv ? c.envelope.v : values.get(c.id),
        stamp: res.versionstamp,
        running: true,
        lost: false,
        abort: new AbortController(),
      };
      this.#active++;
      RUNNING_HERE.add(c.id);
      this.#held.set(c.id, { held, done: this.#runHandler(held) });
    }
    return true;
  }

  async #readValues(ids: string[]): Promise<Map<string, unknown>> {
    const out = new Map<string, unknown>();
    if (ids.length === 0) return out;
    const entries = await this.kv.getMany(ids.map((id) => this.queue.keys.value(id)));
    entries.forEach((e, i) => out.set(ids[i], e.value));
    return out;
  }

  /** The handler for `type` here, if any. */
  #handlerFor(type: string): ((message: QueueMessage) => unknown) | undefined {
    if (this.#dispatch) {
      const mine = this.#dispatchType === undefined || type === this.#dispatchType;
      return mine ? this.#dispatch : undefined;
    }
    const handler = this.queue.handlerFor(type);
    return handler && ((m: QueueMessage) => handler(m.data, m));
  }

  async #runHandler(held: Held): Promise<void> {
    const env = held.envelope;
    const message: QueueMessage = {
      id: held.id,
      type: env.t,
      data: held.value,
      attempt: env.n,
      enqueuedAt: env.at,
      signal: held.abort.signal,
    };
    // Renewals and the final commit are chained so they never race.
    let chain: Promise<unknown> = Promise.resolve();
    const renewTimer = setInterval(() => {
      chain = chain.then(() => this.#renew(held)).catch(() => {});
    }, Math.max(10, Math.floor(this.leaseMs / 3)));
    let failure: unknown = null;
    let failed = false;
    try {
      // Yield first so the claim loop keeps going while handlers start; a
      // claim that landed after stop() gives the message straight back.
      await Promise.resolve();
      if (this.#stopping) throw new StopSignal();
      const handler = this.#handlerFor(env.t);
      if (!handler) {
        throw new NoHandler(`no handler for message type ${JSON.stringify(env.t)} here`);
      }
      // Deliveries that never ended (a worker killed, a lease lost) count
      // too: past the last attempt, the message is dead without running.
      if (env.n > maxAttemptsOf(env)) {
        throw new Error(
          `no attempts left: ${
            env.n - 1
          } deliveries started and none finished (worker stopped or lease lost)`,
        );
      }
      await handler(message);
    } catch (err) {
      failed = true;
      failure = err;
    }
    clearInterval(renewTimer);
    // The slot is free once the handler is done; the final commit runs
    // beside the next claims.
    held.running = false;
    RUNNING_HERE.delete(held.id);
    this.#active--;
    this.#poke();
    await chain;
    try {
      if (held.lost) return; // taken over, or released by stop()
      if (failure instanceof StopSignal) await this.#release(held);
      else if (!failed) await this.#complete(held);
      else {
        try {
          this.#onError?.(failure, message);
        } catch { /* a broken callback must not lose the message */ }
        if (failure instanceof NoHandler) {
          // Another worker may have the handler (a rolling deploy): back off.
          const nh = env.nh ?? 0;
          await this.#release(held, Math.min(NO_HANDLER_DELAY_MS * 2 ** nh, 3_600_000), nh + 1);
        } else await this.#fail(held, failure);
      }
    } catch {
      // Lost contact with the server: the lease expires and the message returns.
    } finally {
      this.#held.delete(held.id);
      this.#poke();
    }
  }

  /** Moves the entry to a new expiry; a failed check means another worker took over. */
  async #renew(held: Held): Promise<void> {
    if (held.lost) return;
    const key = this.queue.keys.schedule(Date.now() + this.leaseMs, held.id);
    const res = await this.#fromHeld(held).set(key, held.envelope).commit();
    if (res.ok) {
      held.key = key;
      held.stamp = res.versionstamp;
    } else this.#lose(held);
  }

  /** An atomic operation that proves the lease and takes the entry off the index. */
  #fromHeld(held: Held, op: Deno.AtomicOperation = this.kv.atomic()): Deno.AtomicOperation {
    return op.check({ key: held.key, versionstamp: held.stamp }).delete(held.key);
  }

  /** Adds what finishing `held` deletes, the entry itself included. */
  #addFinish(op: Deno.AtomicOperation, held: Held): Deno.AtomicOperation {
    this.#fromHeld(held, op);
    if (!held.envelope.iv) op.delete(this.queue.keys.value(held.id));
    const idem = held.envelope.ik;
    if (idem !== undefined) op.delete(this.queue.keys.idempotency(idem));
    return op;
  }

  /** Estimated bytes of one completion in a shared commit. */
  #finishBytes(held: Held): number {
    const idem = held.envelope.ik;
    return 2 * keyBytes(held.key) + 36 +
      (held.envelope.iv ? 0 : keyBytes(this.queue.keys.value(held.id)) + 8) +
      (idem === undefined ? 0 : keyBytes(this.queue.keys.idempotency(idem)) + 10);
  }

  /** Completions that finish together share one commit (fewer writes per message). */
  #complete(held: Held): Promise<void> {
    if (held.envelope.ok !== undefined) return this.#finishOrdered(held, () => {});
    const done = Promise.withResolvers<void>();
    this.#completions.push({ held, done });
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      setTimeout(() => this.#flushCompletions(), 0);
    }
    return done.promise;
  }

  #flushCompletions(): void {
    this.#flushScheduled = false;
    const pending = this.#completions;
    this.#completions = [];
    const count = this.queue.keys.count();
    const fixed = keyBytes(count) + 26;
    for (const group of pack(pending, (p) => this.#finishBytes(p.held), fixed, CHECKS_PER_COMMIT)) {
      (async () => {
        try {
          if (group.length > 1) {
            const op = this.kv.atomic();
            for (const { held } of group) this.#addFinish(op, held);
            if ((await op.sum(count, minus(group.length)).commit()).ok) {
              for (const { done } of group) done.resolve();
              return;
            }
          }
          // A lost lease in the group: commit each alone so the others still finish.
          await Promise.all(group.map(async ({ held, done }) => {
            try {
              await this.#addFinish(this.kv.atomic(), held).sum(count, minus(1)).commit();
              done.resolve();
            } catch (err) {
              done.reject(err);
            }
          }));
        } catch (err) {
          for (const { done } of group) done.reject(err);
        }
      })();
    }
  }

  /**
   * Finishes the head of an ordering key's line: schedules the next message
   * in it (no check on the line needed: appends only add places after it),
   * or, when there is none, closes the line, checked against the line's last
   * place so that an append in the meantime makes it look again.
   */
  async #finishOrdered(held: Held, extra: (op: Deno.AtomicOperation) => void): Promise<void> {
    const k = this.queue.keys;
    const orderingKey = held.envelope.ok!;
    const seq = held.envelope.seq!;
    for (let attempt = 0; attempt < ORDERED_RETRIES; attempt++) {
      // The last place first, then the next message: an append after the
      // first read fails the close's check. (In the other order an append
      // between the reads would pass it and be stranded.)
      const last = await this.kv.get<number>(k.lineLast(orderingKey));
      const after = await Array.fromAsync(this.kv.list<Waiting>({
        prefix: k.waitingIn(orderingKey),
        start: k.waiting(orderingKey, seq + 1),
      }, { limit: 1 }));
      const next = after[0] ?? null;
      const op = this.#addFinish(this.kv.atomic(), held)
        .delete(k.waiting(orderingKey, seq))
        .sum(k.count(), minus(1));
      extra(op);
      if (next !== null) {
        const w = next.value;
        op.set(k.schedule(w.due, w.id), w.envelope).set(k.signal(), w.id);
      } else {
        op.check(last).delete(k.lineLast(orderingKey)).delete(k.lineOpen(orderingKey));
      }
      if ((await op.commit()).ok) return;
      const mine = await this.kv.get(held.key);
      if (mine.versionstamp !== held.stamp) return; // the lease was taken over
    }
    throw new Error(`completion: the line of ${JSON.stringify(orderingKey)} kept changing`);
  }

  async #fail(held: Held, error: unknown): Promise<void> {
    const k = this.queue.keys;
    const env = held.envelope;
    const attempts = env.n;
    const max = maxAttemptsOf(env);
    if (attempts < max) {
      const schedule = env.b ?? DEFAULT_BACKOFF_SCHEDULE;
      const delay = schedule.length === 0
        ? 0
        : schedule[Math.min(attempts - 1, schedule.length - 1)];
      return await this.#putBack(held, Date.now() + delay);
    }
    const dead: Omit<DeadLetter, "value" | "id"> = {
      type: env.t,
      attempts: Math.min(attempts, max),
      error: errorText(error).slice(0, 2000),
      failedAt: Date.now(),
      enqueuedAt: env.at,
    };
    if (env.ok !== undefined) dead.orderingKey = env.ok;
    const bury = (withKeys: boolean) => (op: Deno.AtomicOperation) => {
      if (withKeys) { for (const key of env.u ?? []) op.set(key, held.value); }
      op.set(k.dead(held.id), dead).set(k.deadValue(held.id), held.value);
    };
    const finish = (withKeys: boolean) => {
      if (env.ok !== undefined) return this.#finishOrdered(held, bury(withKeys));
      const op = this.#addFinish(this.kv.atomic(), held).sum(k.count(), minus(1));
      bury(withKeys)(op);
      return op.commit();
    };
    try {
      await finish(true);
    } catch (err) {
      // keysIfUndelivered the client refuses must not keep the message alive
      // for ever: bury it without them, and say so.
      if (!(err instanceof TypeError) || !env.u?.length) throw err;
      dead.error = `${dead.error.slice(0, 1500)} (keysIfUndelivered not written: ${err.message})`;
      await finish(false);
    }
  }

  /**
   * Gives the message back: at once and not counted as a delivery (stop,
   * claimed after stop), or after `delayMs` with `nh` bounces (no handler).
   */
  #release(held: Held, delayMs = 0, nh?: number): Promise<void> {
    const changes: Partial<Envelope> = { n: held.envelope.n - 1 };
    if (nh !== undefined) changes.nh = nh;
    return this.#putBack(held, Date.now() + delayMs, changes);
  }

  /**
   * Moves a held message off its lease to `due` in the index, unowned, with
   * `changes` to its envelope. The signal tells idle workers elsewhere that
   * something is due earlier than they thought.
   */
  async #putBack(held: Held, due: number, changes: Partial<Envelope> = {}): Promise<void> {
    const k = this.queue.keys;
    const { o: _, ...unleased } = held.envelope;
    await this.#fromHeld(held)
      .set(k.schedule(due, held.id), { ...unleased, ...changes })
      .set(k.signal(), held.id)
      .commit();
  }
}

/** Options of {@linkcode withQueues}. */
export interface WithQueuesOptions extends KvQueueOptions, Omit<KvQueueRunnerOptions, "dispatch"> {}

/** Deno's enqueue options. */
interface DenoEnqueueOptions {
  delay?: number;
  keysIfUndelivered?: Deno.KvKey[];
  backoffSchedule?: number[];
}

const DENO_TYPE = "deno";

function denoOptions(options: DenoEnqueueOptions | undefined): EnqueueOptions {
  const o = options ?? {};
  return {
    delayMs: o.delay === undefined ? undefined : checkInteger("delay", o.delay, 0, MAX_DELAY_MS),
    keysIfUndelivered: o.keysIfUndelivered,
    backoffSchedule: o.backoffSchedule,
  };
}

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
 * import { withQueues } from "./kv_queue.ts";
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
export function withQueues(kv: Deno.Kv, options: WithQueuesOptions = {}): Deno.Kv {
  const queue = new KvQueue(kv, { ...options, prefix: options.prefix ?? ["__kvq__", DENO_TYPE] });
  const runners = new Set<KvQueueRunner>();
  const patchAtomic = (op: Deno.AtomicOperation): Deno.AtomicOperation => {
    let enqueued = 0;
    op.enqueue = (value: unknown, o?: DenoEnqueueOptions) => {
      queue.addTo(op, queue.prepare(DENO_TYPE, value, denoOptions(o)));
      enqueued++;
      return op;
    };
    const commit = op.commit.bind(op);
    op.commit = async () => {
      if (enqueued > 0) await queue.checkBacklog(enqueued);
      const res = await commit();
      if (res.ok && enqueued > 0) queue.wakeRunners();
      return res;
    };
    return op;
  };
  const wrapped: Partial<Deno.Kv> = {
    enqueue: async (value: unknown, o?: DenoEnqueueOptions) => {
      const msg = queue.prepare(DENO_TYPE, value, denoOptions(o));
      await queue.checkBacklog(1);
      return await queue.groupCommit(msg);
    },
    listenQueue: (handler: (value: unknown) => Promise<void> | void) => {
      const runner = new KvQueueRunner(kv, queue, {
        ...options,
        stopTimeoutMs: options.stopTimeoutMs ?? 0,
        dispatch: (m) => handler(m.data),
        dispatchType: DENO_TYPE,
      });
      runners.add(runner);
      return runner.run().finally(() => runners.delete(runner));
    },
    atomic: () => patchAtomic(kv.atomic()),
    close: () => {
      const stopping = [...runners].map((r) => ({ r, stopped: r.stop() }));
      const pending = stopping.filter(({ r }) => r.holding > 0);
      if (pending.length === 0) return kv.close();
      // Finished handlers' completions are still committing: close after them.
      Promise.allSettled(pending.map((p) => p.stopped)).then(() => {
        try {
          kv.close();
        } catch { /* closed by the caller meanwhile */ }
      });
    },
  };
  return new Proxy(kv, {
    get(target, prop) {
      if (Object.hasOwn(wrapped, prop)) return wrapped[prop as keyof Deno.Kv];
      if (prop === Symbol.dispose) return () => wrapped.close!();
      const v = Reflect.get(target, prop, target);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
}
