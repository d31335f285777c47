/**
 * The producer side: {@linkcode KvQueue} enqueues messages, keeps the backlog
 * limit and the ordering-key lines, and manages dead letters.
 *
 * @module
 */
import {
  DEFAULT_BACKLOG_LIMIT,
  DEFAULT_DEAD_LETTER_RETENTION_MS,
  ENQUEUE_BATCH,
  ENQUEUE_MANY_IN_FLIGHT,
  RECEIPT_MS,
} from "./limits.ts";
import { commitExact } from "./exact.ts";
import { keyBytes, newId, pack, type Prepared } from "./envelope.ts";
import { checkInteger, checkKey, describe } from "./validate.ts";
import { Keys } from "./keys.ts";
import { BacklogGate } from "./backlog.ts";
import { prepareMessage } from "./prepare.ts";
import { appendToLine } from "./lines.ts";
import {
  cancelMessage,
  listDeadLetters,
  listPendingMessages,
  type PendingPage,
  type PendingState,
  purgeDeadLetters,
  queueStats,
  requeueDeadLetter,
  sweepDeadLetters,
} from "./admin.ts";
import {
  type DeadLetter,
  EnqueueManyError,
  type EnqueueOptions,
  type KvQueueOptions,
  type MessageHandler,
  type QueueStats,
} from "./types.ts";

/**
 * The typed queue: enqueue messages by type, register handlers, and run them
 * with a {@linkcode KvQueueRunner}.
 *
 * @example
 * ```ts
 * import { KvQueue, KvQueueRunner } from "../kv_queue.ts";
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
  /** How long dead letters are kept (0: none are kept; `keysIfUndelivered` still get the value). */
  readonly deadLetterRetentionMs: number;
  /** @internal */
  readonly keys: Keys;
  readonly #handlers = new Map<string, MessageHandler<never>>();
  readonly #backlog: BacklogGate;
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
    this.deadLetterRetentionMs = checkInteger(
      "deadLetterRetentionMs",
      options.deadLetterRetentionMs ?? DEFAULT_DEAD_LETTER_RETENTION_MS,
      0,
      Number.MAX_SAFE_INTEGER,
    );
    this.keys = new Keys(this.prefix);
    this.#backlog = new BacklogGate(kv, this.keys.count(), this.backlogLimit);
    // The signal, the counter and the receipt's check and set.
    this.#signalBytes = keyBytes(this.keys.signal()) + keyBytes(this.keys.count()) +
      2 * keyBytes(this.keys.receipt(newId())) + 110;
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

  /** @internal Validates options and builds a message (see `prepare.ts`). */
  prepare(
    type: string,
    value: unknown,
    options: EnqueueOptions = {},
    now = Date.now(),
    /** Deno's rules (the Deno face): any number of `keysIfUndelivered`. */
    denoRules = false,
  ): Prepared {
    return prepareMessage(this.keys, type, value, options, now, denoRules);
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
   * @internal Adds the receipt of an enqueue commit whose first message is
   * `id`: a check that it does not exist yet, and the receipt itself. A
   * re-send of the commit fails that check, even after the messages completed.
   */
  addReceipt(op: Deno.AtomicOperation, id: string): Deno.AtomicOperation {
    const key = this.keys.receipt(id);
    return op.check({ key, versionstamp: null }).set(key, 1, { expireIn: RECEIPT_MS });
  }

  /** @internal Commits an enqueue that carries the receipt of `id`, exact under re-sends. */
  commitEnqueue(
    op: Pick<Deno.AtomicOperation, "commit">,
    id: string,
  ): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
    return commitExact(op, async () => (await this.kv.get(this.keys.receipt(id))).versionstamp);
  }

  /**
   * @internal Throws a `RangeError` when `adding` more messages would pass
   * the backlog limit (see `BacklogGate`).
   */
  checkBacklog(adding: number): Promise<void> {
    return this.#backlog.check(adding);
  }

  /** @internal Gives back what `checkBacklog` counted for enqueues that did not happen. */
  unaccount(n: number): void {
    this.#backlog.unaccount(n);
  }

  /**
   * Enqueues `data` as a message of `type` and returns its id. With an
   * `idempotencyKey` that is still pending, returns the pending message's id
   * and enqueues nothing.
   *
   * @example
   * ```ts
   * import { KvQueue } from "../kv_queue.ts";
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
    if (orderingKey !== undefined) return (await this.enqueueOrdered(orderingKey, [msg]))![0];
    if (idempotencyKey === undefined) {
      await this.groupCommit(msg);
      return msg.id;
    }
    let res: Deno.KvCommitResult | Deno.KvCommitError;
    try {
      res = await this.commitEnqueue(
        this.addReceipt(this.addTo(this.kv.atomic(), msg), msg.id),
        msg.id,
      );
    } catch (err) {
      this.unaccount(1);
      throw err;
    }
    if (res.ok) {
      this.wakeRunners();
      return msg.id;
    }
    this.unaccount(1);
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
      this.unaccount(group.length);
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
    op.set(this.keys.signal(), msgs[0].id).sum(this.keys.count(), BigInt(msgs.length));
    const res = await this.commitEnqueue(this.addReceipt(op, msgs[0].id), msgs[0].id);
    // Only the receipt is checked, and only a first application can pass it.
    if (!res.ok) throw new Error("enqueue: the commit's receipt existed before it was sent");
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
   * (The append itself is `appendToLine` in `lines.ts`.)
   *
   * @internal
   */
  enqueueOrdered(
    orderingKey: string,
    msgs: Prepared[],
    extra?: (op: Deno.AtomicOperation) => void,
    stillValid?: () => Promise<boolean>,
  ): Promise<string[] | null> {
    const previous = this.#lineTails.get(orderingKey) ?? Promise.resolve();
    const mine = previous.catch(() => {}).then(() =>
      appendToLine(this, orderingKey, msgs, extra, stillValid)
    );
    const tail = mine.catch(() => {});
    this.#lineTails.set(orderingKey, tail);
    tail.then(() => {
      if (this.#lineTails.get(orderingKey) === tail) this.#lineTails.delete(orderingKey);
    });
    return mine;
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
   * import { KvQueue } from "../kv_queue.ts";
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
      if (orderingKey !== undefined) await this.enqueueOrdered(orderingKey, batch);
      else {
        await this.#writeBatch(batch).catch((err) => {
          this.unaccount(batch.length);
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
   * Counts of ready, delayed, running (leased) and dead messages. The totals
   * (`pending`, `dead`) are exact counters (one read); the split of pending
   * into ready, delayed and running comes from at most
   * `STATS_SAMPLE` index entries in due order (see `admin.ts`).
   *
   * @example
   * ```ts
   * import { KvQueue } from "../kv_queue.ts";
   * const kv = await Deno.openKv(":memory:");
   * const queue = new KvQueue(kv);
   * await queue.enqueue("now", 1);
   * await queue.enqueue("later", 2, { delayMs: 60_000 });
   * const s = await queue.stats();
   * if (s.ready !== 1 || s.delayed !== 1) throw new Error(JSON.stringify(s));
   * kv.close();
   * ```
   */
  stats(): Promise<QueueStats> {
    return queueStats(this);
  }

  /**
   * The dead-letter list, oldest first.
   *
   * @example
   * ```ts
   * import { KvQueue } from "../kv_queue.ts";
   * const kv = await Deno.openKv(":memory:");
   * const queue = new KvQueue(kv);
   * const letters = await queue.listDead({ limit: 10 });
   * if (letters.length !== 0) throw new Error("a new queue has no dead letters");
   * kv.close();
   * ```
   */
  listDead(options: { limit?: number } = {}): Promise<DeadLetter[]> {
    return listDeadLetters(this, options);
  }

  /**
   * Puts a dead letter back in the queue with fresh attempts (at the end of
   * its ordering key's line, if it had one); returns the new id, or null if
   * the letter is gone (another call took it first).
   *
   * @example
   * ```ts
   * import { KvQueue } from "../kv_queue.ts";
   * const kv = await Deno.openKv(":memory:");
   * const queue = new KvQueue(kv);
   * if (await queue.requeueDead("no-such-id") !== null) throw new Error("expected null");
   * kv.close();
   * ```
   */
  requeueDead(id: string, options: EnqueueOptions = {}): Promise<string | null> {
    return requeueDeadLetter(this, id, options);
  }

  /**
   * Cancels a pending or scheduled message by id, as if it had completed;
   * false when it is not pending or is running now (see `admin.ts` for the
   * cost).
   */
  cancel(id: string): Promise<boolean> {
    return cancelMessage(this, id);
  }

  /**
   * Lists pending messages in `state` ("ready", "delayed", "running" or
   * "waiting"), `limit` (default 100) index entries per call; pass the
   * returned `cursor` for the next page.
   */
  listPending(
    state: PendingState,
    options: { limit?: number; cursor?: string } = {},
  ): Promise<PendingPage> {
    if (!["ready", "delayed", "running", "waiting"].includes(state)) {
      throw new TypeError(
        `"state" must be "ready", "delayed", "running" or "waiting": got ${describe(state)}`,
      );
    }
    const limit = checkInteger("limit", options.limit ?? 100, 1, 1000);
    return listPendingMessages(this, state, { limit, cursor: options.cursor });
  }

  /**
   * Pauses the queue for every runner on it, in any process: none claims
   * another message until {@linkcode resume}; running handlers go on. Stored
   * in KV; runners hear of it through their watch, within about a second.
   */
  async pause(): Promise<void> {
    await this.kv.set(this.keys.paused(), true);
  }

  /** Undoes {@linkcode pause}. */
  async resume(): Promise<void> {
    await this.kv.delete(this.keys.paused());
  }

  /** Whether the queue is paused. */
  async isPaused(): Promise<boolean> {
    return (await this.kv.get(this.keys.paused())).value === true;
  }

  /**
   * Deletes dead letters (all, or those in `ids`) and returns how many went.
   *
   * @example
   * ```ts
   * import { KvQueue } from "../kv_queue.ts";
   * const kv = await Deno.openKv(":memory:");
   * const queue = new KvQueue(kv);
   * if (await queue.purgeDead() !== 0) throw new Error("nothing to purge");
   * kv.close();
   * ```
   */
  purgeDead(ids?: readonly string[]): Promise<number> {
    return purgeDeadLetters(this, ids);
  }

  /**
   * Deletes up to `limit` dead letters older than `deadLetterRetentionMs`,
   * oldest first, and returns how many went. Runners do this by themselves
   * about once a minute.
   */
  sweepDead(limit = 100): Promise<number> {
    return sweepDeadLetters(this, limit);
  }
}
