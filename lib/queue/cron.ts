/**
 * Cron on the queue engine: each tick of a schedule runs once across any
 * number of processes. A process whose clock reaches the tick advances the
 * schedule's state in KV and enqueues the tick as a message in one checked
 * commit; whichever process wins, the tick is in the queue exactly once, and
 * the runners (one per process) deliver it with leases and retries, so a
 * tick whose process dies mid-handler runs again elsewhere.
 *
 * Missed ticks: ticks that passed while no process ran are not replayed one
 * by one. The first process back runs the latest missed tick once (its
 * message says `late: true`) and then follows the schedule from the next
 * tick after now.
 *
 * @module
 */
import { type Cron, type CronSchedule, nextTick, parseCron, scheduleToString } from "../cron.ts";
import { DEFAULT_LEASE_MS, MAX_TIMER_MS } from "./limits.ts";
import { KvQueue } from "./producer.ts";
import { KvQueueRunner } from "./runner.ts";
import { checkKey } from "./validate.ts";

/** What a cron handler is told about the tick it runs for. */
export interface CronTick {
  /** The tick's scheduled time (ms). */
  tick: number;
  /** True when the tick was missed while no process ran and is run now once. */
  late: boolean;
  /** 1 on the first delivery of this tick. */
  attempt: number;
}

/** Options of {@linkcode kvCron}. */
export interface KvCronOptions {
  /** The job's name: one schedule state and one queue per name. */
  name: string;
  /** Deno.cron's 5-field string or object form; a 6-field string has seconds first. */
  schedule: string | CronSchedule;
  /** Runs once per tick (at least once if a process dies mid-run). */
  handler: (tick: CronTick) => unknown | Promise<unknown>;
  /** Retry delays after the handler throws (Deno.cron's option). Default: no retries. */
  backoffSchedule?: readonly number[];
  /** Stops this process's part; the promise of {@linkcode kvCron} resolves after. */
  signal?: AbortSignal;
  /** Key prefix under which each job keeps its state and queue. Default `["__kvq__", "cron"]`. */
  prefix?: Deno.KvKey;
  /** Lease of a running tick, renewed while it runs. Default 30,000. */
  leaseMs?: number;
  /** Called when the handler throws (before a retry). */
  onError?: (error: unknown) => void;
}

/** The schedule's state in KV: its source and the next tick to take. */
interface CronState {
  s: string;
  next: number;
}

const CRON_TYPE = "cron";
/** Deno.cron's name rule. */
const NAME = /^[a-zA-Z0-9\-_ ]{1,64}$/;

/** Sleeps `ms` (in steps under the timer limit), or until `signal` aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, Math.max(0, Math.min(ms, MAX_TIMER_MS)));
    signal.addEventListener("abort", done);
  });
}

/**
 * Runs `options.handler` on `options.schedule`, once per tick across every
 * process that runs the same `name` on the same server. Resolves once
 * `options.signal` aborts and this process's running tick has finished.
 *
 * @example
 * ```ts
 * import { kvCron } from "../kv_queue.ts";
 * const kv = await Deno.openKv(":memory:");
 * const controller = new AbortController();
 * const done = kvCron(kv, {
 *   name: "nightly-report",
 *   schedule: "0 3 * * *",
 *   handler: async ({ tick }) => {
 *     await kv.set(["reports", tick], "done");
 *   },
 *   signal: controller.signal,
 * });
 * controller.abort();
 * await done;
 * kv.close();
 * ```
 */
export function kvCron(kv: Deno.Kv, options: KvCronOptions): Promise<void> {
  const { name, handler } = options;
  if (typeof name !== "string" || !NAME.test(name)) {
    throw new TypeError(
      "Invalid cron name: 1 to 64 letters, digits, spaces, hyphens or underscores: got " +
        JSON.stringify(name),
    );
  }
  if (typeof handler !== "function") throw new TypeError("Cron handler must be a function");
  const cron = parseCron(scheduleToString(options.schedule));
  const prefix = [...checkKey("prefix", options.prefix ?? ["__kvq__", CRON_TYPE]), name];
  const queue = new KvQueue(kv, { prefix, deadLetterRetentionMs: 0 });
  // Checked here, not at the first tick.
  queue.prepare(CRON_TYPE, null, { backoffSchedule: options.backoffSchedule ?? [] });
  const signal = options.signal ?? new AbortController().signal;
  if (signal.aborted) return Promise.resolve();
  // Checked above, at the call, as Deno.cron does; the rest runs on.
  return runCron(kv, options, cron, queue, prefix, signal);
}

async function runCron(
  kv: Deno.Kv,
  options: KvCronOptions,
  cron: Cron,
  queue: KvQueue,
  prefix: Deno.KvKey,
  signal: AbortSignal,
): Promise<void> {
  const { handler } = options;
  const runner = new KvQueueRunner(kv, queue, {
    concurrency: 1,
    leaseMs: options.leaseMs ?? DEFAULT_LEASE_MS,
    stopTimeoutMs: 0,
    onError: options.onError && ((e) => options.onError!(e)),
    dispatch: (m) => {
      const t = m.data as { tick: number; late: boolean };
      return handler({ tick: t.tick, late: t.late, attempt: m.attempt });
    },
    dispatchType: CRON_TYPE,
  });
  const running = runner.run();
  const stateKey = [...prefix, "state"];
  try {
    while (!signal.aborted) {
      try {
        const entry = await kv.get<CronState>(stateKey);
        const now = Date.now();
        const state = entry.value;
        if (state === null || state.s !== cron.source) {
          // First run, or the schedule changed (a deploy): start at the next tick.
          const next = nextTick(cron, now);
          await kv.atomic().check(entry).set(stateKey, { s: cron.source, next }).commit();
          continue;
        }
        if (state.next > now) {
          await sleep(state.next - now, signal);
          continue;
        }
        // The tick is due: advance the state and enqueue the tick, together.
        // A process that lost the race sees the check fail and reads again.
        const late = nextTick(cron, state.next) <= now;
        const msg = queue.prepare(CRON_TYPE, { tick: state.next, late }, {
          backoffSchedule: options.backoffSchedule ?? [],
        });
        const op = queue.addTo(kv.atomic().check(entry), msg)
          .set(stateKey, { s: cron.source, next: nextTick(cron, now) });
        await queue.commitEnqueue(queue.addReceipt(op, msg.id), msg.id);
      } catch {
        // The server is away for a moment: try again shortly.
        await sleep(1000, signal);
      }
    }
  } finally {
    await runner.stop();
    await running;
  }
}
