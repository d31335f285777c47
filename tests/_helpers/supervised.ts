/**
 * Boots the whole container stack the way the image does: the real supervisord
 * on the repository's supervisord.conf, with Litestream (npm's binary), the
 * pinned denokv and Supercronic first on PATH, and fauxqs as S3. Shared by the
 * stack tests, the fault matrix and the restore, metrics and console tests,
 * with /proc helpers to find, signal and measure the stack's processes.
 */
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";
import {
  DENO,
  DENOKV_BIN,
  freePort,
  KV_SERVER,
  openRemoteKv,
  ROOT,
  Running,
  TEST_PATH,
  TEST_TOKEN,
  TOOLS,
  waitFor,
} from "./processes.ts";
import type { FauxS3 } from "./s3.ts";

/**
 * npm's `litestream` launcher is a node wrapper that does not forward signals;
 * the binary it wraps sits next to it and is what the image runs.
 */
export const LITESTREAM_DIR: string = join(ROOT, "node_modules/@flydotio/litestream-linux-x64");
/** The official denokv's folder, or null when the tests run the stand-in (`KV_SERVER=standin`). */
export const DENOKV_DIR: string | null = KV_SERVER === "official" ? dirname(DENOKV_BIN) : null;
/** Supercronic's folder, when installed (`deno task setup`). */
export const SUPERCRONIC_DIR: string | null = existsSync(
    join(TOOLS.supercronicBinDir, "supercronic"),
  )
  ? TOOLS.supercronicBinDir
  : null;
/** PATH for a stack: Litestream's binary, then TEST_PATH (the denokv in use, Supercronic). */
export const STACK_PATH: string = `${LITESTREAM_DIR}:${TEST_PATH}`;
/** A stack boots in seconds; the machine is shared, so this is generous. */
export const BOOT_TIMEOUT_MS = 90_000;

/** One supervisord run over a data directory. */
export interface Stack {
  supervisord: Running;
  dataDir: string;
  dbPath: string;
  denokvUrl: string;
  port: number;
  denokvPort: number;
  litestreamPort: number;
  startedAt: number;
  url: string;
  env: Record<string, string>;
}

/** Options for {@linkcode startSupervisord}. */
export interface StackOptions {
  ports?: { port: number; denokvPort: number; litestreamPort?: number };
  /** Extra or overriding environment (e.g. `ACCESS_LOG`, `SMTP_*`, `CRONTAB_PATH`). */
  env?: Record<string, string>;
}

/** A crontab with no job, so Supercronic runs but nothing fires unless a test asks. */
async function emptyCrontab(dataDir: string): Promise<string> {
  const path = join(dataDir, "..", "crontab.empty");
  await Deno.writeTextFile(path, "# no job in this test\n");
  return path;
}

/** Starts `supervisord -n -c supervisord.conf` with a clean environment. */
export async function startSupervisord(
  dataDir: string,
  s3: Record<string, string>,
  opts: StackOptions = {},
): Promise<Stack> {
  const port = opts.ports?.port ?? freePort();
  const denokvPort = opts.ports?.denokvPort ?? freePort();
  const litestreamPort = opts.ports?.litestreamPort ?? freePort();
  await Deno.mkdir(dataDir, { recursive: true });
  const env: Record<string, string> = {
    PATH: STACK_PATH,
    HOME: Deno.env.get("HOME") ?? "/tmp",
    DENO_BIN: DENO,
    DENO_DIR: Deno.env.get("DENO_DIR") ?? join(Deno.env.get("HOME") ?? "/tmp", ".cache/deno"),
    APP_DIR: ROOT.replace(/\/$/, ""),
    DATA_DIR: dataDir,
    DB_PATH: join(dataDir, "denokv.sqlite"),
    PORT: String(port),
    HOSTNAME_BIND: "127.0.0.1",
    DENOKV_URL: `http://127.0.0.1:${denokvPort}`,
    LITESTREAM_ADDR: `127.0.0.1:${litestreamPort}`,
    DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
    CRONTAB_PATH: await emptyCrontab(dataDir),
    ACCESS_LOG: "off",
    ...s3,
    ...opts.env,
  };
  const startedAt = performance.now();
  const child = new Deno.Command("supervisord", {
    args: ["-n", "-c", join(ROOT, "supervisord.conf")],
    cwd: ROOT,
    env,
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const supervisord = new Running("supervisord", child, port);
  return {
    supervisord,
    dataDir,
    dbPath: env.DB_PATH,
    denokvUrl: env.DENOKV_URL,
    port,
    denokvPort,
    litestreamPort,
    startedAt,
    url: supervisord.url,
    env,
  };
}

/** A stack that stops itself at the end of a `using` block and runs tasks "on the machine". */
export interface SupervisedStack extends Stack {
  /** Runs `deno task <name> ...args` from the repository root with the stack's environment. */
  task(name: string, args: string[]): Promise<{ code: number; stdout: string; stderr: string }>;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Boots a stack over `dataDir` replicating to `replicaPath` in `s3`; waits for /healthz 200. */
export async function startSupervised(
  s3: FauxS3,
  opts: { dataDir: string; replicaPath: string; env?: Record<string, string> },
): Promise<SupervisedStack> {
  const base = await startSupervisord(opts.dataDir, s3.env(opts.replicaPath), { env: opts.env });
  const stack: SupervisedStack = {
    ...base,
    async task(name, args) {
      const out = await new Deno.Command(DENO, {
        args: ["task", "-q", name, ...args],
        cwd: ROOT,
        env: base.env,
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
    [Symbol.asyncDispose]: () => cleanup(base),
  };
  try {
    await waitHealthy(stack);
  } catch (err) {
    await cleanup(stack);
    throw err;
  }
  return stack;
}

/** `/healthz`'s status, or 0 when the proxy does not answer. */
export async function healthz(url: string): Promise<number> {
  const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(5_000) })
    .catch(() => null);
  await res?.body?.cancel();
  return res?.status ?? 0;
}

/** `/healthz`'s status and text. */
export async function healthzText(url: string): Promise<{ status: number; text: string }> {
  const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(5_000) });
  return { status: res.status, text: await res.text() };
}

/** Waits for /healthz 200; returns ms since supervisord was spawned. */
export async function waitHealthy(stack: Stack, timeoutMs = BOOT_TIMEOUT_MS): Promise<number> {
  await waitFor("the stack to answer /healthz with 200", async () => {
    const status = await Promise.race([stack.supervisord.done, Promise.resolve(null)]);
    if (status) throw new Error(`supervisord exited ${status.code}: ${stack.supervisord.output}`);
    return (await healthz(stack.url)) === 200;
  }, { timeoutMs, intervalMs: 100 }).catch((err) => {
    throw new Error(`${err.message}\n--- supervisord output ---\n${stack.supervisord.output}`);
  });
  return performance.now() - stack.startedAt;
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

/** A process's command line, or "" once it is gone. */
export function cmdline(pid: number): string {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/cmdline`).replaceAll("\0", " ").trim();
  } catch {
    return "";
  }
}

/** Whether `pid` still exists and is not a zombie. */
export function alive(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return stat.slice(stat.lastIndexOf(")") + 2)[0] !== "Z";
  } catch {
    return false;
  }
}

/** Every live process on the machine whose command line matches `pattern`. */
export function processesMatching(pattern: RegExp): number[] {
  const out: number[] = [];
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    const pid = Number(entry.name);
    if (pattern.test(cmdline(pid)) && alive(pid)) out.push(pid);
  }
  return out;
}

/** The stack's processes whose command line matches `pattern`. */
export function stackProcesses(stack: Stack, pattern: RegExp): number[] {
  return descendants(stack.supervisord.child.pid).filter((p) =>
    pattern.test(cmdline(p)) && alive(p)
  );
}

/** The one denokv server of a stack (the official binary or the stand-in). */
export const DENOKV_PROCESS: RegExp = /^(?!.*litestream).*--sqlite-path \S+ serve/;
/** The one `litestream replicate` of a stack. */
export const LITESTREAM_PROCESS: RegExp = /litestream replicate/;
/** The proxy of a stack. */
export const PROXY_PROCESS: RegExp = /proxy\/main\.ts/;

/** Waits for exactly one process of the stack matching `pattern`; returns its pid. */
export async function onlyProcess(stack: Stack, pattern: RegExp, timeoutMs = 30_000) {
  let pid = 0;
  await waitFor(`one process matching ${pattern}`, () => {
    const found = stackProcesses(stack, pattern);
    pid = found[0] ?? 0;
    return found.length === 1;
  }, { timeoutMs });
  return pid;
}

/** Resident memory of `pid` in KiB. */
export function rssKiB(pid: number): number {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  return Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
}

/** CPU time (user + system) of `pid` in clock ticks (1/100 s on Linux). */
export function cpuTicks(pid: number): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]);
}

/** Sends `signal` to `pid`, ignoring a process already gone. */
export function kill(pid: number, signal: Deno.Signal): void {
  try {
    Deno.kill(pid, signal);
  } catch { /* already gone */ }
}

/** SIGKILLs supervisord and every process under it, as a machine crash would. */
export async function killAll(stack: Stack): Promise<void> {
  const pid = stack.supervisord.child.pid;
  const all = descendants(pid);
  kill(pid, "SIGKILL");
  for (const p of all) kill(p, "SIGKILL");
  await stack.supervisord.done;
  await waitFor("every stack process to be gone", () => all.every((p) => !alive(p)));
}

/** Stops a stack for good, whatever state it is in. */
export async function cleanup(stack: Stack): Promise<void> {
  await killAll(stack).catch(() => {});
}

/** The generations Litestream has created under `prefix`. */
export async function generations(s3: FauxS3, prefix: string): Promise<Set<string>> {
  const keys = await s3.keys(`${prefix}/generations/`);
  return new Set(keys.map((k) => k.split("/")[2]));
}

/** Restores the replica to a fresh file with the real Litestream and the repo's litestream.yml. */
export async function restoreCopy(s3: FauxS3, replicaPath: string): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "denokv-restore-" });
  const out = join(dir, "restored.sqlite");
  const res = await new Deno.Command(join(LITESTREAM_DIR, "litestream"), {
    args: ["restore", "-config", join(ROOT, "litestream.yml"), "-o", out, "/data/denokv.sqlite"],
    env: { ...s3.env(replicaPath), DB_PATH: "/data/denokv.sqlite", LITESTREAM_ADDR: "" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.deepEqual(res.code, 0, new TextDecoder().decode(res.stderr));
  return out;
}

/** The value of `key` in the replica's latest state (restored to a temporary file). */
export async function replicaValue(
  s3: FauxS3,
  replicaPath: string,
  key: Deno.KvKey,
): Promise<unknown> {
  const restored = await restoreCopy(s3, replicaPath);
  const kv = await Deno.openKv(restored);
  try {
    return (await kv.get(key)).value;
  } finally {
    kv.close();
    await Deno.remove(join(restored, ".."), { recursive: true }).catch(() => {});
  }
}

/** Waits until the replica holds `value` at `key`; returns the ms it took. */
export async function waitInReplica(
  s3: FauxS3,
  replicaPath: string,
  key: Deno.KvKey,
  value: unknown,
  timeoutMs = 60_000,
): Promise<number> {
  const start = performance.now();
  await waitFor(`${JSON.stringify(key)} = ${JSON.stringify(value)} in the replica`, async () => {
    return JSON.stringify(await replicaValue(s3, replicaPath, key)) === JSON.stringify(value);
  }, { timeoutMs, intervalMs: 1_000 });
  return performance.now() - start;
}

/**
 * The repository's crontab with only the schedule fields of each job line
 * replaced by "every minute": the command Supercronic runs is the exact line.
 */
export async function everyMinuteCrontab(dir: string): Promise<string> {
  const text = await Deno.readTextFile(join(ROOT, "crontab"));
  const variant = text.split("\n").map((line) =>
    line.trim() === "" || line.trim().startsWith("#")
      ? line
      : line.trim().replace(/^(\S+\s+){5}/, "* * * * * ")
  ).join("\n");
  const path = join(dir, "crontab.every-minute");
  await Deno.writeTextFile(path, variant);
  return path;
}

/** Writes `value` at `key` through the proxy with a real client (acknowledged on return). */
export async function write(stack: Stack, key: Deno.KvKey, value: unknown): Promise<void> {
  const kv = await openRemoteKv(stack.url);
  try {
    await kv.set(key, value);
  } finally {
    kv.close();
  }
}

/** Reads `key` through the proxy with a real client. */
export async function read(stack: Stack, key: Deno.KvKey): Promise<unknown> {
  const kv = await openRemoteKv(stack.url);
  try {
    return (await kv.get(key)).value;
  } finally {
    kv.close();
  }
}
