/**
 * The end of a delivery: completions (batched), retries, dead letters and
 * hand-backs of messages a runner holds, each commit proving the lease.
 *
 * @module
 */
import { CHECKS_PER_COMMIT, DEFAULT_BACKOFF_SCHEDULE, MAX_KEYS_IF_UNDELIVERED } from "./limits.ts";
import { chunks, type Envelope, keyBytes, maxAttemptsOf, minus, pack } from "./envelope.ts";
import { errorText } from "./validate.ts";
import { addEnd, endInLine } from "./lines.ts";
import type { KvQueue } from "./producer.ts";
import type { DeadLetter } from "./types.ts";

/**
 * Under a backlog, completions wait this long to share a commit with those of
 * the next claim round; the handler's slot is free already, so only the
 * lease is held a little longer.
 */
const COMPLETION_WINDOW_MS = 10;

export /** A message this runner holds the lease of. */
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

/** Ends the deliveries of one runner. */
export class Finisher {
  #completions: { held: Held; done: PromiseWithResolvers<void> }[] = [];
  #flushScheduled = false;

  constructor(
    readonly kv: Deno.Kv,
    readonly queue: KvQueue,
    /** True while the runner has a backlog: completions then wait to share commits. */
    readonly batchWindow: () => boolean,
  ) {}

  /** An atomic operation that proves the lease and takes the entry off the index. */
  fromHeld(held: Held, op: Deno.AtomicOperation = this.kv.atomic()): Deno.AtomicOperation {
    return op.check({ key: held.key, versionstamp: held.stamp }).delete(held.key);
  }

  /** Adds what finishing `held` deletes, the entry itself included. */
  addFinish(op: Deno.AtomicOperation, held: Held): Deno.AtomicOperation {
    return addEnd(this.queue.keys, op, held);
  }

  /**
   * Estimated bytes of one completion in a shared commit: a check and a
   * delete of the entry (about 2 keys + 22 bytes of protobuf, measured
   * through a TCP tap), so that eight fit in one commit under the budget.
   */
  #finishBytes(held: Held): number {
    const idem = held.envelope.ik;
    return 2 * keyBytes(held.key) + 26 +
      (held.envelope.iv ? 0 : keyBytes(this.queue.keys.value(held.id)) + 8) +
      (idem === undefined ? 0 : keyBytes(this.queue.keys.idempotency(idem)) + 10);
  }

  /** Completions that finish together share one commit (fewer writes per message). */
  complete(held: Held): Promise<void> {
    if (held.envelope.ok !== undefined) return this.#finishOrdered(held, () => {});
    const done = Promise.withResolvers<void>();
    this.#completions.push({ held, done });
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      setTimeout(() => this.#flushCompletions(), this.batchWindow() ? COMPLETION_WINDOW_MS : 0);
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
            for (const { held } of group) this.addFinish(op, held);
            if ((await op.sum(count, minus(group.length)).commit()).ok) {
              for (const { done } of group) done.resolve();
              return;
            }
          }
          // A lost lease in the group: commit each alone so the others still finish.
          await Promise.all(group.map(async ({ held, done }) => {
            try {
              await this.addFinish(this.kv.atomic(), held).sum(count, minus(1)).commit();
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

  /** Finishes the head of an ordering key's line (see `lines.ts`). */
  async #finishOrdered(held: Held, extra: (op: Deno.AtomicOperation) => void): Promise<void> {
    await endInLine(this.kv, this.queue.keys, held, extra);
  }

  async fail(held: Held, error: unknown): Promise<void> {
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
    // `c`: counted in deadCount (letters written before the counter existed are not).
    const dead: Omit<DeadLetter, "value" | "id"> & { c: 1 } = {
      c: 1,
      type: env.t,
      attempts: Math.min(attempts, max),
      error: errorText(error).slice(0, 2000),
      failedAt: Date.now(),
      enqueuedAt: env.at,
    };
    if (env.ok !== undefined) dead.orderingKey = env.ok;
    // Deno allows any number of keysIfUndelivered: past what one commit may
    // hold, they are written first, a commit's worth at a time (sets, so a
    // second worker doing it again after a lost lease changes nothing).
    const allKeys = env.u ?? [];
    const early = allKeys.length > MAX_KEYS_IF_UNDELIVERED ? allKeys : [];
    const bury = (withKeys: boolean) => (op: Deno.AtomicOperation) => {
      if (withKeys && early.length === 0) { for (const key of allKeys) op.set(key, held.value); }
      // With no retention (withQueues, as Deno) only keysIfUndelivered get it.
      if (this.queue.deadLetterRetentionMs === 0) return;
      op.set(k.dead(held.id), dead).set(k.deadValue(held.id), held.value)
        .set(k.deadIndex(dead.failedAt, held.id), 1).sum(k.deadCount(), 1n);
    };
    const finish = (withKeys: boolean) => {
      if (env.ok !== undefined) return this.#finishOrdered(held, bury(withKeys));
      const op = this.addFinish(this.kv.atomic(), held).sum(k.count(), minus(1));
      bury(withKeys)(op);
      return op.commit();
    };
    try {
      for (const part of chunks(early, MAX_KEYS_IF_UNDELIVERED)) {
        const op = this.kv.atomic();
        for (const key of part) op.set(key, held.value);
        await op.commit();
      }
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
  release(held: Held, delayMs = 0, nh?: number): Promise<void> {
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
    await this.fromHeld(held)
      .set(k.schedule(due, held.id), { ...unleased, ...changes })
      .set(k.signal(), held.id)
      .commit();
  }
}
