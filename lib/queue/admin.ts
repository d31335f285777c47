/**
 * Reading and tidying a queue from outside the hot path: stats from the exact
 * counters plus a bounded read of the index, and dead letters (purge and the
 * retention sweep), each commit checked so that a re-sent one changes nothing.
 *
 * @module
 */
import { CHECKS_PER_COMMIT, STATS_SAMPLE } from "./limits.ts";
import { checkInteger } from "./validate.ts";
import { chunks, type Envelope, minus, type Waiting } from "./envelope.ts";
import { addEnd, endInLine } from "./lines.ts";
import { dueOf, idOf } from "./keys.ts";
import type { KvQueue } from "./producer.ts";
import type { DeadLetter, EnqueueOptions, QueueStats } from "./types.ts";

/** A dead letter as stored; `c` when it is counted in `deadCount` (older ones are not). */
type Letter = Omit<DeadLetter, "value" | "id"> & { c?: 1 };

function counter(entry: Deno.KvEntryMaybe<unknown>): number {
  const v = entry.value;
  if (!(v instanceof Deno.KvU64)) return 0;
  // A counter below zero would wrap to a huge number: report 0 instead.
  return v.value > BigInt(Number.MAX_SAFE_INTEGER) ? 0 : Number(v.value);
}

/**
 * Pending and dead come from their counters, exact. The split of pending
 * comes from the first `STATS_SAMPLE` entries of the due-time index: entries
 * due by now are ready; later ones are running when leased, else delayed.
 * Messages waiting behind another of their ordering key are not in the index
 * and count as delayed. When the index has more entries than the sample, the
 * rest counts as ready if the last entry read was due, else as delayed. So a
 * call costs one `getMany` and one list of at
 * most `STATS_SAMPLE` small entries, whatever the backlog.
 */
export async function queueStats(queue: KvQueue): Promise<QueueStats> {
  const k = queue.keys;
  const now = Date.now();
  const [pendingEntry, deadEntry] = await queue.kv.getMany([k.count(), k.deadCount()]);
  const pending = counter(pendingEntry);
  const dead = counter(deadEntry);
  let ready = 0;
  let delayed = 0;
  let running = 0;
  let read = 0;
  let lastDue = -Infinity;
  for await (
    const e of queue.kv.list<Envelope>({ prefix: k.scheduleRoot() }, {
      limit: STATS_SAMPLE,
      batchSize: STATS_SAMPLE,
    })
  ) {
    read++;
    const due = dueOf(e.key);
    lastDue = due;
    if (due <= now) ready++;
    else if (e.value.o !== undefined) running++;
    else delayed++;
  }
  // The counter moves while the list runs: never report negative remainders.
  const rest = Math.max(0, pending - read);
  if (read === STATS_SAMPLE && lastDue <= now) ready += rest;
  else delayed += rest;
  return { ready, delayed, running, dead };
}

/** Deletes dead letters (all, or those in `ids`), checked and counted; returns how many went. */
export async function purgeDeadLetters(queue: KvQueue, ids?: readonly string[]): Promise<number> {
  const k = queue.keys;
  let removed = 0;
  const purge = async (part: readonly string[]) => {
    const letters = await queue.kv.getMany<Letter[]>(part.map((id) => k.dead(id)));
    const op = queue.kv.atomic();
    let n = 0;
    let counted = 0;
    letters.forEach((d, i) => {
      if (d.value === null) return;
      n++;
      if (d.value.c === 1) counted++;
      op.check(d).delete(d.key).delete(k.deadValue(part[i]))
        .delete(k.deadIndex(d.value.failedAt, part[i]));
    });
    if (n === 0) return;
    // A letter taken meanwhile (requeued, swept) fails the check: try the rest alone.
    if (counted > 0) op.sum(k.deadCount(), minus(counted));
    if ((await op.commit()).ok) removed += n;
    else if (part.length > 1) { for (const id of part) await purge([id]); }
  };
  if (ids) {
    for (const part of chunks(ids, CHECKS_PER_COMMIT)) await purge(part);
    return removed;
  }
  while (true) {
    const page = await Array.fromAsync(
      queue.kv.list({ prefix: k.deadRoot() }, { limit: 100 }),
      (e) => idOf(e.key),
    );
    if (page.length === 0) return removed;
    const before = removed;
    for (const part of chunks(page, CHECKS_PER_COMMIT)) await purge(part);
    if (removed === before) return removed;
  }
}

/**
 * Deletes dead letters that failed more than the queue's retention ago, at
 * most `limit` per call, oldest first; returns how many went. Runners call it
 * now and then; anyone may.
 */
export async function sweepDeadLetters(queue: KvQueue, limit = 100): Promise<number> {
  const k = queue.keys;
  if (queue.deadLetterRetentionMs === 0) return 0;
  const cutoff = Date.now() - queue.deadLetterRetentionMs;
  const expired = await Array.fromAsync(queue.kv.list({
    prefix: k.deadIndexRoot(),
    end: [...k.deadIndexRoot(), cutoff],
  }, { limit }));
  let removed = 0;
  for (const part of chunks(expired, CHECKS_PER_COMMIT)) {
    const op = queue.kv.atomic();
    for (const e of part) {
      const id = idOf(e.key);
      op.check(e).delete(e.key).delete(k.dead(id)).delete(k.deadValue(id));
    }
    if ((await op.sum(k.deadCount(), minus(part.length)).commit()).ok) removed += part.length;
  }
  return removed;
}

/** The time an id was made (its first nine base-36 digits), or 0 if it is not one of ours. */
function idTime(id: string): number {
  const t = parseInt(id.slice(0, 9), 36);
  return Number.isFinite(t) ? t : 0;
}

/**
 * Cancels a pending or scheduled message by id: it is removed as if it had
 * completed (a line's next message moves up). Returns false when there is no
 * such pending message or it is running now (its lease is live). The index is
 * searched from the message's enqueue time on (its due time is never
 * earlier), then the ordering-key lines: a cost that grows with the backlog,
 * fine for an operator's action, not for a hot path.
 */
export async function cancelMessage(queue: KvQueue, id: string): Promise<boolean> {
  const { kv, keys: k } = queue;
  const root = k.scheduleRoot();
  for await (
    const e of kv.list<Envelope>({ prefix: root, start: [...root, idTime(id)] }, {
      batchSize: 500,
    })
  ) {
    if (idOf(e.key) !== id) continue;
    if (e.value.o !== undefined && dueOf(e.key) > Date.now()) return false;
    const placed = { id, key: e.key, stamp: e.versionstamp, envelope: e.value };
    if (e.value.ok !== undefined) return await endInLine(kv, k, placed, () => {});
    return (await addEnd(k, kv.atomic(), placed).sum(k.count(), minus(1)).commit()).ok;
  }
  for await (const e of kv.list<Waiting>({ prefix: k.waitingRoot() }, { batchSize: 500 })) {
    const w = e.value;
    if (w.id !== id) continue;
    const op = kv.atomic().check(e)
      // Moved up to head meanwhile: then it is in the index, and this fails.
      .check({ key: k.schedule(w.due, w.id), versionstamp: null })
      .delete(e.key).sum(k.count(), minus(1));
    if (!w.envelope.iv) op.delete(k.value(id));
    if (w.envelope.ik !== undefined) op.delete(k.idempotency(w.envelope.ik));
    return (await op.commit()).ok;
  }
  return false;
}

/** What {@linkcode listPendingMessages} says of each message. */
export interface PendingMessage {
  id: string;
  type: string;
  /** When it may next be taken; for a running one, when its lease ends. */
  due: number;
  /** Deliveries started so far. */
  attempts: number;
  enqueuedAt: number;
  orderingKey?: string;
}

/** States {@linkcode listPendingMessages} lists by. */
export type PendingState = "ready" | "delayed" | "running" | "waiting";

/** A page of {@linkcode listPendingMessages}; `cursor` is set when there may be more. */
export interface PendingPage {
  messages: PendingMessage[];
  cursor?: string;
}

const encodeCursor = (parts: unknown[]) => btoa(JSON.stringify(parts));

function decodeCursor(cursor: string): [number | string, number | string] {
  try {
    const parts = JSON.parse(atob(cursor));
    if (Array.isArray(parts) && parts.length === 2) return parts as [number, string];
  } catch { /* reported below */ }
  throw new TypeError(`"cursor" is not a cursor of listPending: got ${JSON.stringify(cursor)}`);
}

/**
 * Lists pending messages in one state, `limit` index entries scanned per call
 * (so a page may hold fewer messages than `limit` and still have a `cursor`).
 * `ready`: due now (expired leases included); `delayed`: due later, not
 * leased; `running`: leased; `waiting`: every message of the ordering-key
 * lines, by key and place (the head of a line is also in another state).
 */
export async function listPendingMessages(
  queue: KvQueue,
  state: PendingState,
  options: { limit?: number; cursor?: string } = {},
): Promise<PendingPage> {
  const { kv, keys: k } = queue;
  const limit = options.limit ?? 100;
  const after = options.cursor === undefined ? undefined : decodeCursor(options.cursor);
  const messages: PendingMessage[] = [];
  const describe = (id: string, due: number, env: Envelope): PendingMessage => {
    const m: PendingMessage = { id, type: env.t, due, attempts: env.n, enqueuedAt: env.at };
    if (env.ok !== undefined) m.orderingKey = env.ok;
    return m;
  };
  let last: [number | string, number | string] | undefined;
  let scanned = 0;
  if (state === "waiting") {
    const root = k.waitingRoot();
    // Just after the cursor's place: places are integers.
    const start = after ? [...root, after[0], (after[1] as number) + 0.5] : undefined;
    for await (
      const e of kv.list<Waiting>(start ? { prefix: root, start } : { prefix: root }, { limit })
    ) {
      scanned++;
      last = [e.key[e.key.length - 2] as string, e.key[e.key.length - 1] as number];
      messages.push(describe(e.value.id, e.value.due, e.value.envelope));
    }
  } else {
    const root = k.scheduleRoot();
    const now = Date.now();
    const boundary = [...root, now + 1];
    const from = after ? [...root, after[0], `${after[1]}\u0000`] : undefined;
    const selector: Deno.KvListSelector = state === "ready"
      ? { start: from ?? root, end: boundary }
      : { prefix: root, start: from && (after![0] as number) > now ? from : boundary };
    for await (const e of kv.list<Envelope>(selector, { limit })) {
      scanned++;
      const due = dueOf(e.key);
      last = [due, idOf(e.key)];
      const leased = e.value.o !== undefined;
      if (state === "ready" || (state === "running") === leased) {
        messages.push(describe(idOf(e.key), due, e.value));
      }
    }
  }
  return scanned === limit && last ? { messages, cursor: encodeCursor(last) } : { messages };
}

/** The dead-letter list, oldest first (see `KvQueue.listDead()`). */
export async function listDeadLetters(
  queue: KvQueue,
  options: { limit?: number } = {},
): Promise<DeadLetter[]> {
  const out: DeadLetter[] = [];
  const limit = options.limit === undefined
    ? undefined
    : checkInteger("limit", options.limit, 1, 1e9);
  for await (
    const e of queue.kv.list<Letter>({ prefix: queue.keys.deadRoot() }, {
      limit,
    })
  ) {
    const id = idOf(e.key);
    const v = await queue.kv.get(queue.keys.deadValue(id));
    const { c: _, ...letter } = e.value;
    out.push({ ...letter, id, value: v.value });
  }
  return out;
}
/** Puts a dead letter back with fresh attempts (see `KvQueue.requeueDead()`). */
export async function requeueDeadLetter(
  queue: KvQueue,
  id: string,
  options: EnqueueOptions = {},
): Promise<string | null> {
  const k = queue.keys;
  const [d, v] = await queue.kv.getMany<[Letter, unknown]>([k.dead(id), k.deadValue(id)]);
  if (d.value === null) return null;
  const msg = queue.prepare(d.value.type, v.value, {
    orderingKey: d.value.orderingKey,
    ...options,
  });
  await queue.checkBacklog(1);
  const takeLetter = (op: Deno.AtomicOperation) => {
    op.check(d).delete(k.dead(id)).delete(k.deadValue(id))
      .delete(k.deadIndex(d.value!.failedAt, id));
    return d.value!.c === 1 ? op.sum(k.deadCount(), minus(1)) : op;
  };
  const orderingKey = msg.envelope.ok;
  if (orderingKey !== undefined) {
    const ids = await queue.enqueueOrdered(
      orderingKey,
      [msg],
      takeLetter,
      async () => (await queue.kv.get(k.dead(id))).versionstamp === d.versionstamp,
    );
    return ids === null ? null : ids[0];
  }
  const op = takeLetter(queue.addReceipt(queue.addTo(queue.kv.atomic(), msg), msg.id));
  const res = await queue.commitEnqueue(op, msg.id);
  if (!res.ok) {
    queue.unaccount(1);
    return null;
  }
  queue.wakeRunners();
  return msg.id;
}
