/**
 * Named limits and defaults of the queue engine, each with where it comes from.
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
/**
 * Most messages per atomic commit in batch enqueues; small ones are packed
 * under 1 KiB per commit, and one over that goes alone.
 */
export const ENQUEUE_BATCH = 10;
/** Default number of pending messages after which enqueue throws. */
export const DEFAULT_BACKLOG_LIMIT = 100_000;
/** Default lease time; renewed every third of it while a handler runs. */
export const DEFAULT_LEASE_MS = 30_000;

/** denokv allows 10 checks per atomic write: one per claimed or completed message. */
export const CHECKS_PER_COMMIT = 10;
/**
 * Deno's KV client (hyper's HTTP/2 over a socket with Nagle's algorithm on,
 * without vectored writes) sends a request body over 1 KiB in a second TCP
 * write, which then waits for the server's ACK of the first: about 40 ms
 * against a Linux server's delayed ACK. Batched commits stay under this many
 * estimated bytes so that each goes out in one write. The estimates run a
 * few percent over the real protobuf size (measured through a TCP tap; a
 * test checks every commit stays under 1 KiB), so 1,000 leaves room.
 */
export const REQUEST_BUDGET_BYTES = 1000;
export const U64_MOD = 0x10000000000000000n;
/**
 * Values up to this many (estimated) bytes ride in the envelope: no `"v"`
 * entry to write, read or delete, at the price of carrying them in every
 * claim and renewal.
 */
export const INLINE_VALUE_BYTES = 128;
/** Commits `enqueueMany` keeps in flight at once. */
export const ENQUEUE_MANY_IN_FLIGHT = 4;
/** Commit attempts before an enqueue or completion on a busy ordering key gives up. */
export const ORDERED_RETRIES = 50;
/** denokv refuses keys over 2 KiB. */
export const MAX_KEY_BYTES = 2048;
/** Idempotency and ordering keys end up inside KV keys: keep them well under that. */
export const MAX_NAME_BYTES = 1024;
/**
 * An idle runner looks at the queue at least this often, in case its watch
 * stream died without an error (a half-open connection).
 */
export const IDLE_RECHECK_MS = 60_000;
/**
 * A message no handler here can take goes back for another worker, first
 * after this many ms, doubling each time up to an hour; it does not count
 * as a delivery.
 */
export const NO_HANDLER_DELAY_MS = 5_000;
/**
 * How long an enqueue's receipt is kept: a re-send of that commit arriving
 * later than this (after its message completed) would enqueue it again. The
 * client re-sends while the server is unreachable, so a day covers any outage
 * the client itself survives in practice.
 */
export const RECEIPT_MS = 24 * 60 * 60 * 1000;
/** Dead letters are kept this long by default (the typed API and Fedify's queue): three days. */
export const DEFAULT_DEAD_LETTER_RETENTION_MS = 3 * 24 * 60 * 60 * 1000;
/** Index entries `stats()` reads at most to split pending into ready, delayed and running. */
export const STATS_SAMPLE = 1000;
/** A runner sweeps expired dead letters at most this often. */
export const DEAD_SWEEP_MS = 60_000;
/** The longest delay `setTimeout` takes (a signed 32-bit count of ms); longer ones fire at once. */
export const MAX_TIMER_MS = 2 ** 31 - 1;
