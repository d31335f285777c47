/**
 * The container stack under the real supervisord (the repository's
 * supervisord.conf with temporary APP_DIR/DATA_DIR, npm's Litestream 0.3.13
 * and the denokv on PATH first), replicating to a fauxqs bucket. Used by the
 * restore, metrics and console tests; tests/stack_test.ts keeps its own copy
 * of the same steps.
 */
import { existsSync } from "node:fs";
import { join } from "node:path";
import { DENO, freePort, ROOT, Running, TEST_PATH, TEST_TOKEN, waitFor } from "./processes.ts";
import type { FauxS3 } from "./s3.ts";

/** npm's `litestream` launcher is a node wrapper; the binary it wraps is what the image runs. */
export const LITESTREAM_DIR = join(ROOT, "node_modules/@flydotio/litestream-linux-x64");
const BOOT_TIMEOUT_MS = 60_000;

/** One supervisord run over a data directory. */
export interface SupervisedStack {
  supervisord: Running;
  dataDir: string;
  dbPath: string;
  url: string;
  denokvUrl: string;
  /** The environment every program of the stack sees; scripts run on the "machine" get it too. */
  env: Record<string, string>;
  /** Runs `deno task <name> ...args` from the repository root with the stack's environment. */
  task(name: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Boots supervisord over `dataDir` replicating to `replicaPath` in `s3`; waits for /healthz 200. */
export async function startSupervised(
  s3: FauxS3,
  opts: { dataDir: string; replicaPath: string; env?: Record<string, string> },
): Promise<SupervisedStack> {
  const port = freePort();
  const denokvPort = freePort();
  const env: Record<string, string> = {
    PATH: `${LITESTREAM_DIR}:${TEST_PATH}`,
    HOME: Deno.env.get("HOME") ?? "/tmp",
    DENO_BIN: DENO,
    DENO_DIR: Deno.env.get("DENO_DIR") ?? join(Deno.env.get("HOME") ?? "/tmp", ".cache/deno"),
    APP_DIR: ROOT.replace(/\/$/, ""),
    DATA_DIR: opts.dataDir,
    DB_PATH: join(opts.dataDir, "denokv.sqlite"),
    PORT: String(port),
    HOSTNAME_BIND: "127.0.0.1",
    DENOKV_URL: `http://127.0.0.1:${denokvPort}`,
    DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
    SUPERCRONIC_AUTOSTART: "false",
    ACCESS_LOG: "off",
    ...s3.env(opts.replicaPath),
    ...opts.env,
  };
  await Deno.mkdir(opts.dataDir, { recursive: true });
  const child = new Deno.Command("supervisord", {
    args: ["-n", "-c", join(ROOT, "supervisord.conf")],
    cwd: ROOT,
    env,
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const supervisord = new Running("supervisord", child, port);
  const stack: SupervisedStack = {
    supervisord,
    dataDir: opts.dataDir,
    dbPath: env.DB_PATH,
    url: supervisord.url,
    denokvUrl: env.DENOKV_URL,
    env,
    async task(name, args) {
      const out = await new Deno.Command(DENO, {
        args: ["task", "-q", name, ...args],
        cwd: ROOT,
        env,
        clearEnv: true,
        stdout: "piped",
        stderr: "piped",
      }).output();
      const decoder = new TextDecoder();
      return {
        code: out.code,
        stdout: decoder.decode(out.stdout),
        stderr: decoder.decode(out.stderr),
      };
    },
    [Symbol.asyncDispose]: () => killAll(supervisord),
  };
  try {
    await waitHealthy(stack);
  } catch (err) {
    await killAll(supervisord);
    throw err;
  }
  return stack;
}

async function healthz(url: string): Promise<number> {
  const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(5_000) });
  await res.body?.cancel();
  return res.status;
}

/** Waits for /healthz 200, failing at once if supervisord exits. */
export async function waitHealthy(stack: SupervisedStack, timeoutMs = BOOT_TIMEOUT_MS) {
  await waitFor("the stack to answer /healthz with 200", async () => {
    const status = await Promise.race([stack.supervisord.done, Promise.resolve(null)]);
    if (status) throw new Error(`supervisord exited ${status.code}: ${stack.supervisord.output}`);
    return (await healthz(stack.url)) === 200;
  }, { timeoutMs, intervalMs: 100 }).catch((err) => {
    throw new Error(`${err.message}\n--- supervisord output ---\n${stack.supervisord.output}`);
  });
}

/** Every process below `pid` (from /proc), children first. */
export function descendants(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      const list = children.get(ppid) ?? [];
      list.push(Number(entry.name));
      children.set(ppid, list);
    } catch { /* exited meanwhile */ }
  }
  const out: number[] = [];
  const walk = (p: number) => {
    for (const c of children.get(p) ?? []) {
      walk(c);
      out.push(c);
    }
  };
  walk(pid);
  return out;
}

/** The command line of `pid`, or "" once it is gone. */
export function cmdline(pid: number): string {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/cmdline`).replaceAll("\0", " ").trim();
  } catch {
    return "";
  }
}

/** SIGKILLs supervisord and every process under it. */
async function killAll(supervisord: Running): Promise<void> {
  const pid = supervisord.child.pid;
  const all = descendants(pid);
  for (const p of [pid, ...all]) {
    try {
      Deno.kill(p, "SIGKILL");
    } catch { /* already gone */ }
  }
  await supervisord.done;
  await waitFor("every stack process to be gone", () => all.every((p) => !existsSync(`/proc/${p}`)))
    .catch(() => {});
}
