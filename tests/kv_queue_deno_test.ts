/**
 * withQueues against Deno's own queue, computed live: for each input, Deno's
 * outcome on a native `Deno.openKv(":memory:")` and ours must be the same
 * (accepted, or the same error type and message); a throwing handler prints
 * as Deno's does, once per delivery, with Deno's delivery count.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { withQueues } from "../lib/kv_queue.ts";
import { DENO, ROOT } from "./_helpers/processes.ts";

const DAY = 24 * 60 * 60 * 1000;
const keys = (n: number) => Array.from({ length: n }, (_, i) => ["undelivered", i]);

/** Enqueue option inputs, each tried on Deno and on withQueues. */
const inputs: [string, unknown][] = [
  ["no options", undefined],
  ["options null", null],
  ["options 5", 5],
  ["delay 0", { delay: 0 }],
  ["delay 1.5", { delay: 1.5 }],
  ["delay 4.35 * 100", { delay: 4.35 * 100 }],
  ["delay -1", { delay: -1 }],
  ["delay -0.5", { delay: -0.5 }],
  ["delay NaN", { delay: NaN }],
  ["delay 30 days", { delay: 30 * DAY }],
  ["delay 30 days + 1", { delay: 30 * DAY + 1 }],
  ["delay Infinity", { delay: Infinity }],
  ["delay 2 ** 53", { delay: 2 ** 53 }],
  ["delay null", { delay: null }],
  ["delay '5'", { delay: "5" }],
  ["delay '-1'", { delay: "-1" }],
  ["delay 'abc'", { delay: "abc" }],
  ["delay true", { delay: true }],
  ["delay {}", { delay: {} }],
  ["delay []", { delay: [] }],
  ["delay 5n", { delay: 5n }],
  ["delay -5n", { delay: -5n }],
  ["backoffSchedule []", { backoffSchedule: [] }],
  ["backoffSchedule 5 entries", { backoffSchedule: [1, 2, 3, 4, 5] }],
  ["backoffSchedule 6 entries", { backoffSchedule: [1, 2, 3, 4, 5, 6] }],
  ["backoffSchedule 100 entries", { backoffSchedule: Array(100).fill(1) }],
  ["backoffSchedule [-1]", { backoffSchedule: [-1] }],
  ["backoffSchedule [1.5]", { backoffSchedule: [1.5] }],
  ["backoffSchedule [1 hour]", { backoffSchedule: [3_600_000] }],
  ["backoffSchedule [1 hour + 1]", { backoffSchedule: [3_600_001] }],
  ["backoffSchedule [NaN]", { backoffSchedule: [NaN] }],
  ["backoffSchedule [0, NaN]", { backoffSchedule: [0, NaN] }],
  ["backoffSchedule ['a']", { backoffSchedule: ["a"] }],
  ["backoffSchedule [null]", { backoffSchedule: [null] }],
  ["backoffSchedule [5n]", { backoffSchedule: [5n] }],
  ["backoffSchedule 5", { backoffSchedule: 5 }],
  ["backoffSchedule 'abc'", { backoffSchedule: "abc" }],
  ["backoffSchedule null", { backoffSchedule: null }],
  ["keysIfUndelivered 10 keys", { keysIfUndelivered: keys(10) }],
  ["keysIfUndelivered 11 keys", { keysIfUndelivered: keys(11) }],
  ["keysIfUndelivered 101 keys", { keysIfUndelivered: keys(101) }],
  ["keysIfUndelivered null", { keysIfUndelivered: null }],
  ["keysIfUndelivered 5", { keysIfUndelivered: 5 }],
  ["keysIfUndelivered ['x']", { keysIfUndelivered: ["x"] }],
  ["keysIfUndelivered [[{}]]", { keysIfUndelivered: [[{}]] }],
  ["keysIfUndelivered [[null]]", { keysIfUndelivered: [[null]] }],
  ["keysIfUndelivered [[1n, true, Uint8Array]]", {
    keysIfUndelivered: [[1n, true, new Uint8Array([1])]],
  }],
];

type Outcome = string;

async function outcome(fn: () => Promise<unknown>): Promise<Outcome> {
  try {
    await fn();
    return "ok";
  } catch (e) {
    return `${(e as Error).name}: ${(e as Error).message}`;
  }
}

Deno.test("withQueues enqueue options: accepted and refused exactly as Deno's own queue does", async () => {
  const native = await Deno.openKv(":memory:");
  const raw = await Deno.openKv(":memory:");
  const ours = withQueues(raw);
  try {
    const mismatches: string[] = [];
    for (const [name, options] of inputs) {
      for (const via of ["enqueue", "atomic().enqueue"] as const) {
        const run = (kv: Deno.Kv) => () =>
          via === "enqueue"
            ? kv.enqueue("x", options as never)
            : kv.atomic().enqueue("x", options as never).commit();
        const deno = await outcome(run(native));
        const got = await outcome(run(ours));
        if (deno !== got) mismatches.push(`${via} ${name}: Deno ${deno} | ours ${got}`);
      }
    }
    assert.deepEqual(mismatches, []);
  } finally {
    native.close();
    ours.close();
  }
});

Deno.test("withQueues enqueue values: refused exactly as Deno's own queue does", async () => {
  const native = await Deno.openKv(":memory:");
  const ours = withQueues(await Deno.openKv(":memory:"));
  try {
    const values: [string, unknown][] = [
      ["a function", () => 1],
      ["a symbol", Symbol("x")],
      ["undefined", undefined],
      ["70,000 characters", "x".repeat(70_000)],
      ["64 KiB less a little", "x".repeat(65_000)],
    ];
    const mismatches: string[] = [];
    for (const [name, value] of values) {
      for (const via of ["enqueue", "atomic().enqueue"]) {
        const run = (kv: Deno.Kv) => () =>
          via === "enqueue" ? kv.enqueue(value) : kv.atomic().enqueue(value).commit();
        const deno = await outcome(run(native));
        const got = await outcome(run(ours));
        if (deno !== got) mismatches.push(`${via} ${name}: Deno ${deno} | ours ${got}`);
      }
    }
    assert.deepEqual(mismatches, []);
  } finally {
    native.close();
    ours.close();
  }
});

Deno.test("withQueues: a throwing handler prints Deno's \"Exception in queue handler\" once per delivery, with Deno's delivery count", async () => {
  const run = async (which: string) => {
    const out = await new Deno.Command(DENO, {
      args: [
        "run",
        "-A",
        "--unstable-kv",
        join(ROOT, "tests/queue_fixtures/throwing_handler.ts"),
        which,
      ],
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(30_000),
    }).output();
    const stderr = new TextDecoder().decode(out.stderr);
    return {
      stdout: new TextDecoder().decode(out.stdout).trim(),
      reports: stderr.split("\n").filter((l) => l.startsWith("Exception in queue handler")),
    };
  };
  const [native, ours] = await Promise.all([run("native"), run("ours")]);
  assert.equal(native.stdout, "delivered 3");
  assert.equal(ours.stdout, native.stdout);
  assert.deepEqual(native.reports, Array(3).fill("Exception in queue handler Error: boom x"));
  assert.deepEqual(ours.reports, native.reports);
});
