/**
 * supervisord event listener (`[eventlistener:watchdog]`): restarts the
 * Litestream + denokv pair when it stops answering (a hung process that
 * supervisord sees as running), and takes the machine down when any program
 * goes FATAL, so Fly's restart policy brings it back whole instead of a
 * half-alive machine serving without replication. Beside that, the same
 * process renews the replica lease (scripts/boot/lease_cli.ts keepLease):
 * one Deno process instead of two saves about 40 MiB on the VM.
 *
 * Protocol (supervisord's docs, "Event Listeners"): "READY\n" on stdout, a
 * header line and a payload on stdin, "RESULT 2\nOK" on stdout. Logs go to
 * stderr.
 */
import { join } from "node:path";
import { litestreamAddr } from "./litestream_addr.ts";
import { loadLeaseConfig, ReplicaLease } from "./lease.ts";
import { keepLease } from "./lease_cli.ts";

/** The pair's program in supervisord.conf. */
export const PAIR_PROGRAM = "denokv";
/** How long the pair may fail its probes, after having answered, before it is restarted. */
export const HUNG_AFTER_MS = 20_000;
/** Time a probe may take. */
export const PROBE_TIMEOUT_MS = 3_000;
/** Time the pair gets after SIGTERM (and SIGCONT) before SIGKILL. */
export const KILL_AFTER_MS = 10_000;

/** The watchdog's validated configuration. */
export interface WatchdogConfig {
  denokvUrl: string;
  token: string;
  litestreamUrl: string;
  /** `supervisorctl -c <conf>`: how to reach this supervisord. */
  supervisorConf: string;
}

/** Reads the environment supervisord passes (see DESIGN.md's table). */
export function loadConfig(env: Record<string, string | undefined>): WatchdogConfig {
  const appDir = env.APP_DIR || "/app";
  return {
    denokvUrl: env.DENOKV_URL || "http://127.0.0.1:4513",
    token: env.DENO_KV_ACCESS_TOKEN ?? "",
    litestreamUrl: `http://${litestreamAddr(env)}/metrics`,
    supervisorConf: join(appDir, "supervisord.conf"),
  };
}

/** One event: its name and the payload's `key:value` fields. */
export interface SupervisorEvent {
  name: string;
  fields: Record<string, string>;
}

/** Parses a header or payload line of `key:value` tokens. */
export function parseTokens(line: string): Record<string, string> {
  const out: Record<string, string> = {};
  for (const token of line.trim().split(/\s+/)) {
    const at = token.indexOf(":");
    if (at > 0) out[token.slice(0, at)] = token.slice(at + 1);
  }
  return out;
}

/**
 * The decisions, free of I/O: feed it events and probe results, it says
 * when to restart the pair and when to stop the machine.
 */
export class Watchdog {
  #state = "";
  #answeredSinceStart = false;
  #failingSince: number | null = null;
  #restarting = false;

  /** Records a PROCESS_STATE_* event; returns "fatal" when the machine must stop. */
  onState(event: SupervisorEvent): "fatal" | null {
    const state = event.name.replace("PROCESS_STATE_", "");
    if (state === "FATAL") return "fatal";
    if (event.fields.processname !== PAIR_PROGRAM) return null;
    this.#state = state;
    if (state !== "RUNNING") {
      this.#answeredSinceStart = false;
      this.#failingSince = null;
      if (state === "STARTING") this.#restarting = false;
    }
    return null;
  }

  /** Whether a probe is worth making now (the pair is running and not being restarted). */
  shouldProbe(): boolean {
    return this.#state === "RUNNING" && !this.#restarting;
  }

  /**
   * Records a probe result (null: both answered; `hung`: a connection was
   * taken but no answer came in time); returns true when the pair must be
   * restarted. A pair still starting (restoring, S3 away) refuses
   * connections and is left alone; one that takes them without answering,
   * or that answered and then stopped, is hung.
   */
  onProbe(problem: string | null, now: number, hung = false): boolean {
    if (problem === null) {
      this.#answeredSinceStart = true;
      this.#failingSince = null;
      return false;
    }
    if (!this.#answeredSinceStart && !hung) return false;
    this.#failingSince ??= now;
    if (now - this.#failingSince < HUNG_AFTER_MS) return false;
    this.#restarting = true;
    this.#failingSince = null;
    this.#answeredSinceStart = false;
    return true;
  }
}

/** A probe's verdict: `problem` null when both answered; `hung` when one timed out. */
interface ProbeResult {
  problem: string | null;
  hung: boolean;
}

const isTimeout = (err: unknown) => err instanceof DOMException && err.name === "TimeoutError";

/** Asks denokv for a metadata exchange and Litestream for its metrics. */
async function probe(config: WatchdogConfig): Promise<ProbeResult> {
  let hung = false;
  const failed = (what: string) => (err: unknown) => {
    hung ||= isTimeout(err);
    return `${what}: ${err instanceof Error ? err.message : err}`;
  };
  const problems = await Promise.all([
    fetch(config.denokvUrl + "/", {
      method: "POST",
      headers: { authorization: `Bearer ${config.token}`, "content-type": "application/json" },
      body: JSON.stringify({ supportedVersions: [2, 3] }),
      signal: AbortSignal.timeout(PROBE_TIMEOUT_MS),
    }).then(async (res) => {
      await res.body?.cancel();
      return res.ok ? null : `denokv answered ${res.status}`;
    }, failed("denokv")),
    fetch(config.litestreamUrl, { signal: AbortSignal.timeout(PROBE_TIMEOUT_MS) }).then(
      async (res) => {
        await res.body?.cancel();
        return res.ok ? null : `Litestream answered ${res.status}`;
      },
      failed("Litestream"),
    ),
  ]);
  const found = problems.filter(Boolean);
  return { problem: found.length === 0 ? null : found.join("; "), hung };
}

async function supervisorctl(config: WatchdogConfig, ...args: string[]): Promise<string> {
  const out = await new Deno.Command("supervisorctl", {
    args: ["-c", config.supervisorConf, ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  return new TextDecoder().decode(out.stdout).trim();
}

function signalGroup(pgid: number, signal: Deno.Signal): void {
  try {
    Deno.kill(-pgid, signal);
  } catch { /* gone */ }
}

/**
 * Restarts the pair by its process group (supervisord puts each program in
 * its own): SIGTERM and SIGCONT, so a stopped Litestream can still make its
 * final sync, then SIGKILL. supervisord sees the exit and starts the pair.
 */
async function restartPair(config: WatchdogConfig, log: (line: string) => void): Promise<void> {
  const pid = Number(await supervisorctl(config, "pid", PAIR_PROGRAM));
  if (!Number.isInteger(pid) || pid <= 1) {
    log(`watchdog: no pid for ${PAIR_PROGRAM}; supervisord will handle it`);
    return;
  }
  signalGroup(pid, "SIGTERM");
  signalGroup(pid, "SIGCONT");
  const deadline = Date.now() + KILL_AFTER_MS;
  while (Date.now() < deadline) {
    try {
      Deno.kill(pid, "SIGCONT");
    } catch {
      return; // gone
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  log(`watchdog: ${PAIR_PROGRAM} did not stop within ${KILL_AFTER_MS} ms: SIGKILL`);
  signalGroup(pid, "SIGKILL");
}

/**
 * Stops the other programs (the pair's stop includes Litestream's final
 * sync), then ends supervisord with SIGKILL: supervisord has no way to exit
 * non-zero by itself, and a non-zero exit is what makes Fly restart the
 * machine under any restart policy.
 */
async function stopMachine(config: WatchdogConfig, failed: string, log: (line: string) => void) {
  log(`watchdog: ${failed} entered FATAL: stopping the other programs, then supervisord`);
  await supervisorctl(config, "stop", "supercronic", "proxy", PAIR_PROGRAM);
  log("watchdog: programs stopped; ending supervisord with a failure status");
  try {
    Deno.kill(Deno.ppid, "SIGKILL");
  } finally {
    Deno.exit(1);
  }
}

/**
 * Renews the replica lease the start-up step claimed, alongside the event
 * loop (timers and S3 requests never block the protocol on stdin/stdout);
 * when it is lost, stops the pair through supervisorctl, and the start-up
 * step then waits for the lease again. Without a bucket there is none.
 */
function holdReplicaLease(config: WatchdogConfig, log: (line: string) => void): void {
  const leaseConfig = loadLeaseConfig(Deno.env.toObject());
  if (!leaseConfig) return;
  const stop = ["supervisorctl", "-c", config.supervisorConf, "signal", "TERM", PAIR_PROGRAM];
  keepLease(new ReplicaLease(leaseConfig), stop, (line) => log(`lease: ${line}`)).catch((err) => {
    // supervisord restarts the watchdog, which picks the lease up again.
    log(`lease: ${err instanceof Error ? err.message : err}; restarting the watchdog`);
    Deno.exit(1);
  });
}

async function main(): Promise<void> {
  const config = loadConfig(Deno.env.toObject());
  const log = (line: string) => console.error(line);
  const dog = new Watchdog();
  const encoder = new TextEncoder();
  const write = (s: string) => Deno.stdout.writeSync(encoder.encode(s));
  const input = Deno.stdin.readable.getReader();
  let buffered = new Uint8Array(0);
  const readUntil = async (n: number | null): Promise<string> => {
    for (;;) {
      const end = n === null ? buffered.indexOf(10) : (buffered.length >= n ? n : -1);
      if (end >= 0) {
        const chunk = buffered.subarray(0, end);
        buffered = buffered.slice(n === null ? end + 1 : end);
        return new TextDecoder().decode(chunk);
      }
      const { value, done } = await input.read();
      if (done) Deno.exit(0);
      const next = new Uint8Array(buffered.length + value.length);
      next.set(buffered);
      next.set(value, buffered.length);
      buffered = next;
    }
  };
  let probing = false;
  log(`watchdog: watching ${PAIR_PROGRAM} (${config.denokvUrl}, ${config.litestreamUrl})`);
  holdReplicaLease(config, log);
  const debug = Deno.env.get("WATCHDOG_DEBUG") === "1";
  for (;;) {
    write("READY\n");
    const header = parseTokens(await readUntil(null));
    const payload = parseTokens(await readUntil(Number(header.len ?? 0)));
    write("RESULT 2\nOK");
    const name = header.eventname ?? "";
    if (debug) log(`watchdog: event ${name} ${JSON.stringify(payload)}`);
    if (name.startsWith("PROCESS_STATE_")) {
      if (dog.onState({ name, fields: payload }) === "fatal") {
        stopMachine(config, payload.processname ?? "a program", log);
      }
    } else if (name.startsWith("TICK_") && dog.shouldProbe() && !probing) {
      probing = true;
      probe(config).then(async ({ problem, hung }) => {
        if (debug) log(`watchdog: probe ${problem ?? "ok"}`);
        if (dog.onProbe(problem, Date.now(), hung)) {
          log(
            `watchdog: the pair has not answered for ${HUNG_AFTER_MS} ms (${problem}): restarting it`,
          );
          await restartPair(config, log);
        }
      }).finally(() => probing = false);
    }
  }
}

if (import.meta.main) {
  Deno.addSignalListener("SIGTERM", () => Deno.exit(0));
  await main();
}
