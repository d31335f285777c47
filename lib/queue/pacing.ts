/**
 * How a runner paces its claims: how many due entries it lists and which it
 * takes (spread out after lost races, so runners in many processes do not all
 * fight over the first due entries), and how many free slots it waits for
 * under a backlog (rounds of full claim commits). Measured with
 * tests/bench/queue_bench.ts (1, 2, 4 and 8 worker processes).
 *
 * @module
 */

/**
 * Under a backlog, a runner claims when this many claim commits' worth of
 * slots are free: rounds of whole, full commits (and completions grouped
 * alike), which keeps commits per message flat as runners get smaller.
 */
const FILL_COMMITS = 2;
/** How long a runner under a backlog waits for that many free slots before taking fewer. */
export const FILL_WAIT_MS = 25;
/** Most entries one claim round lists (spread times free slots). */
const MAX_LIST = 200;
/** Largest claim spread: wider lists cost more reads than the races they avoid (measured). */
const MAX_SPREAD = 4;
/** Clean claim rounds after which a runner narrows its spread by one. */
const SPREAD_DECAY_AFTER = 8;

/**
 * `n` of `entries`, every `entries.length / n`-th from a random offset: the
 * whole list when it is short enough, else an even spread over it.
 */
export function pick<T>(entries: T[], n: number): T[] {
  if (entries.length <= n) return entries;
  const step = entries.length / n;
  const offset = Math.random() * step;
  return Array.from({ length: n }, (_, i) => entries[Math.floor(offset + i * step)]);
}

/**
 * The pacing state of one runner. A runner that lost a claim race spreads
 * out: it lists `spread` times as many due entries as it has free slots and
 * claims an even sample from a random offset. Spread doubles on each lost
 * race (up to `MAX_SPREAD`) and narrows after a run of clean rounds; a
 * runner alone stays at 1 and takes entries in due order.
 */
export class ClaimPacer {
  #spread = 1;
  #cleanRounds = 0;
  /** True while more is due than the runner has slots for (its last list was all due). */
  backlog = false;
  /** Claims that fit one commit, from the size of the last entry seen. */
  perCommit = 1;
  /** Since when free slots have been fewer than a round wants (0: not short). */
  #shortSince = 0;

  constructor(readonly concurrency: number) {}

  /** Entries to list for `free` slots. */
  listLimit(free: number): number {
    return Math.min(free * this.#spread, MAX_LIST);
  }

  /**
   * Free slots worth a claim round. Under a backlog: `FILL_COMMITS` claim
   * commits' worth (fewer, fuller claim commits per message), but after
   * `FILL_WAIT_MS` of waiting any free slot will do, as slots held by long
   * handlers may not come free soon. Without a backlog: one slot, so latency
   * is not affected.
   */
  minFill(free: number): number {
    if (!this.backlog) return 1;
    const want = Math.min(this.concurrency, FILL_COMMITS * this.perCommit);
    if (free >= want) {
      this.#shortSince = 0;
      return want;
    }
    this.#shortSince ||= Date.now();
    return Date.now() - this.#shortSince >= FILL_WAIT_MS ? 1 : want;
  }

  /** After a claim round: `lost` when another worker took some of its entries. */
  claimed(lost: boolean): void {
    // The next short wait starts from now, not from before this round.
    this.#shortSince = 0;
    if (lost) {
      this.#spread = Math.min(this.#spread * 2, MAX_SPREAD);
      this.#cleanRounds = 0;
    } else if (++this.#cleanRounds >= SPREAD_DECAY_AFTER && this.#spread > 1) {
      this.#spread--;
      this.#cleanRounds = 0;
    }
  }
}
