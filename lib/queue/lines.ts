/**
 * Ending a message's stay in the index, shared by completions, dead letters
 * and cancellation: what an ended message deletes, and how the head of an
 * ordering key's line hands over to the next message or closes the line.
 *
 * @module
 */
import { ORDERED_RETRIES } from "./limits.ts";
import { type Envelope, minus, type Waiting } from "./envelope.ts";
import type { Keys } from "./keys.ts";
import type { Prepared } from "./envelope.ts";
import type { KvQueue } from "./producer.ts";

/** A message's index entry as last seen: its key, versionstamp and envelope. */
export interface Placed {
  id: string;
  key: Deno.KvKey;
  stamp: string;
  envelope: Envelope;
}

/**
 * Adds to `op` what ending `m` takes: a check that its entry is still as seen
 * (the lease token while leased), the entry, its value and its idempotency key.
 */
export function addEnd(keys: Keys, op: Deno.AtomicOperation, m: Placed): Deno.AtomicOperation {
  op.check({ key: m.key, versionstamp: m.stamp }).delete(m.key);
  if (!m.envelope.iv) op.delete(keys.value(m.id));
  const idem = m.envelope.ik;
  if (idem !== undefined) op.delete(keys.idempotency(idem));
  return op;
}

/**
 * Ends the head `m` of an ordering key's line: schedules the next message in
 * it (no check on the line needed: appends only add places after it), or,
 * when there is none, closes the line, checked against the line's last place
 * so that an append in the meantime makes it look again. `extra` adds to the
 * same commit. Returns false when `m`'s entry changed (a lease taken over).
 */
export async function endInLine(
  kv: Deno.Kv,
  keys: Keys,
  m: Placed,
  extra: (op: Deno.AtomicOperation) => void,
): Promise<boolean> {
  const orderingKey = m.envelope.ok!;
  const seq = m.envelope.seq!;
  for (let attempt = 0; attempt < ORDERED_RETRIES; attempt++) {
    // The last place first, then the next message: an append after the
    // first read fails the close's check. (In the other order an append
    // between the reads would pass it and be stranded.)
    const last = await kv.get<number>(keys.lineLast(orderingKey));
    const after = await Array.fromAsync(kv.list<Waiting>({
      prefix: keys.waitingIn(orderingKey),
      start: keys.waiting(orderingKey, seq + 1),
    }, { limit: 1 }));
    const next = after[0] ?? null;
    const op = addEnd(keys, kv.atomic(), m)
      .delete(keys.waiting(orderingKey, seq))
      .sum(keys.count(), minus(1));
    extra(op);
    if (next !== null) {
      const w = next.value;
      op.set(keys.schedule(w.due, w.id), w.envelope).set(keys.signal(), w.id);
    } else {
      op.check(last).delete(keys.lineLast(orderingKey)).delete(keys.lineOpen(orderingKey));
    }
    if ((await op.commit()).ok) return true;
    const mine = await kv.get(m.key);
    if (mine.versionstamp !== m.stamp) return false;
  }
  throw new Error(`the line of ${JSON.stringify(orderingKey)} kept changing`);
}

/**
 * Appends `msgs` to the line of `orderingKey` (see `KvQueue.enqueueOrdered`):
 * checked against the line's last place and whether it is open, with the
 * enqueue receipt, so a re-sent append changes nothing.
 */
export async function appendToLine(
  queue: KvQueue,
  orderingKey: string,
  msgs: Prepared[],
  extra?: (op: Deno.AtomicOperation) => void,
  stillValid?: () => Promise<boolean>,
): Promise<string[] | null> {
  const k = queue.keys;
  const idem = msgs.length === 1 ? msgs[0].envelope.ik : undefined;
  for (let attempt = 0; attempt < ORDERED_RETRIES; attempt++) {
    const [open, last] = await queue.kv.getMany<[number, number]>([
      k.lineOpen(orderingKey),
      k.lineLast(orderingKey),
    ]);
    const op = queue.kv.atomic().check(open).check(last);
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
    queue.addReceipt(op, msgs[0].id);
    if ((await queue.commitEnqueue(op, msgs[0].id)).ok) {
      queue.wakeRunners();
      return msgs.map((m) => m.id);
    }
    if (idem !== undefined) {
      const existing = await queue.kv.get<string>(k.idempotency(idem));
      if (existing.value !== null) {
        queue.unaccount(1);
        return [existing.value];
      }
    }
    if (stillValid && !await stillValid()) {
      queue.unaccount(msgs.length);
      return null;
    }
    // Another process appended or closed the line: try again a moment later.
    await new Promise((r) => setTimeout(r, Math.random() * Math.min(100, 2 ** attempt)));
  }
  queue.unaccount(msgs.length);
  throw new Error(
    `enqueue: the line of ordering key ${JSON.stringify(orderingKey)} kept changing; ` +
      `gave up after ${ORDERED_RETRIES} attempts`,
  );
}
