/**
 * Deno's own checks of `enqueue` options, reproduced for `withQueues`: the
 * same inputs pass, and the same inputs fail with the same error type and
 * message (Deno's `ext/kv/01_db.ts` checks first, then serde_v8 converts the
 * values for the op; both are mirrored here, quirks included).
 *
 * @module
 */
import { MAX_DELAY_MS } from "./limits.ts";
import type { EnqueueOptions } from "./types.ts";

/** Deno's enqueue options. */
export interface DenoEnqueueOptions {
  delay?: number;
  keysIfUndelivered?: Deno.KvKey[];
  backoffSchedule?: number[];
}

/** Deno's `maxQueueBackoffIntervals`. */
export const DENO_MAX_BACKOFF_INTERVALS = 5;
/** Deno's `maxQueueBackoffInterval`: one hour. */
export const DENO_MAX_BACKOFF_INTERVAL_MS = 60 * 60 * 1000;

/** The type name serde_v8 puts in its "invalid type" errors. */
function serdeType(v: unknown): string {
  if (v === null) return "null";
  if (Array.isArray(v)) return "array";
  switch (typeof v) {
    case "undefined":
    case "string":
    case "bigint":
      return typeof v;
    case "boolean":
      return "Boolean";
    case "number":
      return "Number";
    default:
      return "unknown";
  }
}

function serdeError(expected: string, v: unknown): TypeError {
  return new TypeError(`serde_v8 error: invalid type; expected: ${expected}, got: ${serdeType(v)}`);
}

/** serde_v8's integer conversion: numbers (fractions included) and bigints. */
function integer(v: unknown): number {
  if (typeof v === "number") return Math.round(v);
  if (typeof v === "bigint") return Number(v);
  throw serdeError("integer", v);
}

function array(v: unknown): unknown[] {
  if (!Array.isArray(v)) throw serdeError("array", v);
  return v;
}

function keyPart(v: unknown): void {
  const t = typeof v;
  if (
    t !== "string" && t !== "number" && t !== "bigint" && t !== "boolean" &&
    !ArrayBuffer.isView(v)
  ) {
    throw new TypeError("expected string, number, bigint, ArrayBufferView, boolean");
  }
}

/**
 * Checks Deno enqueue options as Deno does and turns them into the engine's.
 * Comparisons use JavaScript's loose rules on purpose, as Deno's do (`"-1"`
 * is a negative delay there too).
 */
export function denoOptions(options: DenoEnqueueOptions | undefined): EnqueueOptions {
  const o = (options ?? {}) as Record<string, unknown>;
  const delay = o.delay as number;
  if (delay !== undefined) {
    if (delay < 0) throw new TypeError(`Delay must be >= 0: received ${delay}`);
    if (delay > MAX_DELAY_MS) {
      throw new TypeError(`Delay cannot be greater than 30 days: received ${delay}`);
    }
    if (Number.isNaN(delay)) throw new TypeError("Delay cannot be NaN");
  }
  const schedule = o.backoffSchedule as number[];
  if (schedule !== undefined) {
    if (schedule.length > DENO_MAX_BACKOFF_INTERVALS) {
      throw new TypeError(
        `Invalid backoffSchedule, max ${DENO_MAX_BACKOFF_INTERVALS} intervals allowed`,
      );
    }
    for (let i = 0; i < schedule.length; ++i) {
      const interval = schedule[i];
      if (
        interval < 0 || interval > DENO_MAX_BACKOFF_INTERVAL_MS || Number.isNaN(interval)
      ) {
        throw new TypeError(`Invalid backoffSchedule, interval at index ${i} is invalid`);
      }
    }
  }
  // What the op's conversion then refuses, in the order of its arguments.
  const delayMs = integer(delay ?? 0);
  const keys = array(o.keysIfUndelivered ?? []).map((k) => {
    const key = array(k);
    key.forEach(keyPart);
    return key as Deno.KvKey;
  });
  const backoff = schedule === undefined || schedule === null
    ? undefined
    : array(schedule).map(integer);
  return {
    delayMs,
    keysIfUndelivered: keys.length > 0 ? keys : undefined,
    backoffSchedule: backoff,
  };
}
