/**
 * Boots the real processes end-to-end tests talk to: the official denokv (the
 * pinned release `scripts/dev/install.ts` builds; the stand-in in `tests/bin`
 * only when `KV_SERVER=standin`) and the proxy (`proxy/main.ts`), each on a
 * free loopback port, with their output captured.
 */
import { fileURLToPath } from "node:url";
import { join } from "node:path";
import { existsSync, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { cacheDir, pinsFrom, toolPaths } from "../../scripts/dev/tools.ts";
import { startTap, type Tap } from "./tap.ts";

/** The repository root. */
export const ROOT: string = fileURLToPath(new URL("../..", import.meta.url));
/** The deno binary that runs these tests. */
export const DENO: string = Deno.execPath();
/** A token long enough for denokv. */
export const TEST_TOKEN = "test-token-0123456789";
/** The pinned tool versions and where they are installed on this machine. */
export const TOOLS = toolPaths(
  pinsFrom(readFileSync(join(ROOT, "Dockerfile"), "utf8")),
  cacheDir(),
);
/** Which denokv the tests run: `official` (default) or `standin` (`KV_SERVER=standin`). */
export const KV_SERVER: "official" | "standin" = Deno.env.get("KV_SERVER") === "standin"
  ? "standin"
  : "official";
/** The denokv binary tests start. */
export const DENOKV_BIN = KV_SERVER === "standin"
  ? join(ROOT, "tests/bin/denokv")
  : join(TOOLS.denokvBinDir, "denokv");
if (!existsSync(DENOKV_BIN)) {
  throw new Error(
    `${DENOKV_BIN} is missing: run "deno task setup" (cargo install of the pinned denokv)`,
  );
}
/** PATH with the denokv in use, Supercronic and node_modules/.bin first, as tests run configs. */
export const TEST_PATH = [
  KV_SERVER === "standin" ? join(ROOT, "tests/bin") : TOOLS.denokvBinDir,
  TOOLS.supercronicBinDir,
  join(ROOT, "node_modules/.bin"),
  Deno.env.get("PATH") ?? "",
].join(":");

/** A running child process whose combined output is kept for assertions. */
export class Running {
  #output: string[] = [];
  /** The exit status once the process has ended, else null. */
  exited: Deno.CommandStatus | null = null;
  readonly done: Promise<Deno.CommandStatus>;
  constructor(readonly name: string, readonly child: Deno.ChildProcess, readonly port: number) {
    const keep = async (stream: ReadableStream<Uint8Array>) => {
      for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
        this.#output.push(chunk);
        if (Deno.env.get("TEST_VERBOSE")) Deno.stderr.writeSync(new TextEncoder().encode(chunk));
      }
    };
    const piped = Promise.all([keep(child.stdout), keep(child.stderr)]);
    this.done = child.status.then(async (status) => {
      await piped.catch(() => {});
      this.exited = status;
      return status;
    });
  }
  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }
  get output(): string {
    return this.#output.join("");
  }
  /** Sends `signal` and waits for the exit. */
  async stop(signal: Deno.Signal = "SIGTERM"): Promise<Deno.CommandStatus> {
    try {
      this.child.kill(signal);
    } catch { /* already gone */ }
    return await this.done;
  }
  async [Symbol.asyncDispose](): Promise<void> {
    await this.stop("SIGKILL");
  }
  /** Waits until `probe` answers true; fails at once, with the output, if the process exits. */
  async untilServing(what: string, probe: () => Promise<boolean>): Promise<void> {
    await waitFor(what, async () => this.exited !== null || await probe());
    if (this.exited) throw new Error(`${this.name} exited ${this.exited.code}: ${this.output}`);
  }
}

/** Shared by every test file of a run, parallel ones included: port claims and the token lock. */
const SHARED_TMP = Deno.env.get("TMPDIR") ?? "/tmp";
/** Where {@linkcode freePort} records the ports it hands out. */
const PORT_CLAIMS = join(SHARED_TMP, "denokv-on-fly-ports");
mkdirSync(PORT_CLAIMS, { recursive: true });
/** How long a handed-out port stays claimed: time enough for the process given it to bind it. */
const PORT_CLAIM_MS = 120_000;

/**
 * A free loopback port for a process a test is about to start. Taken below the
 * kernel's ephemeral range (`ip_local_port_range`, 32768+ by default), so no
 * `port: 0` listener or outgoing connection is handed the same port before the
 * process binds it; claimed by a file, so test files running in parallel
 * (threads of one process, or separate processes) never get the same port.
 */
export function freePort(): number {
  for (let attempt = 0; attempt < 1000; attempt++) {
    const port = 20_000 + Math.floor(Math.random() * 12_000);
    const claim = join(PORT_CLAIMS, String(port));
    try {
      if (Date.now() - statSync(claim).mtimeMs < PORT_CLAIM_MS) continue;
      rmSync(claim, { force: true });
    } catch { /* unclaimed */ }
    try {
      writeFileSync(claim, String(Deno.pid), { flag: "wx" });
    } catch {
      continue; // another test file claimed it just now
    }
    try {
      Deno.listen({ hostname: "127.0.0.1", port }).close();
      return port;
    } catch {
      continue; // in use by something else; the claim keeps others off it too
    }
  }
  throw new Error("no free port between 20000 and 32000");
}

/** Waits until `check` resolves true, polling every `intervalMs`, or throws after `timeoutMs`. */
export async function waitFor(
  what: string,
  check: () => Promise<boolean> | boolean,
  { timeoutMs = 15_000, intervalMs = 50 } = {},
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  while (Date.now() < deadline) {
    try {
      if (await check()) return;
    } catch (err) {
      last = err;
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
  throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${last}` : ""}`);
}

async function answers(url: string): Promise<boolean> {
  try {
    const res = await fetch(url, { method: "POST", body: "{}" });
    await res.body?.cancel();
    return true;
  } catch {
    return false;
  }
}

/** Options for {@linkcode startDenokv}. */
export interface StandinStart {
  sqlitePath: string;
  token?: string;
  port?: number;
  env?: Record<string, string>;
}

/** Starts `denokv --sqlite-path P serve --addr 127.0.0.1:PORT` ({@linkcode DENOKV_BIN}) and waits. */
export async function startDenokv(opts: StandinStart): Promise<Running> {
  const port = opts.port ?? freePort();
  const child = new Deno.Command(DENOKV_BIN, {
    args: ["--sqlite-path", opts.sqlitePath, "serve", "--addr", `127.0.0.1:${port}`],
    env: {
      PATH: TEST_PATH,
      DENO_BIN: DENO,
      DENO_KV_ACCESS_TOKEN: opts.token ?? TEST_TOKEN,
      ...opts.env,
    },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const running = new Running("denokv", child, port);
  await running.untilServing(`${KV_SERVER} denokv to listen`, () => answers(running.url));
  return running;
}

/** The former name of {@linkcode startDenokv}, kept for tests written before the switch. */
export const startStandin = startDenokv;

/** Options for {@linkcode startProxy}. */
export interface ProxyStart {
  denokvUrl: string;
  token?: string;
  port?: number;
  libDir?: string;
  dataDir?: string;
  env?: Record<string, string>;
}

/** Starts `deno run proxy/main.ts` the way supervisord does and waits for it. */
export async function startProxy(opts: ProxyStart): Promise<Running> {
  const port = opts.port ?? freePort();
  const env: Record<string, string> = {
    PATH: TEST_PATH,
    DENO_KV_ACCESS_TOKEN: opts.token ?? TEST_TOKEN,
    PORT: String(port),
    HOSTNAME_BIND: "127.0.0.1",
    DENOKV_URL: opts.denokvUrl,
    ...opts.env,
  };
  if (opts.libDir) env.LIB_DIR = opts.libDir;
  if (opts.dataDir) env.DATA_DIR = opts.dataDir;
  const child = new Deno.Command(DENO, {
    args: [
      "run",
      "--unstable-no-legacy-abort",
      "--allow-net",
      "--allow-env",
      "--allow-read",
      join(ROOT, "proxy/main.ts"),
    ],
    cwd: ROOT,
    env,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const running = new Running("proxy", child, port);
  await running.untilServing("the proxy to listen", async () => {
    const res = await fetch(`${running.url}/`).catch(() => null);
    await res?.body?.cancel();
    return res !== null;
  });
  return running;
}

/** A denokv plus a proxy in front of it, in a fresh temp dir. */
export interface Stack {
  dir: string;
  denokv: Running;
  proxy: Running;
  /** With `tap: true`: what passed between the proxy and denokv. */
  tap?: Tap;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Boots denokv and a proxy over a fresh database. */
export async function startStack(
  opts: {
    token?: string;
    libDir?: string;
    proxyEnv?: Record<string, string>;
    denokvEnv?: Record<string, string>;
    /** Put a {@linkcode Tap} between the proxy and denokv. */
    tap?: boolean;
  } = {},
): Promise<Stack> {
  const dir = await Deno.makeTempDir({ prefix: "denokv-test-" });
  const denokv = await startDenokv({
    sqlitePath: join(dir, "denokv.sqlite"),
    token: opts.token,
    env: opts.denokvEnv,
  });
  const tap = opts.tap ? startTap(denokv.url) : undefined;
  const proxy = await startProxy({
    denokvUrl: tap?.url ?? denokv.url,
    token: opts.token,
    libDir: opts.libDir,
    dataDir: dir,
    env: opts.proxyEnv,
  });
  return {
    dir,
    denokv,
    proxy,
    tap,
    async [Symbol.asyncDispose]() {
      await proxy.stop("SIGKILL");
      await tap?.[Symbol.asyncDispose]();
      await denokv.stop("SIGKILL");
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    },
  };
}

/**
 * Opens a real KV Connect client on `url` with `token`. The client reads its token
 * from the process environment when the database opens, and `deno test --parallel`
 * runs test files as threads of one process: a file lock keeps one setting of the
 * variable and the open that reads it together.
 */
export async function openRemoteKv(url: string, token = TEST_TOKEN): Promise<Deno.Kv> {
  using lock = await Deno.open(join(SHARED_TMP, "denokv-on-fly-openkv.lock"), {
    create: true,
    write: true,
  });
  await lock.lock(true);
  Deno.env.set("DENO_KV_ACCESS_TOKEN", token);
  return await Deno.openKv(url);
}
