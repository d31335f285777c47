/**
 * `deno run -A tests/bench/stack_memory.ts`: resident memory of each program of
 * the real supervisord.conf (denokv, Litestream, proxy, the watchdog, the lease
 * renewer, Supercronic, supervisord itself) over MinIO, after 1,000 writes, sampled over 10 s. With
 * the nightly check's peak (`deno task bench:backup`) it sizes fly.toml's [[vm]].
 */
import { join } from "node:path";
import {
  DENO,
  freePort,
  KV_SERVER,
  openRemoteKv,
  ROOT,
  Running,
  TEST_PATH,
  TEST_TOKEN,
  waitFor,
} from "../_helpers/processes.ts";
import { startMinio } from "../_helpers/minio.ts";

const LITESTREAM_DIR = join(ROOT, "node_modules/@flydotio/litestream-linux-x64");

function tree(pid: number): Map<number, string> {
  const parent = new Map<number, number>();
  for (const e of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(e.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${e.name}/stat`);
      parent.set(Number(e.name), Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]));
    } catch { /* gone */ }
  }
  const out = new Map<number, string>();
  for (const p of parent.keys()) {
    for (let q: number | undefined = p; q; q = parent.get(q)) {
      if (q === pid) {
        const cmd = Deno.readTextFileSync(`/proc/${p}/cmdline`).replaceAll("\0", " ");
        out.set(p, cmd);
        break;
      }
    }
  }
  return out;
}

function label(cmd: string): string {
  if (cmd.includes("lease_cli.ts")) return "lease renewer (deno)";
  if (cmd.includes("watchdog.ts")) return "watchdog (deno)";
  if (/\bsupercronic\b/.test(cmd)) return "supercronic";
  if (cmd.includes("proxy/main.ts")) return "proxy (deno)";
  if (/litestream\S* replicate/.test(cmd)) return "litestream replicate";
  if (/\bdenokv\b.*serve/.test(cmd)) return "denokv";
  if (cmd.includes("supervisord")) return "supervisord";
  return cmd.slice(0, 40);
}

function rssKiB(pid: number): number {
  try {
    return Number(/VmRSS:\s+(\d+)/.exec(Deno.readTextFileSync(`/proc/${pid}/status`))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

await using s3 = await startMinio("denokv-memory");
const dataDir = await Deno.makeTempDir({ prefix: "stack-memory-" });
const port = freePort();
const child = new Deno.Command("supervisord", {
  args: ["-n", "-c", join(ROOT, "supervisord.conf")],
  cwd: ROOT,
  env: {
    PATH: `${LITESTREAM_DIR}:${TEST_PATH}`,
    HOME: Deno.env.get("HOME") ?? "/tmp",
    DENO_BIN: DENO,
    APP_DIR: ROOT.replace(/\/$/, ""),
    DATA_DIR: dataDir,
    PORT: String(port),
    DENOKV_URL: `http://127.0.0.1:${freePort()}`,
    DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
    LITESTREAM_ADDR: `127.0.0.1:${freePort()}`,
    ACCESS_LOG: "off",
    FLY_MACHINE_ID: "memory-bench",
    ...s3.env("memory"),
  },
  clearEnv: true,
  stdout: "piped",
  stderr: "piped",
}).spawn();
await using supervisord = new Running("supervisord", child, port);
try {
  await waitFor("/healthz 200", async () => {
    const res = await fetch(`http://127.0.0.1:${port}/healthz`).catch(() => null);
    await res?.body?.cancel();
    return res?.status === 200;
  }, { timeoutMs: 90_000, intervalMs: 250 });
  const kv = await openRemoteKv(`http://127.0.0.1:${port}`);
  for (let i = 0; i < 1000; i++) await kv.set(["memory", i], { i, pad: "x".repeat(200) });
  kv.close();
  const peak = new Map<string, number>();
  for (let s = 0; s < 40; s++) {
    for (const [pid, cmd] of tree(child.pid)) {
      const name = label(cmd);
      if (name.startsWith("/bin/sh") || name.startsWith("supervisorctl")) continue;
      peak.set(name, Math.max(peak.get(name) ?? 0, rssKiB(pid)));
    }
    peak.set("supervisord", Math.max(peak.get("supervisord") ?? 0, rssKiB(child.pid)));
    await new Promise((r) => setTimeout(r, 250));
  }
  console.log(`stack memory (${KV_SERVER} denokv), peak over 10 s after 1,000 writes:`);
  let total = 0;
  for (const [name, kib] of [...peak].sort()) {
    total += kib;
    console.log(`${name.padEnd(24)} ${(kib / 1024).toFixed(0).padStart(4)} MB`);
  }
  console.log(`${"total".padEnd(24)} ${(total / 1024).toFixed(0).padStart(4)} MB`);
} finally {
  for (const pid of tree(child.pid).keys()) {
    try {
      Deno.kill(pid, "SIGKILL");
    } catch { /* gone */ }
  }
  await supervisord.stop("SIGKILL");
  await Deno.remove(dataDir, { recursive: true }).catch(() => {});
}
