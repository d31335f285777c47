/**
 * Proxy overhead benchmark: the same KV Connect workload with the real Deno
 * client straight to denokv (the official binary, or the stand-in under KV_SERVER=standin), through our proxy, and through a
 * plain Hono `proxy()` forwarder (tests/bench/plain_proxy.ts), all in one run.
 * Prints sets/s and gets/s, p50/p99 latency at 1 and 50 requests in flight,
 * and CPU time per request of each forwarder next to the server's (from
 * /proc/<pid>/stat). Targets are interleaved, one request at a time at 1 in
 * flight and in alternating rounds at 50, so drift on a shared machine hits
 * them alike.
 *
 * Run: `deno task bench proxy` (`--rounds 5 --per-round 2000 --single 2000`).
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import {
  DENO,
  freePort,
  KV_SERVER,
  openRemoteKv,
  ROOT,
  Running,
  startStack,
  waitFor,
} from "../_helpers/processes.ts";

const CLOCK_TICK_MS = 10; // USER_HZ is 100 on Linux

function cpuMs(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * CLOCK_TICK_MS;
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

type Op = "set" | "get";

interface Target {
  name: string;
  kv: Deno.Kv;
  /** The forwarder's pid, if any. */
  pid?: number;
}

interface Tally {
  latencies: number[];
  ops: number;
  seconds: number;
  forwarderCpuMs: number;
  serverCpuMs: number;
}

const value = { payload: "x".repeat(100) };

function emptyTally(): Tally {
  return { latencies: [], ops: 0, seconds: 0, forwarderCpuMs: 0, serverCpuMs: 0 };
}

function once(kv: Deno.Kv, op: Op, i: number): Promise<unknown> {
  const key = ["bench", i % 1000];
  return op === "set" ? kv.set(key, value) : kv.get(key);
}

async function measure(
  t: Target,
  serverPid: number,
  tally: Tally,
  run: () => Promise<void>,
): Promise<void> {
  const f0 = t.pid ? cpuMs(t.pid) : 0;
  const s0 = cpuMs(serverPid);
  const start = performance.now();
  await run();
  tally.seconds += (performance.now() - start) / 1000;
  tally.forwarderCpuMs += t.pid ? cpuMs(t.pid) - f0 : 0;
  tally.serverCpuMs += cpuMs(serverPid) - s0;
}

/** One request at a time, the targets taking turns request by request. */
async function single(targets: Target[], serverPid: number, op: Op, n: number) {
  const tallies = targets.map(emptyTally);
  for (let i = 0; i < n; i++) {
    for (const [j, t] of targets.entries()) {
      await measure(t, serverPid, tallies[j], async () => {
        const t0 = performance.now();
        await once(t.kv, op, i);
        tallies[j].latencies.push(performance.now() - t0);
        tallies[j].ops++;
      });
    }
  }
  return tallies;
}

/** `inFlight` requests at once, in rounds that alternate between targets. */
async function loaded(
  targets: Target[],
  serverPid: number,
  op: Op,
  inFlight: number,
  rounds: number,
  perRound: number,
) {
  const tallies = targets.map(emptyTally);
  for (let r = 0; r < rounds; r++) {
    for (const [j, t] of targets.entries()) {
      let next = 0;
      const worker = async () => {
        while (next < perRound) {
          const i = next++;
          const t0 = performance.now();
          await once(t.kv, op, i);
          tallies[j].latencies.push(performance.now() - t0);
        }
      };
      await measure(t, serverPid, tallies[j], async () => {
        await Promise.all(Array.from({ length: inFlight }, worker));
      });
      tallies[j].ops += perRound;
    }
  }
  return tallies;
}

async function startPlainProxy(denokvUrl: string): Promise<Running> {
  const port = freePort();
  const child = new Deno.Command(DENO, {
    args: ["run", "--allow-net", "--allow-env", join(ROOT, "tests/bench/plain_proxy.ts")],
    cwd: ROOT,
    env: { PORT: String(port), DENOKV_URL: denokvUrl },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const running = new Running("plain proxy", child, port);
  await waitFor("the plain proxy to listen", async () => {
    const res = await fetch(running.url, { method: "POST", body: "{}" }).catch(() => null);
    await res?.body?.cancel();
    return res !== null;
  });
  return running;
}

/** Runs the benchmark and returns the table as Markdown. */
export async function proxyBench(
  options: { rounds: number; perRound: number; single: number },
): Promise<string> {
  await using stack = await startStack({ proxyEnv: { ACCESS_LOG: "on" } });
  await using plain = await startPlainProxy(stack.denokv.url);
  const serverPid = stack.denokv.child.pid;
  const targets: Target[] = [
    { name: "direct", kv: await openRemoteKv(stack.denokv.url) },
    { name: "our proxy", kv: await openRemoteKv(stack.proxy.url), pid: stack.proxy.child.pid },
    { name: "Hono proxy()", kv: await openRemoteKv(plain.url), pid: plain.child.pid },
  ];
  const lines = [
    "| op | in flight | target | ops/s | p50 ms | p99 ms | forwarder CPU µs/req | server CPU µs/req |",
    "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
  ];
  const notes: string[] = [];
  try {
    // Warm every path (connections, JIT) before measuring.
    await loaded(targets, serverPid, "set", 10, 1, 1000);
    for (const [op, inFlight] of [["set", 1], ["get", 1], ["set", 50], ["get", 50]] as const) {
      const tallies = inFlight === 1
        ? await single(targets, serverPid, op, options.single)
        : await loaded(targets, serverPid, op, inFlight, options.rounds, options.perRound);
      const rows = tallies.map((t, j) => {
        const sorted = [...t.latencies].sort((a, b) => a - b);
        return {
          name: targets[j].name,
          opsPerSec: t.ops / t.seconds,
          p50: quantile(sorted, 0.5),
          p99: quantile(sorted, 0.99),
          forwarderUs: targets[j].pid ? (t.forwarderCpuMs * 1000) / t.ops : NaN,
          serverUs: (t.serverCpuMs * 1000) / t.ops,
        };
      });
      for (const r of rows) {
        lines.push(
          `| ${op} | ${inFlight} | ${r.name} | ${r.opsPerSec.toFixed(0)} | ${r.p50.toFixed(3)} | ${
            r.p99.toFixed(3)
          } | ${Number.isNaN(r.forwarderUs) ? "-" : r.forwarderUs.toFixed(0)} | ${
            r.serverUs.toFixed(0)
          } |`,
        );
      }
      const [direct, ...forwarders] = rows;
      for (const f of forwarders) {
        notes.push(
          `- ${op} @${inFlight}, ${f.name}: added p50 ${(f.p50 - direct.p50).toFixed(3)} ms, ` +
            `throughput ${(f.opsPerSec / direct.opsPerSec).toFixed(2)}x direct`,
        );
      }
    }
  } finally {
    for (const t of targets) t.kv.close();
  }
  return [...lines, "", ...notes].join("\n");
}

if (import.meta.main) {
  const args = parseArgs({
    options: {
      rounds: { type: "string", default: "5" },
      "per-round": { type: "string", default: "2000" },
      single: { type: "string", default: "2000" },
    },
  });
  const options = {
    rounds: Number(args.values.rounds),
    perRound: Number(args.values["per-round"]),
    single: Number(args.values.single),
  };
  console.log(`## Proxy overhead (direct to ${KV_SERVER} denokv, our proxy, Hono proxy())\n`);
  console.log(await proxyBench(options));
}
