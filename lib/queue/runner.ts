/**
 * {@linkcode KvQueueRunner}: claims due messages under leases, runs handlers,
 * renews, completes, retries and dead-letters.
 *
 * @module
 */
import {
  CHECKS_PER_COMMIT,
  DEAD_SWEEP_MS,
  DEFAULT_LEASE_MS,
  IDLE_RECHECK_MS,
  MAX_DELAY_MS,
  MAX_TIMER_MS,
  NO_HANDLER_DELAY_MS,
  REQUEST_BUDGET_BYTES,
} from "./limits.ts";
import { type Envelope, keyBytes, maxAttemptsOf, pack, valueBytes } from "./envelope.ts";
import { checkInteger } from "./validate.ts";
import { commitExact } from "./exact.ts";
import { sweepDeadLetters } from "./admin.ts";
import { Finisher, type Held } from "./finish.ts";
import { ClaimPacer, FILL_WAIT_MS, pick } from "./pacing.ts";
import { dueOf, idOf } from "./keys.ts";
import type { KvQueue } from "./producer.ts";
import type { QueueMessage } from "./types.ts";

/** Messages whose handlers run in this process (across runners): never claimed twice here. */
const RUNNING_HERE = new Set<string>();

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

/** Thrown in place of a handler for a message claimed after `stop()`. */
class StopSignal extends Error {}

/** Thrown in place of a handler when this worker has none for the message's type. */
class NoHandler extends Error {
  override name = "NoHandler";
}

/** Waits for `promise`, or `ms` at most. */
async function within(promise: Promise<unknown> | null, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  let done = false;
  // Timers take at most 2^31-1 ms (a longer one fires at once): wait in steps.
  const elapsed = new Promise<void>((resolve) => {
    const until = Date.now() + ms;
    const step = () => {
      const left = until - Date.now();
      if (done || left <= 0) return resolve();
      timer = setTimeout(step, Math.min(left, MAX_TIMER_MS));
    };
    step();
  });
  await Promise.race([promise, elapsed]);
  done = true;
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
 * import { KvQueue, KvQueueRunner } from "../kv_queue.ts";
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
  /** How many entries to list and take, and how many free slots to wait for. */
  readonly #pacer: ClaimPacer;
  /** The queue is paused (`KvQueue.pause()`): claim nothing. */
  #paused = false;
  #sweptAt = 0;
  #wake: (() => void) | null = null;
  #watch: ReadableStreamDefaultReader<Deno.KvEntryMaybe<unknown>[]> | null = null;
  /** Completions, retries, dead letters and releases of held messages. */
  readonly #finish: Finisher;
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
    this.#pacer = new ClaimPacer(this.concurrency);
    this.#finish = new Finisher(kv, queue, () => this.#pacer.backlog);
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
      await this.#finish.release(held).catch(() => {});
    }
    this.#held.clear();
    await within(this.#running, Math.max(this.stopTimeoutMs, 1_000));
  }

  /** Now and then, deletes dead letters past the queue's retention (not awaited). */
  #maybeSweep(): void {
    const now = Date.now();
    if (now - this.#sweptAt < DEAD_SWEEP_MS) return;
    this.#sweptAt = now;
    sweepDeadLetters(this.queue).catch(() => {/* next time */});
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
          const keys = this.queue.keys;
          const reader = this.kv.watch([keys.signal(), keys.paused()]).getReader();
          this.#watch = reader;
          while (!this.#stopping) {
            const { done, value } = await reader.read();
            if (done) break;
            this.#paused = value[1].value === true;
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
      this.#paused = await this.queue.isPaused();
    } catch { /* the watch tells soon */ }
    try {
      while (!this.#stopping) {
        this.#wakePending = false;
        let nextDue: number;
        this.#maybeSweep();
        try {
          nextDue = await this.#fill();
        } catch {
          // The server may be briefly unreachable; look again after a pause.
          nextDue = Date.now() + 1000;
        }
        if (this.#stopping) break;
        if (this.#wakePending) continue;
        const wait = Math.min(nextDue - Date.now(), IDLE_RECHECK_MS);
        const free = this.#free();
        const full = free < this.#pacer.minFill(this.#free());
        if (wait <= 0 && !full) continue;
        await new Promise<void>((resolve) => {
          let timer: ReturnType<typeof setTimeout> | undefined;
          this.#wake = () => {
            clearTimeout(timer);
            resolve();
          };
          // When full, a finishing handler pokes.
          if (!full) timer = setTimeout(() => this.#poke(), Math.max(wait, 0) + 1);
          // Waiting for more free slots under a backlog: at most FILL_WAIT_MS.
          else if (free > 0) timer = setTimeout(() => this.#poke(), FILL_WAIT_MS + 1);
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
   *
   * Runners that all took the first due entries would fight over them (one
   * wins, the others' commits fail): how many entries to list and which to
   * take is `ClaimPacer`'s (see `pacing.ts`).
   */
  async #fill(): Promise<number> {
    const root = this.queue.keys.scheduleRoot();
    while (!this.#stopping) {
      const free = this.#free();
      if (free < this.#pacer.minFill(this.#free()) || this.#paused) return Infinity;
      const now = Date.now();
      const due: Deno.KvEntry<Envelope>[] = [];
      let nextDue = Infinity;
      let listed = 0;
      let ownExpired = false;
      const limit = this.#pacer.listLimit(free);
      for await (const e of this.kv.list<Envelope>({ prefix: root }, { limit, batchSize: limit })) {
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
      if (due.length > 0) {
        this.#pacer.perCommit = Math.max(
          1,
          Math.min(CHECKS_PER_COMMIT, Math.floor(REQUEST_BUDGET_BYTES / this.#claimBytes(due[0]))),
        );
      }
      const lost = due.length > 0 && !await this.#claim(pick(due, free), now);
      if (due.length > 0) this.#pacer.claimed(lost);
      if (this.#stopping) break;
      // Another worker moved entries: look again at once (spread wider).
      if (lost) continue;
      if (ownExpired) return Math.min(nextDue, Date.now() + 250);
      if (listed === limit && nextDue === Infinity) {
        this.#pacer.backlog = true;
        continue;
      }
      this.#pacer.backlog = false;
      return nextDue;
    }
    return Infinity;
  }

  /**
   * Estimated bytes of one claim: check, delete and a set of the moved
   * envelope. Protobuf framing is about 34 bytes for the three, and the
   * owner's field adds its length plus a few (measured through a TCP tap: 216
   * bytes for a small message under the default prefix, against 221
   * estimated; so four such claims go in one commit under 1 KiB).
   */
  #claimBytes(e: Deno.KvEntry<Envelope>): number {
    return 3 * keyBytes(e.key) + valueBytes(e.value) + this.#owner.length + 40;
  }

  /** Claims `entries` in commits of up to ten; false if any of them was lost to another worker. */
  async #claim(entries: Deno.KvEntry<Envelope>[], now: number): Promise<boolean> {
    const groups = pack(entries, (e) => this.#claimBytes(e), 0, CHECKS_PER_COMMIT);
    const results = await Promise.all(groups.map((group) => this.#claimGroup(group, now)));
    return !results.includes(false);
  }

  /**
   * Claims `group` in one commit checked by the entries' versionstamps. A
   * claim that went in but was reported lost (a re-sent commit whose second
   * copy failed its checks, or a lost answer) is recognised by the moved
   * entries carrying this runner's mark and the attempt it wrote.
   */
  async #claimGroup(group: Deno.KvEntry<Envelope>[], now: number): Promise<boolean> {
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
    const read = this.#readValues(claimed.filter((c) => !c.envelope.iv).map((c) => c.id));
    const [res, values] = await Promise.all([
      commitExact(op, () => this.#ownedStamp(claimed)),
      read,
    ]);
    if (!res.ok) return false;
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

  /**
   * The versionstamp of the entries at `keys` if every one carries this
   * runner's mark with the attempt count in `envelope`: the commit that
   * wrote them was ours.
   */
  async #ownedStamp(
    moved: readonly { key: Deno.KvKey; envelope: Envelope }[],
  ): Promise<string | null> {
    const entries = await this.kv.getMany<Envelope[]>(moved.map((m) => m.key));
    const ours = entries.every((e, i) =>
      e.value?.o === this.#owner && e.value.n === moved[i].envelope.n
    );
    return ours ? entries[0].versionstamp : null;
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
      if (env.to === undefined) await handler(message);
      else await this.#withTimeout(held, env.to, handler(message));
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
      if (failure instanceof StopSignal) await this.#finish.release(held);
      else if (!failed) await this.#finish.complete(held);
      else {
        try {
          this.#onError?.(failure, message);
        } catch { /* a broken callback must not lose the message */ }
        if (failure instanceof NoHandler) {
          // Another worker may have the handler (a rolling deploy): back off.
          const nh = env.nh ?? 0;
          await this.#finish.release(
            held,
            Math.min(NO_HANDLER_DELAY_MS * 2 ** nh, 3_600_000),
            nh + 1,
          );
        } else await this.#finish.fail(held, failure);
      }
    } catch {
      // Lost contact with the server: the lease expires and the message returns.
    } finally {
      this.#held.delete(held.id);
      this.#poke();
    }
  }

  /**
   * Waits for a handler's promise for `ms` at most; past that, aborts the
   * message's signal with a `TimeoutError` and throws it (a failed attempt).
   */
  async #withTimeout(held: Held, ms: number, running: unknown): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timedOut = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const error = new DOMException(`the handler ran past timeoutMs (${ms} ms)`, "TimeoutError");
        held.abort.abort(error);
        reject(error);
      }, ms);
    });
    try {
      await Promise.race([running, timedOut]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Moves the entry to a new expiry; a failed check means another worker took over. */
  async #renew(held: Held): Promise<void> {
    if (held.lost) return;
    const key = this.queue.keys.schedule(Date.now() + this.leaseMs, held.id);
    const op = this.#finish.fromHeld(held).set(key, held.envelope);
    const res = await commitExact(op, () => this.#ownedStamp([{ key, envelope: held.envelope }]));
    if (res.ok) {
      held.key = key;
      held.stamp = res.versionstamp;
    } else this.#lose(held);
  }
}
