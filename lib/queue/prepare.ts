/**
 * Building a message from `enqueue` arguments: the typed API's option checks
 * (errors name the option and the value given), the envelope, the id, and
 * the size estimate that packs batched commits under the request budget.
 *
 * @module
 */
import {
  INLINE_VALUE_BYTES,
  MAX_DELAY_MS,
  MAX_KEYS_IF_UNDELIVERED,
  MAX_TIMER_MS,
} from "./limits.ts";
import {
  type Envelope,
  keyBytes,
  maxAttemptsOf,
  newId,
  type Prepared,
  textBytes,
  valueBytes,
} from "./envelope.ts";
import { checkInteger, checkKey, checkName, describe } from "./validate.ts";
import type { Keys } from "./keys.ts";
import type { EnqueueOptions } from "./types.ts";

/** Validates enqueue options and builds a message: its id, envelope, due time and size. */
export function prepareMessage(
  keys: Keys,
  type: string,
  value: unknown,
  options: EnqueueOptions,
  now: number,
  /** Deno's rules (the Deno face): any number of `keysIfUndelivered`. */
  denoRules: boolean,
): Prepared {
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
  const undelivered = options.keysIfUndelivered ?? [];
  if (!Array.isArray(undelivered)) {
    throw new TypeError(
      `"keysIfUndelivered" must be an array of keys: got ${describe(undelivered)}`,
    );
  }
  if (!denoRules && undelivered.length > MAX_KEYS_IF_UNDELIVERED) {
    throw new RangeError(
      `"keysIfUndelivered" must have <= ${MAX_KEYS_IF_UNDELIVERED} keys: got ${undelivered.length}`,
    );
  }
  undelivered.forEach((k, i) => checkKey(`keysIfUndelivered[${i}]`, k));
  const idempotencyKey = checkName("idempotencyKey", options.idempotencyKey);
  const orderingKey = checkName("orderingKey", options.orderingKey);
  const timeoutMs = options.timeoutMs === undefined
    ? undefined
    : checkInteger("timeoutMs", options.timeoutMs, 1, MAX_TIMER_MS);
  const envelope: Envelope = { t: type, at: now, n: 0 };
  if (schedule !== undefined) envelope.b = [...schedule];
  if (maxAttempts !== undefined && maxAttempts !== maxAttemptsOf(envelope)) {
    envelope.max = maxAttempts;
  }
  if (undelivered.length > 0) envelope.u = undelivered.map((k) => [...k]);
  if (idempotencyKey !== undefined) envelope.ik = idempotencyKey;
  if (orderingKey !== undefined) envelope.ok = orderingKey;
  if (timeoutMs !== undefined) envelope.to = timeoutMs;
  const id = newId();
  const due = now + delayMs;
  const size = valueBytes(value);
  if (size <= INLINE_VALUE_BYTES) {
    envelope.iv = 1;
    envelope.v = value;
  }
  // Protobuf adds about 14 bytes per set and 16 per check.
  const bytes = keyBytes(keys.schedule(due, id)) + valueBytes(envelope) + 14 +
    (envelope.iv ? 0 : keyBytes(keys.value(id)) + size + 14) +
    (idempotencyKey === undefined ? 0 : 2 * textBytes(idempotencyKey) + 80);
  return { id, envelope, value, due, bytes };
}
