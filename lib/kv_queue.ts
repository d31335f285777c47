/**
 * Message queues on plain Deno KV atomics, for servers reached over KV Connect
 * (where `kv.enqueue()` is refused and `listenQueue` never fires). One engine,
 * two faces: {@linkcode withQueues} (Deno-compatible) and
 * {@linkcode KvQueue} / {@linkcode KvQueueRunner} (typed).
 *
 * Key layout, all under one prefix `P` (default `["__kvq__"]`):
 *
 * | key                     | value                                          |
 * | ----------------------- | ---------------------------------------------- |
 * | `[...P, "m", id]`       | message metadata (type, options, enqueue time) |
 * | `[...P, "v", id]`       | the message value itself (up to 64 KiB)        |
 * | `[...P, "r", due, id]`  | schedule index: the message may be claimed once `due` (ms) has passed |
 * | `[...P, "l", id]`       | lease: owner, `until`, delivery attempts        |
 * | `[...P, "i", key]`      | idempotency key → message id, while pending    |
 * | `[...P, "d", id]`       | dead letter metadata (error, failure time)     |
 * | `[...P, "dv", id]`      | dead letter value                              |
 * | `[...P, "sig"]`         | bumped by every enqueue; workers `watch` it    |
 * | `[...P, "count"]`       | `Deno.KvU64` number of pending messages        |
 *
 * A claim moves the schedule entry to the lease's expiry in the same atomic
 * commit that writes the lease (checked by versionstamp), so a crashed
 * worker's message becomes due again by itself when its lease runs out, and
 * workers only ever scan one ordered index.
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
/** Messages per atomic commit in batch enqueues (10 × 64 KiB < 800 KiB per write). */
export const ENQUEUE_BATCH = 10;
/** Default number of pending messages after which enqueue throws. */
export const DEFAULT_BACKLOG_LIMIT = 100_000;
/** Default lease time; renewed every third of it while a handler runs. */
export const DEFAULT_LEASE_MS = 30_000;

const U64_MINUS_ONE = 0xffffffffffffffffn;
const U64_MOD = 0x10000000000000000n;
/** One check per completion under KV Connect's 10 checks per atomic write. */
const COMPLETIONS_PER_COMMIT = 10;

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
}

/** A delivered message as handlers of the typed API see it. */
export interface QueueMessage<T = unknown> {
  id: string;
  type: string;
  data: T;
  /** 1 on first delivery. */
  attempt: number;
  enqueuedAt: number;
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
}

/** Counts returned by {@linkcode KvQueue.stats}. */
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

interface MessageMeta {
  type: string;
  enqueuedAt: number;
  maxAttempts: number;
  backoffSchedule: number[];
  keysIfUndelivered: Deno.KvKey[];
  idempotencyKey?: string;
}

interface Lease {
  owner: string | null;
  until: number;
  attempts: number;
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
  return key as Deno.KvKey;
}

let idCounter = 0;
/** Ids sort by creation time, so equal due times keep FIFO order. */
function newId(): string {
  idCounter = (idCounter + 1) % 1679616;
  return Date.now().toString(36).padStart(9, "0") + idCounter.toString(36).padStart(4, "0") +
    crypto.randomUUID().replaceAll("-", "").slice(0, 12);
}

function errorText(err: unknown): string {
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  return describe(err);
}

/** Builds every key the queue uses; one place, one layout. */
class Keys {
  constructor(readonly prefix: Deno.KvKey) {}
  message(id: string): Deno.KvKey {
    return [...this.prefix, "m", id];
  }
  value(id: string): Deno.KvKey {
    return [...this.prefix, "v", id];
  }
  schedule(due: number, id: string): Deno.KvKey {
    return [...this.prefix, "r", due, id];
  }
  scheduleRoot(): Deno.KvKey {
    return [...this.prefix, "r"];
  }
  scheduleUntil(due: number): Deno.KvKey {
    return [...this.prefix, "r", due + 1];
  }
  lease(id: string): Deno.KvKey {
    return [...this.prefix, "l", id];
  }
  leaseRoot(): Deno.KvKey {
    return [...this.prefix, "l"];
  }
  idempotency(key: string): Deno.KvKey {
    return [...this.prefix, "i", key];
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

interface Prepared {
  id: string;
  meta: MessageMeta;
  value: unknown;
  due: number;
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

  /** @internal Validates options and builds a message. */
  prepare(type: string, value: unknown, options: EnqueueOptions = {}, now = Date.now()): Prepared {
    if (typeof type !== "string") {
      throw new TypeError(`"type" must be a string: got ${describe(type)}`);
    }
    const delayMs = checkInteger("delayMs", options.delayMs ?? 0, 0, MAX_DELAY_MS);
    const schedule = options.backoffSchedule ?? DEFAULT_BACKOFF_SCHEDULE;
    if (!Array.isArray(schedule)) {
      throw new TypeError(`"backoffSchedule" must be an array: got ${describe(schedule)}`);
    }
    if (schedule.length > 100) {
      throw new RangeError(`"backoffSchedule" must have <= 100 entries: got ${schedule.length}`);
    }
    schedule.forEach((ms, i) => checkInteger(`backoffSchedule[${i}]`, ms, 0, MAX_DELAY_MS));
    const maxAttempts = checkInteger(
      "maxAttempts",
      options.maxAttempts ?? schedule.length + 1,
      1,
      1000,
    );
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
    const idem = options.idempotencyKey;
    if (idem !== undefined && (typeof idem !== "string" || idem.length === 0)) {
      throw new TypeError(`"idempotencyKey" must be a non-empty string: got ${describe(idem)}`);
    }
    const meta: MessageMeta = {
      type,
      enqueuedAt: now,
      maxAttempts,
      backoffSchedule: [...schedule],
      keysIfUndelivered: keys.map((k) => [...k]),
    };
    if (idem !== undefined) meta.idempotencyKey = idem;
    return { id: newId(), meta, value, due: now + delayMs };
  }

  /** @internal Adds the mutations of one enqueue to `op`. */
  addTo(op: Deno.AtomicOperation, msg: Prepared): Deno.AtomicOperation {
    const k = this.keys;
    op.set(k.message(msg.id), msg.meta)
      .set(k.value(msg.id), msg.value)
      .set(k.schedule(msg.due, msg.id), msg.id)
      .set(k.signal(), msg.due)
      .sum(k.count(), 1n);
    if (msg.meta.idempotencyKey !== undefined) {
      op.check({ key: k.idempotency(msg.meta.idempotencyKey), versionstamp: null })
        .set(k.idempotency(msg.meta.idempotencyKey), msg.id);
    }
    return op;
  }

  async #checkBacklog(adding: number): Promise<void> {
    // Reading the counter on every enqueue would double its cost; a short
    // cache plus local increments keeps the limit close enough.
    const now = Date.now();
    if (
      now - this.#countReadAt > 200 ||
      this.#countValue + this.#countSinceRead + adding > this.backlogLimit
    ) {
      const entry = await this.kv.get<Deno.KvU64>(this.keys.count());
      const raw = entry.value?.value ?? 0n;
      this.#countValue = raw > BigInt(Number.MAX_SAFE_INTEGER) ? 0 : Number(raw);
      this.#countReadAt = now;
      this.#countSinceRead = 0;
    }
    const pending = this.#countValue + this.#countSinceRead;
    if (pending + adding > this.backlogLimit) {
      throw new RangeError(
        `queue backlog is full: ${pending} pending messages, "backlogLimit" is ${this.backlogLimit}`,
      );
    }
    this.#countSinceRead += adding;
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
    await this.#checkBacklog(1);
    if (msg.meta.idempotencyKey === undefined) {
      await this.#groupCommit(msg);
      return msg.id;
    }
    const res = await this.addTo(this.kv.atomic(), msg).commit();
    if (res.ok) return msg.id;
    this.#countSinceRead--;
    const existing = await this.kv.get<string>(this.keys.idempotency(msg.meta.idempotencyKey!));
    if (existing.value !== null) return existing.value;
    // The pending message finished between our commit and the read: retry once.
    return await this.enqueue(type, data, options);
  }

  #pending: { msg: Prepared; done: PromiseWithResolvers<void> }[] = [];
  #flushScheduled = false;

  /**
   * Enqueues made in the same turn of the event loop share one commit
   * ({@linkcode ENQUEUE_BATCH} at most): one KV write instead of one each.
   * They carry no checks, so the group can only fail as a whole.
   */
  #groupCommit(msg: Prepared): Promise<void> {
    const done = Promise.withResolvers<void>();
    this.#pending.push({ msg, done });
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      setTimeout(() => {
        this.#flushScheduled = false;
        const pending = this.#pending;
        this.#pending = [];
        for (let i = 0; i < pending.length; i += ENQUEUE_BATCH) {
          const group = pending.slice(i, i + ENQUEUE_BATCH);
          const op = this.kv.atomic();
          for (const { msg } of group) this.addTo(op, msg);
          op.commit().then(
            (res) => {
              const err = new Error("enqueue: atomic commit failed");
              for (const { done } of group) res.ok ? done.resolve() : done.reject(err);
            },
            (err) => {
              for (const { done } of group) done.reject(err);
            },
          );
        }
      }, 0);
    }
    return done.promise;
  }

  /**
   * Enqueues many messages of `type`, {@linkcode ENQUEUE_BATCH} per atomic
   * commit, and returns their ids in order.
   */
  async enqueueMany<T = unknown>(
    type: string,
    items: readonly T[],
    options: Omit<EnqueueOptions, "idempotencyKey"> = {},
  ): Promise<string[]> {
    const ids: string[] = [];
    for (let i = 0; i < items.length; i += ENQUEUE_BATCH) {
      const batch = items.slice(i, i + ENQUEUE_BATCH).map((d) => this.prepare(type, d, options));
      await this.#checkBacklog(batch.length);
      const op = this.kv.atomic();
      for (const msg of batch) this.addTo(op, msg);
      const res = await op.commit();
      if (!res.ok) throw new Error("enqueueMany: atomic commit failed");
      ids.push(...batch.map((m) => m.id));
    }
    return ids;
  }

  /** Counts of ready, delayed, running (leased) and dead messages. */
  async stats(): Promise<QueueStats> {
    const now = Date.now();
    let running = 0;
    const runningIds = new Set<string>();
    for await (const e of this.kv.list<Lease>({ prefix: this.keys.leaseRoot() })) {
      if (e.value.owner !== null && e.value.until > now) {
        running++;
        runningIds.add(e.key[e.key.length - 1] as string);
      }
    }
    let ready = 0;
    let delayed = 0;
    for await (const e of this.kv.list({ prefix: this.keys.scheduleRoot() })) {
      const due = e.key[e.key.length - 2] as number;
      const id = e.key[e.key.length - 1] as string;
      if (runningIds.has(id)) continue;
      if (due <= now) ready++;
      else delayed++;
    }
    let dead = 0;
    for await (const _ of this.kv.list({ prefix: this.keys.deadRoot() })) dead++;
    return { ready, delayed, running, dead };
  }

  /** The dead-letter list, oldest first. */
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
      const id = e.key[e.key.length - 1] as string;
      const v = await this.kv.get(this.keys.deadValue(id));
      out.push({ ...e.value, id, value: v.value });
    }
    return out;
  }

  /** Puts a dead letter back in the queue with fresh attempts; returns the new id, or null if gone. */
  async requeueDead(id: string, options: EnqueueOptions = {}): Promise<string | null> {
    const [d, v] = await this.kv.getMany<[Omit<DeadLetter, "value" | "id">, unknown]>([
      this.keys.dead(id),
      this.keys.deadValue(id),
    ]);
    if (d.value === null) return null;
    const msg = this.prepare(d.value.type, v.value, options);
    const op = this.addTo(this.kv.atomic(), msg)
      .check(d)
      .delete(this.keys.dead(id))
      .delete(this.keys.deadValue(id));
    const res = await op.commit();
    return res.ok ? msg.id : null;
  }

  /** Deletes dead letters (all, or those in `ids`) and returns how many went. */
  async purgeDead(ids?: readonly string[]): Promise<number> {
    const targets: string[] = [];
    if (ids) targets.push(...ids);
    else {
      for await (const e of this.kv.list({ prefix: this.keys.deadRoot() })) {
        targets.push(e.key[e.key.length - 1] as string);
      }
    }
    let count = 0;
    // Two mutations per letter: stay far under the 1000-mutation limit.
    for (let i = 0; i < targets.length; i += 200) {
      const op = this.kv.atomic();
      for (const id of targets.slice(i, i + 200)) {
        op.delete(this.keys.dead(id)).delete(this.keys.deadValue(id));
      }
      await op.commit();
      count += targets.slice(i, i + 200).length;
    }
    return count;
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
  /** Called when a handler throws (the message is retried or dead-lettered). */
  onError?: (error: unknown, message: QueueMessage) => void;
  /** @internal Replaces per-type dispatch (used by `withQueues`). */
  dispatch?: (message: QueueMessage) => unknown | Promise<unknown>;
}

interface Candidate {
  id: string;
  entry: Deno.KvEntry<string>;
  leaseEntry: Deno.KvEntryMaybe<Lease>;
  meta: MessageMeta;
  value: unknown;
  lease: Lease;
}

interface Claimed {
  id: string;
  meta: MessageMeta;
  value: unknown;
  lease: Lease;
  leaseStamp: string;
}

/**
 * Runs handlers registered on a {@linkcode KvQueue}: claims due messages with
 * versionstamp-checked leases, renews them while handlers run, retries
 * failures by the message's backoff schedule and dead-letters the rest.
 * Wakes on `kv.watch` of the queue's signal key, or when the next delayed
 * message or expired lease is due.
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
  readonly #owner = crypto.randomUUID();
  readonly #inFlight = new Map<string, { claimed: Claimed; done: Promise<void> }>();
  #running: Promise<void> | null = null;
  #stopping = false;
  #wakePending = false;
  #wake: (() => void) | null = null;
  #watch: ReadableStreamDefaultReader<Deno.KvEntryMaybe<unknown>[]> | null = null;

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
  }

  /** Number of handlers running now. */
  get inFlight(): number {
    return this.#inFlight.size;
  }

  /** Processes messages until {@linkcode stop} is called; resolves once stopped. */
  run(): Promise<void> {
    if (this.#running) return this.#running;
    this.#stopping = false;
    this.#running = this.#loop().finally(() => {
      this.#running = null;
    });
    return this.#running;
  }

  /**
   * Stops taking messages, waits up to `stopTimeoutMs` for running handlers,
   * then releases the leases of those still running so other workers can
   * take them at once.
   */
  async stop(): Promise<void> {
    this.#stopping = true;
    this.#poke();
    const running = this.#running;
    const handlers = [...this.#inFlight.values()].map((f) => f.done);
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      Promise.all(handlers),
      new Promise((r) => timer = setTimeout(r, this.stopTimeoutMs)),
    ]);
    clearTimeout(timer);
    for (const { claimed } of this.#inFlight.values()) {
      await this.#release(claimed).catch(() => {});
    }
    this.#inFlight.clear();
    // The loop may sit in a KV call the client retries while the server is
    // unreachable: it stops at its next step, stop() does not wait for that.
    let loopTimer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      running,
      new Promise((r) => loopTimer = setTimeout(r, Math.max(this.stopTimeoutMs, 1_000))),
    ]);
    clearTimeout(loopTimer);
  }

  #poke(): void {
    this.#wakePending = true;
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
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

  async #loop(): Promise<void> {
    this.#startWatch();
    try {
      while (!this.#stopping) {
        this.#wakePending = false;
        let nextDue = Infinity;
        try {
          nextDue = await this.#claimBatch();
        } catch {
          // The server may be briefly unreachable; retry after a pause.
          nextDue = Date.now() + 1000;
        }
        if (this.#stopping) break;
        if (this.#wakePending) continue;
        const wait = nextDue - Date.now();
        if (wait <= 0 && this.#inFlight.size < this.concurrency) continue;
        await new Promise<void>((resolve) => {
          let timer: ReturnType<typeof setTimeout> | undefined;
          this.#wake = () => {
            clearTimeout(timer);
            resolve();
          };
          if (Number.isFinite(wait) && this.#inFlight.size < this.concurrency) {
            // Timers above 2^31 ms overflow; a long wait is re-armed anyway.
            timer = setTimeout(() => this.#poke(), Math.min(Math.max(wait, 0) + 1, 2 ** 30));
          }
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

  /** Claims what it can; returns the time the next not-yet-due entry is due. */
  async #claimBatch(): Promise<number> {
    const k = this.queue.keys;
    let skipped = false;
    while (!this.#stopping && this.#inFlight.size < this.concurrency) {
      const now = Date.now();
      const free = this.concurrency - this.#inFlight.size;
      const entries: Deno.KvEntry<string>[] = [];
      for await (
        const e of this.kv.list<string>(
          { prefix: k.scheduleRoot(), end: k.scheduleUntil(now) },
          { limit: free },
        )
      ) entries.push(e);
      // Claims run in parallel: one round trip each would cap a worker at
      // roughly 1 / (2 × RTT) messages per second.
      const outcomes = await this.#claimAll(entries, now);
      if (outcomes.includes("skip")) skipped = true;
      // A lost race moves the entry away, so listing again finds new work.
      if (!outcomes.some((o) => o !== "skip")) break;
    }
    const now = Date.now();
    // An entry due but leased by a worker whose clock runs ahead: look again soon.
    if (skipped) return now + 100;
    // The earliest entry not claimable now tells when to look again.
    for await (
      const e of this.kv.list({ prefix: k.scheduleRoot(), start: k.scheduleUntil(now) }, {
        limit: 1,
      })
    ) return e.key[e.key.length - 2] as number;
    return Infinity;
  }

  async #claimAll(
    entries: Deno.KvEntry<string>[],
    now: number,
  ): Promise<("claimed" | "conflict" | "skip")[]> {
    const reads = await Promise.all(entries.map((e) => this.#readCandidate(e, now)));
    type Outcome = "claimed" | "conflict" | "skip";
    const outcomes = reads.map((r): Outcome => typeof r === "string" ? r : "conflict");
    const candidates = reads.flatMap((r, i) => typeof r === "string" ? [] : [{ ...r, index: i }]);
    // One claim per commit: grouping five per commit (10 checks) saved writes
    // but measured 2-3x slower through the proxy, and one lost race failed
    // the whole group.
    await Promise.all(candidates.map(async (c) => {
      outcomes[c.index] = await this.#commitClaims([c]) ? "claimed" : "conflict";
    }));
    return outcomes;
  }

  async #readCandidate(
    entry: Deno.KvEntry<string>,
    now: number,
  ): Promise<"conflict" | "skip" | Candidate> {
    const k = this.queue.keys;
    const id = entry.key[entry.key.length - 1] as string;
    if (this.#inFlight.has(id)) return "skip";
    const [m, v, l] = await this.kv.getMany<[MessageMeta, unknown, Lease]>([
      k.message(id),
      k.value(id),
      k.lease(id),
    ]);
    if (m.value === null) {
      // Orphaned index entry (its message finished): remove it.
      await this.kv.atomic().check(entry).check(m).delete(entry.key).commit();
      return "conflict";
    }
    if (l.value && l.value.owner !== null && l.value.until > now) return "skip";
    const lease: Lease = {
      owner: this.#owner,
      until: now + this.leaseMs,
      attempts: (l.value?.attempts ?? 0) + 1,
    };
    return { id, entry, leaseEntry: l, meta: m.value, value: v.value, lease };
  }

  async #commitClaims(group: Candidate[]): Promise<boolean> {
    const k = this.queue.keys;
    const op = this.kv.atomic();
    for (const c of group) {
      // Both checks are needed: the lease alone could have been deleted and
      // re-created (ABA) by a claim and completion in between.
      op.check(c.entry).check(c.leaseEntry)
        .delete(c.entry.key)
        .set(k.schedule(c.lease.until, c.id), c.id)
        .set(k.lease(c.id), c.lease);
    }
    const res = await op.commit();
    if (!res.ok) return false;
    for (const c of group) {
      const claimed: Claimed = {
        id: c.id,
        meta: c.meta,
        value: c.value,
        lease: c.lease,
        leaseStamp: res.versionstamp,
      };
      const done = this.#runHandler(claimed);
      this.#inFlight.set(c.id, { claimed, done });
    }
    return true;
  }

  async #runHandler(c: Claimed): Promise<void> {
    const message: QueueMessage = {
      id: c.id,
      type: c.meta.type,
      data: c.value,
      attempt: c.lease.attempts,
      enqueuedAt: c.meta.enqueuedAt,
    };
    // Renewals and the final commit are chained so they never race.
    let chain: Promise<unknown> = Promise.resolve();
    let finished = false;
    const renewEvery = Math.max(10, Math.floor(this.leaseMs / 3));
    const renewTimer = setInterval(() => {
      chain = chain.then(() => finished ? undefined : this.#renew(c)).catch(() => {});
    }, renewEvery);
    let failure: unknown = null;
    let failed = false;
    try {
      // Yield first so the claim loop keeps going while handlers start.
      await Promise.resolve();
      if (this.#dispatch) await this.#dispatch(message);
      else {
        const handler = this.queue.handlerFor(c.meta.type);
        if (!handler) throw new Error(`no handler for message type ${JSON.stringify(c.meta.type)}`);
        await handler(c.value, message);
      }
    } catch (err) {
      failed = true;
      failure = err;
    }
    clearInterval(renewTimer);
    await chain;
    finished = true;
    try {
      if (!this.#inFlight.has(c.id) && this.#stopping) return; // released by stop()
      if (!failed) await this.#complete(c);
      else {
        try {
          this.#onError?.(failure, message);
        } catch { /* a broken callback must not lose the message */ }
        await this.#fail(c, failure);
      }
    } catch {
      // Lost contact with the server: the lease expires and the message returns.
    } finally {
      this.#inFlight.delete(c.id);
      this.#poke();
    }
  }

  async #renew(c: Claimed): Promise<void> {
    const k = this.queue.keys;
    const until = Date.now() + this.leaseMs;
    const lease: Lease = { ...c.lease, until };
    const res = await this.kv.atomic()
      .check({ key: k.lease(c.id), versionstamp: c.leaseStamp })
      .delete(k.schedule(c.lease.until, c.id))
      .set(k.schedule(until, c.id), c.id)
      .set(k.lease(c.id), lease)
      .commit();
    if (res.ok) {
      c.lease = lease;
      c.leaseStamp = res.versionstamp;
    }
  }

  #addFinish(op: Deno.AtomicOperation, c: Claimed): Deno.AtomicOperation {
    const k = this.queue.keys;
    op.check({ key: k.lease(c.id), versionstamp: c.leaseStamp })
      .delete(k.schedule(c.lease.until, c.id))
      .delete(k.lease(c.id))
      .delete(k.message(c.id))
      .delete(k.value(c.id));
    if (c.meta.idempotencyKey !== undefined) op.delete(k.idempotency(c.meta.idempotencyKey));
    return op;
  }

  #finishOp(c: Claimed): Deno.AtomicOperation {
    return this.#addFinish(this.kv.atomic(), c).sum(this.queue.keys.count(), U64_MINUS_ONE);
  }

  #completions: { c: Claimed; done: PromiseWithResolvers<void> }[] = [];
  #flushScheduled = false;

  /** Completions that finish together share one commit (fewer writes per message). */
  #complete(c: Claimed): Promise<void> {
    const done = Promise.withResolvers<void>();
    this.#completions.push({ c, done });
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
    for (let i = 0; i < pending.length; i += COMPLETIONS_PER_COMMIT) {
      const group = pending.slice(i, i + COMPLETIONS_PER_COMMIT);
      (async () => {
        try {
          if (group.length > 1) {
            const op = this.kv.atomic();
            for (const { c } of group) this.#addFinish(op, c);
            op.sum(this.queue.keys.count(), U64_MOD - BigInt(group.length));
            if ((await op.commit()).ok) {
              for (const { done } of group) done.resolve();
              return;
            }
          }
          // A lost lease in the group: commit each alone so the others still finish.
          await Promise.all(group.map(async ({ c, done }) => {
            try {
              await this.#finishOp(c).commit();
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

  async #fail(c: Claimed, error: unknown): Promise<void> {
    const k = this.queue.keys;
    const attempts = c.lease.attempts;
    if (attempts < c.meta.maxAttempts) {
      const schedule = c.meta.backoffSchedule;
      const delay = schedule.length === 0
        ? 0
        : schedule[Math.min(attempts - 1, schedule.length - 1)];
      const due = Date.now() + delay;
      await this.kv.atomic()
        .check({ key: k.lease(c.id), versionstamp: c.leaseStamp })
        .delete(k.schedule(c.lease.until, c.id))
        .set(k.schedule(due, c.id), c.id)
        .set(k.lease(c.id), { owner: null, until: 0, attempts } satisfies Lease)
        .commit();
      return;
    }
    const op = this.#finishOp(c);
    for (const key of c.meta.keysIfUndelivered) op.set(key, c.value);
    const dead: Omit<DeadLetter, "value" | "id"> = {
      type: c.meta.type,
      attempts,
      error: errorText(error).slice(0, 2000),
      failedAt: Date.now(),
      enqueuedAt: c.meta.enqueuedAt,
    };
    await op.set(k.dead(c.id), dead).set(k.deadValue(c.id), c.value).commit();
  }

  async #release(c: Claimed): Promise<void> {
    const k = this.queue.keys;
    const now = Date.now();
    // Giving back the delivery: it was not completed, so it does not count.
    await this.kv.atomic()
      .check({ key: k.lease(c.id), versionstamp: c.leaseStamp })
      .delete(k.schedule(c.lease.until, c.id))
      .set(k.schedule(now, c.id), c.id)
      .set(k.lease(c.id), { owner: null, until: 0, attempts: c.lease.attempts - 1 } satisfies Lease)
      .set(k.signal(), now)
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
 * mutations, so nothing is enqueued when a check fails. `close()` stops the
 * listeners (their `listenQueue` promises resolve) and closes `kv`.
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
  const queue = new KvQueue(kv, options);
  const runners = new Set<KvQueueRunner>();
  const enqueueOn = (op: Deno.AtomicOperation, value: unknown, o?: DenoEnqueueOptions) =>
    queue.addTo(op, queue.prepare(DENO_TYPE, value, denoOptions(o)));
  const patchAtomic = (op: Deno.AtomicOperation): Deno.AtomicOperation => {
    op.enqueue = (value: unknown, o?: DenoEnqueueOptions) => {
      enqueueOn(op, value, o);
      return op;
    };
    return op;
  };
  const wrapped: Partial<Deno.Kv> = {
    enqueue: async (value: unknown, o?: DenoEnqueueOptions) => {
      const op = kv.atomic();
      enqueueOn(op, value, o);
      return await op.commit() as Deno.KvCommitResult;
    },
    listenQueue: (handler: (value: unknown) => Promise<void> | void) => {
      const runner = new KvQueueRunner(kv, queue, {
        ...options,
        stopTimeoutMs: options.stopTimeoutMs ?? 0,
        dispatch: (m) => handler(m.data),
      });
      runners.add(runner);
      return runner.run().finally(() => runners.delete(runner));
    },
    atomic: () => patchAtomic(kv.atomic()),
    close: () => {
      for (const r of runners) r.stop().catch(() => {});
      kv.close();
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
