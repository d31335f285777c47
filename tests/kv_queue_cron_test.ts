/**
 * lib/cron.ts (the cron-expression matcher) and kv.cron / kvCron: Deno.cron's
 * shapes, once per tick across processes (one SIGKILLed, one restarted), and
 * the missed-tick rule.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { nextTick, parseCron, scheduleToString } from "../lib/cron.ts";
import { kvCron, withQueues } from "../lib/kv_queue.ts";
import {
  DENO,
  openRemoteKv,
  ROOT,
  Running,
  startStack,
  TEST_TOKEN,
  waitFor,
} from "./_helpers/processes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
const at = (iso: string) => Date.parse(iso);
const iso = (ms: number) => new Date(ms).toISOString();

Deno.test("nextTick() finds the next match of 5- and 6-field schedules (UTC)", () => {
  const from = at("2026-01-01T12:30:15Z"); // a Thursday
  const cases: [string, string][] = [
    ["* * * * *", "2026-01-01T12:31:00.000Z"],
    ["*/15 * * * *", "2026-01-01T12:45:00.000Z"],
    ["0 0 * * *", "2026-01-02T00:00:00.000Z"],
    ["0 0 1 1 *", "2027-01-01T00:00:00.000Z"],
    ["30 9 * * 1-5", "2026-01-02T09:30:00.000Z"],
    ["0 0 29 2 *", "2028-02-29T00:00:00.000Z"],
    ["0 12 13 * 5", "2026-01-02T12:00:00.000Z"], // day 13 or a Friday: cron's either-day rule
    ["0 0 * * 7", "2026-01-04T00:00:00.000Z"], // 7 is Sunday too
    ["5,10 3-4 * * 0", "2026-01-04T03:05:00.000Z"],
    ["*/2 * * * * *", "2026-01-01T12:30:16.000Z"],
    ["0 0 12 31 12 *", "2026-12-31T12:00:00.000Z"],
  ];
  for (const [schedule, want] of cases) {
    assert.equal(iso(nextTick(parseCron(schedule), from)), want, schedule);
  }
});

Deno.test("scheduleToString() turns Deno.cron's object form into a cron string; bad schedules throw TypeError", () => {
  assert.equal(
    scheduleToString({
      minute: { every: 5 },
      hour: { exact: [1, 2] },
      dayOfWeek: { start: 1, end: 5 },
    }),
    "*/5 1,2 * * 1-5",
  );
  assert.equal(scheduleToString({ minute: 0, hour: 3 }), "0 3 * * *");
  assert.equal(scheduleToString({ dayOfMonth: { start: 10, every: 2 } }), "* * 10/2 * *");
  for (
    const bad of ["* * *", "60 * * * *", "a * * * *", "*/0 * * * *", "5-1 * * * *", "0 0 31 2 *"]
  ) {
    assert.throws(() => nextTick(parseCron(bad), 0), { name: "TypeError" }, bad);
  }
});

Deno.test(
  'withQueues kv.cron(): a throwing handler prints Deno\'s "Exception in cron handler <name>" with the error',
  opts,
  async () => {
    const printed: unknown[][] = [];
    const original = console.error;
    console.error = (...args: unknown[]) => void printed.push(args);
    let runs = 0;
    try {
      const kv = withQueues(await Deno.openKv(":memory:"));
      const job = kv.cron("failing-job", "* * * * * *", () => {
        runs++;
        throw new Error(`boom ${runs}`);
      });
      await waitFor("two failed runs printed", () => printed.length >= 2, { timeoutMs: 10_000 });
      kv.close();
      await job;
    } finally {
      console.error = original;
    }
    assert.deepEqual(
      printed.slice(0, 2).map(([text, error]) => [text, (error as Error).message]),
      [["Exception in cron handler failing-job", "boom 1"], [
        "Exception in cron handler failing-job",
        "boom 2",
      ]],
    );
  },
);

Deno.test(
  "withQueues kv.cron(): Deno.cron's shapes, options with signal and backoffSchedule",
  opts,
  async () => {
    const kv = withQueues(await Deno.openKv(":memory:"));
    const controller = new AbortController();
    let runs = 0;
    let failures = 0;
    const job = kv.cron("every-second", "* * * * * *", {
      backoffSchedule: [10],
      signal: controller.signal,
    }, () => {
      runs++;
      // The first tick fails once: its retry comes 10 ms later.
      if (runs === 1) {
        failures++;
        throw new Error("first try fails");
      }
    });
    assert.throws(() => kv.cron("bad name!", "* * * * *", () => {}), { name: "TypeError" });
    await waitFor("three runs", () => runs >= 3, { timeoutMs: 10_000 });
    controller.abort();
    await job;
    assert.equal(failures, 1);
    // The handler-only form, ended by close().
    const plain = kv.cron("plain", { minute: { every: 1 } }, () => {});
    kv.close();
    await plain;
  },
);

Deno.test(
  "kvCron: ticks missed while nothing ran are run once, late, then the schedule goes on",
  opts,
  async () => {
    const kv = await Deno.openKv(":memory:");
    try {
      const prefix = ["missed"];
      // As left by a process that stopped 30 s ago.
      await kv.set([...prefix, "tick", "state"], { s: "* * * * * *", next: Date.now() - 30_000 });
      const seen: { tick: number; late: boolean }[] = [];
      const controller = new AbortController();
      const started = Date.now();
      const job = kvCron(kv, {
        name: "tick",
        schedule: "* * * * * *",
        prefix,
        signal: controller.signal,
        handler: ({ tick, late }) => {
          seen.push({ tick, late });
        },
      });
      await waitFor("two more ticks", () => seen.length >= 3, { timeoutMs: 10_000 });
      controller.abort();
      await job;
      assert.equal(seen[0].late, true);
      assert.ok(seen[0].tick < started - 25_000, "the late tick is the missed one");
      assert.deepEqual(seen.slice(1).map((s) => s.late), seen.slice(1).map(() => false));
      assert.ok(seen.slice(1).every((s) => s.tick >= started), "missed ticks replayed one by one");
    } finally {
      kv.close();
    }
  },
);

Deno.test(
  "kvCron across 3 processes, one SIGKILLed and one started later: each tick runs once",
  opts,
  async () => {
    await using stack = await startStack();
    const kv = await openRemoteKv(stack.proxy.url);
    const prefix = ["cron3", crypto.randomUUID().slice(0, 6)];
    const start = (run: string) =>
      new Running(
        run,
        new Deno.Command(DENO, {
          args: ["run", "-A", join(ROOT, "tests/queue_fixtures/cron_worker.ts")],
          env: {
            DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
            QUEUE_URL: stack.proxy.url,
            CRON_PREFIX: JSON.stringify(prefix),
            WORKER_RUN: run,
          },
          stdout: "piped",
          stderr: "piped",
        }).spawn(),
        0,
      );
    const ticks = (r: Running) => (r.output.match(/^tick /gm) ?? []).length;
    const procs = ["a", "b", "c"].map(start);
    try {
      const all = () => procs.reduce((n, p) => n + ticks(p), 0);
      await waitFor("3 ticks", () => all() >= 3, { timeoutMs: 60_000 });
      await procs[1].stop("SIGKILL");
      const before = all();
      await waitFor("3 more ticks", () => all() >= before + 3, { timeoutMs: 30_000 });
      procs.push(start("d"));
      await waitFor("the restarted process to run a tick", () => ticks(procs[3]) >= 1, {
        timeoutMs: 60_000,
      });
    } finally {
      for (const p of procs) await p.stop("SIGKILL");
    }
    const runs = new Map<number, string[]>();
    for await (const e of kv.list({ prefix: [...prefix, "ran"] })) {
      const tick = e.key[e.key.length - 2] as number;
      runs.set(tick, [...(runs.get(tick) ?? []), e.key[e.key.length - 1] as string]);
    }
    kv.close();
    const sorted = [...runs.keys()].sort((x, y) => x - y);
    assert.ok(sorted.length >= 7, `${sorted.length} ticks`);
    // A tick runs twice only when the killed process may have been running it.
    const twice = [...runs].filter(([, by]) => by.length > 1 && !by.includes("b"));
    assert.deepEqual(twice, []);
    // Every second from the first tick to the last, none missing.
    const gaps = sorted.slice(1).filter((t, i) => t - sorted[i] !== 1000);
    assert.deepEqual(gaps.map(iso), []);
    assert.ok(new Set([...runs.values()].flat()).size >= 3, "ticks ran in several processes");
  },
);
