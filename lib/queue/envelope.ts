/**
 * What a message is in storage (its envelope), how ids are made, and the size
 * estimates that keep batched commits under the request budget.
 *
 * @module
 */
import { DEFAULT_BACKOFF_SCHEDULE, REQUEST_BUDGET_BYTES, U64_MOD } from "./limits.ts";

/**
 * What a message's `"r"` entry holds. It is rewritten by every claim and
 * renewal and rides in batched commits, so names are short and defaults are
 * left out.
 */
export interface Envelope {
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
  /** `timeoutMs`: a delivery running longer fails. */
  to?: number;
}

/** The attempts a message gets. */
export function maxAttemptsOf(env: Envelope): number {
  return env.max ?? (env.b ?? DEFAULT_BACKOFF_SCHEDULE).length + 1;
}

/** An `"oq"` entry: a message waiting for its turn. */
export interface Waiting {
  id: string;
  due: number;
  envelope: Envelope;
}

export interface Prepared {
  id: string;
  envelope: Envelope;
  value: unknown;
  due: number;
  /** Estimated size of its mutations in a commit. */
  bytes: number;
}

let idCounter = 0;
/**
 * Ids sort by creation time, so equal due times keep FIFO order; they are
 * short because every key of a message carries one (three times in a claim):
 * 9 base-36 digits of ms, a 3-digit counter (46,656 ids per ms in a process)
 * and 5 random hex digits against other processes in the same ms.
 */
export function newId(): string {
  idCounter = (idCounter + 1) % 46656;
  return Date.now().toString(36).padStart(9, "0") + idCounter.toString(36).padStart(3, "0") +
    crypto.randomUUID().slice(0, 5);
}

export function chunks<T>(items: readonly T[], size: number): T[][] {
  const out: T[][] = [];
  for (let i = 0; i < items.length; i += size) out.push(items.slice(i, i + size));
  return out;
}

/** Splits `items` into runs whose `bytes` (plus `fixed` per run) fit the request budget. */
export function pack<T>(
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
export function textBytes(s: string): number {
  // deno-lint-ignore no-control-regex
  return /^[\x00-\x7f]*$/.test(s) ? s.length : s.length * 3;
}

/** An upper estimate of a key's size in denokv's key encoding. */
export function keyBytes(key: Deno.KvKey): number {
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
export function valueBytes(value: unknown, cap = REQUEST_BUDGET_BYTES): number {
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
export function minus(n: number): bigint {
  return U64_MOD - BigInt(n);
}
