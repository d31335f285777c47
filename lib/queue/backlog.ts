/**
 * The backlog limit: enqueues throw a `RangeError` once the pending counter
 * plus what this process enqueued since reading it would pass the limit.
 *
 * @module
 */

/**
 * Reading the counter on every enqueue would double its cost; a short cache
 * plus local increments keeps the limit close enough (other processes'
 * enqueues show up at the next read, at most 200 ms later).
 */
export class BacklogGate {
  #readAt = 0;
  #sinceRead = 0;
  #value = 0;
  #reading: Promise<void> | null = null;

  constructor(readonly kv: Deno.Kv, readonly counter: Deno.KvKey, readonly limit: number) {}

  /** Throws a `RangeError` when `adding` more messages would pass the limit; else counts them. */
  async check(adding: number): Promise<void> {
    if (Date.now() - this.#readAt > 200 || this.#value + this.#sinceRead + adding > this.limit) {
      // Enqueues started together share one read.
      this.#reading ??= this.#read().finally(() => this.#reading = null);
      await this.#reading;
    }
    const pending = this.#value + this.#sinceRead;
    if (pending + adding > this.limit) {
      throw new RangeError(
        `queue backlog is full: ${pending} pending messages, "backlogLimit" is ${this.limit}`,
      );
    }
    this.#sinceRead += adding;
  }

  /** Gives back what `check` counted for enqueues that did not happen. */
  unaccount(n: number): void {
    this.#sinceRead = Math.max(0, this.#sinceRead - n);
  }

  async #read(): Promise<void> {
    const startedAt = Date.now();
    const entry = await this.kv.get<Deno.KvU64>(this.counter);
    const raw = entry.value?.value ?? 0n;
    this.#value = raw > BigInt(Number.MAX_SAFE_INTEGER) ? 0 : Number(raw);
    this.#readAt = startedAt;
    this.#sinceRead = 0;
  }
}
