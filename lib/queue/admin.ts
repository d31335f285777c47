/**
 * Reading and tidying a queue from outside the hot path: stats from the exact
 * counters plus a bounded read of the index, and dead letters (purge and the
 * retention sweep), each commit checked so that a re-sent one changes nothing.
 *
 * @module
 */
import { CHECKS_PER_COMMIT, STATS_SAMPLE } from "./limits.ts";
import { chunks, type Envelope, minus } from "./envelope.ts";
import { dueOf, idOf } from "./keys.ts";
import type { KvQueue } from "./producer.ts";
import type { DeadLetter, QueueStats } from "./types.ts";

type Letter = Omit<DeadLetter, "value" | "id">;

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
    letters.forEach((d, i) => {
      if (d.value === null) return;
      n++;
      op.check(d).delete(d.key).delete(k.deadValue(part[i]))
        .delete(k.deadIndex(d.value.failedAt, part[i]));
    });
    if (n === 0) return;
    // A letter taken meanwhile (requeued, swept) fails the check: try the rest alone.
    if ((await op.sum(k.deadCount(), minus(n)).commit()).ok) removed += n;
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
