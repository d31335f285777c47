/**
 * Proxy overhead benchmark: the same KV Connect workload straight to denokv
 * (the stand-in) and through the proxy in one run, with sets/s, gets/s,
 * p50/p99 latency at 1 and 50 requests in flight, and CPU time per request of
 * the proxy next to the server's (from /proc/<pid>/stat). Prints a table.
 */
import { openRemoteKv, startStack } from "../_helpers/processes.ts";

const CLOCK_TICK_MS = 10; // USER_HZ is 100 on Linux

function cpuMs(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) * CLOCK_TICK_MS;
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

interface Row {
  target: string;
  op: string;
  inFlight: number;
  opsPerSec: number;
  p50: number;
  p99: number;
  proxyCpuUs: number;
  serverCpuUs: number;
}

async function run(
  kv: Deno.Kv,
  op: "set" | "get",
  inFlight: number,
  total: number,
  pids: { proxy: number; server: number },
): Promise<Omit<Row, "target">> {
  const latencies: number[] = [];
  let next = 0;
  const value = { payload: "x".repeat(100) };
  const one = async () => {
    while (next < total) {
      const i = next++;
      const key = ["bench", i % 1000];
      const t = performance.now();
      if (op === "set") await kv.set(key, value);
      else await kv.get(key);
      latencies.push(performance.now() - t);
    }
  };
  const cpu0 = { proxy: cpuMs(pids.proxy), server: cpuMs(pids.server) };
  const start = performance.now();
  await Promise.all(Array.from({ length: inFlight }, one));
  const seconds = (performance.now() - start) / 1000;
  const cpu1 = { proxy: cpuMs(pids.proxy), server: cpuMs(pids.server) };
  latencies.sort((a, b) => a - b);
  return {
    op,
    inFlight,
    opsPerSec: total / seconds,
    p50: quantile(latencies, 0.5),
    p99: quantile(latencies, 0.99),
    proxyCpuUs: ((cpu1.proxy - cpu0.proxy) * 1000) / total,
    serverCpuUs: ((cpu1.server - cpu0.server) * 1000) / total,
  };
}

/** Runs the benchmark and returns the table as Markdown. */
export async function proxyBench(): Promise<string> {
  await using stack = await startStack({ proxyEnv: { ACCESS_LOG: "on" } });
  const pids = { proxy: stack.proxy.child.pid, server: stack.denokv.child.pid };
  const direct = await openRemoteKv(stack.denokv.url);
  const proxied = await openRemoteKv(stack.proxy.url);
  const rows: Row[] = [];
  try {
    // Warm both paths (connections, JIT) before measuring.
    await run(direct, "set", 10, 500, pids);
    await run(proxied, "set", 10, 500, pids);
    for (
      const [op, inFlight, total] of [
        ["set", 1, 1000],
        ["get", 1, 1000],
        ["set", 50, 5000],
        ["get", 50, 5000],
      ] as const
    ) {
      // Alternate targets so drift on a shared machine hits both alike.
      rows.push({ target: "direct", ...(await run(direct, op, inFlight, total, pids)) });
      rows.push({ target: "proxy", ...(await run(proxied, op, inFlight, total, pids)) });
    }
  } finally {
    direct.close();
    proxied.close();
  }
  const lines = [
    "| op | in flight | target | ops/s | p50 ms | p99 ms | proxy CPU µs/req | server CPU µs/req |",
    "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
  ];
  for (const r of rows) {
    lines.push(
      `| ${r.op} | ${r.inFlight} | ${r.target} | ${r.opsPerSec.toFixed(0)} | ${
        r.p50.toFixed(3)
      } | ${r.p99.toFixed(3)} | ${r.target === "proxy" ? r.proxyCpuUs.toFixed(0) : "-"} | ${
        r.serverCpuUs.toFixed(0)
      } |`,
    );
  }
  lines.push("");
  for (let i = 0; i < rows.length; i += 2) {
    const d = rows[i], p = rows[i + 1];
    lines.push(
      `- ${d.op} @${d.inFlight}: added p50 ${(p.p50 - d.p50).toFixed(3)} ms, throughput ${
        (p.opsPerSec / d.opsPerSec).toFixed(2)
      }x direct`,
    );
  }
  return lines.join("\n");
}

if (import.meta.main) {
  console.log("## Proxy overhead (direct to denokv stand-in vs through the proxy)\n");
  console.log(await proxyBench());
}
