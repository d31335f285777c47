/**
 * What an open watch costs: opens N KV Connect watch streams (default 1,000)
 * through the proxy to the official denokv (the stand-in where it is not
 * installed), each on its own HTTP/1.1 connection as Fly's edge forwards
 * them, and prints the proxy's and denokv's resident memory and CPU per open
 * watch (CPU over an idle minute of pings, and for opening them).
 *
 *   node_modules/.bin/deno run -A tests/bench/watch_bench.ts [N]
 */
import { join } from "node:path";
import { freePort, startProxy, TEST_TOKEN, waitFor } from "../_helpers/processes.ts";
import { cpuTicks, DENOKV_DIR, rssKiB } from "../_helpers/supervised.ts";

const N = Number(Deno.args[0] ?? 1_000);
const IDLE_MS = 60_000;
const TICKS_PER_S = 100;

/** A protobuf `Watch { repeated WatchKey keys = 1 }` for the one key `[name]`. */
function watchBody(name: string): Uint8Array<ArrayBuffer> {
  const key = [0x02, ...new TextEncoder().encode(name), 0x00];
  const watchKey = [0x0a, key.length, ...key];
  return new Uint8Array([0x0a, watchKey.length, ...watchKey]);
}

const dir = await Deno.makeTempDir({ prefix: "denokv-watch-bench-" });
const denokvPort = freePort();
const bin = DENOKV_DIR ? join(DENOKV_DIR, "denokv") : "tests/bin/denokv";
const denokv = new Deno.Command(bin, {
  args: ["--sqlite-path", join(dir, "db.sqlite"), "serve", "--addr", `127.0.0.1:${denokvPort}`],
  env: { DENO_KV_ACCESS_TOKEN: TEST_TOKEN, DENO_BIN: Deno.execPath() },
  stdout: "null",
  stderr: "null",
}).spawn();
const denokvUrl = `http://127.0.0.1:${denokvPort}`;
await waitFor("denokv", async () => {
  const res = await fetch(denokvUrl, { method: "POST", body: "{}" }).catch(() => null);
  await res?.body?.cancel();
  return res !== null;
});
const proxy = await startProxy({ denokvUrl, env: { ACCESS_LOG: "off" } });
const pids = { proxy: proxy.child.pid, denokv: denokv.pid };
const sample = () => ({
  proxyRss: rssKiB(pids.proxy),
  denokvRss: rssKiB(pids.denokv),
  proxyCpu: cpuTicks(pids.proxy),
  denokvCpu: cpuTicks(pids.denokv),
});

const headers = {
  authorization: `Bearer ${TEST_TOKEN}`,
  "x-denokv-version": "2",
  "x-denokv-database-id": "00000000-0000-0000-0000-000000000000",
};
const controller = new AbortController();
const before = sample();
const opened: Promise<void>[] = [];
let frames = 0;
for (let i = 0; i < N; i++) {
  opened.push((async () => {
    const res = await fetch(`${proxy.url}/v2/watch`, {
      method: "POST",
      headers,
      body: watchBody(`w${i}`),
      signal: controller.signal,
      // A client of its own per watch: one connection each, as Fly's edge forwards them.
      client: Deno.createHttpClient({ poolMaxIdlePerHost: 0, http2: false }),
    });
    if (!res.ok) throw new Error(`watch ${i}: ${res.status} ${await res.text()}`);
    const reader = res.body!.getReader();
    const first = await reader.read();
    if (first.done) throw new Error(`watch ${i} ended`);
    frames++;
    (async () => {
      try {
        while (!(await reader.read()).done) frames++;
      } catch { /* aborted at the end */ }
    })();
  })());
}
const t0 = performance.now();
await Promise.all(opened);
const openMs = performance.now() - t0;
await new Promise((r) => setTimeout(r, 2_000));
const open = sample();
await new Promise((r) => setTimeout(r, IDLE_MS));
const idle = sample();

const mib = (kib: number) => (kib / 1024).toFixed(1);
const perWatchKiB = (a: number, b: number) => ((b - a) / N).toFixed(1);
const cpuPct = (a: number, b: number, ms: number) =>
  (((b - a) / TICKS_PER_S) / (ms / 1000) * 100).toFixed(2);
console.log(
  `denokv: ${DENOKV_DIR ? "official 0.14.0" : "stand-in"}; ${N} watches opened in ${
    openMs.toFixed(0)
  } ms`,
);
console.log(
  `| process | RSS before | RSS with ${N} watches | per watch | CPU to open all | CPU while idle (pings) |`,
);
console.log("| --- | --- | --- | --- | --- | --- |");
for (const name of ["proxy", "denokv"] as const) {
  const rss = `${name}Rss` as const;
  const cpu = `${name}Cpu` as const;
  console.log(
    `| ${name} | ${mib(before[rss])} MiB | ${mib(open[rss])} MiB | ${
      perWatchKiB(before[rss], open[rss])
    } KiB | ${((open[cpu] - before[cpu]) / TICKS_PER_S).toFixed(2)} s | ${
      cpuPct(open[cpu], idle[cpu], IDLE_MS)
    } % of a core |`,
  );
}
console.log(`frames received: ${frames}`);
controller.abort();
await proxy.stop("SIGKILL");
denokv.kill("SIGKILL");
await denokv.status;
await Deno.remove(dir, { recursive: true }).catch(() => {});
Deno.exit(0);
