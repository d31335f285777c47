/**
 * The lease's command line and its renewal loop: keeps this machine's replica
 * lease fresh (scripts/boot/lease.ts) and, when it is lost or cannot be renewed
 * in time, runs a command to stop denokv ({@linkcode keepLease}; under
 * supervisord the watchdog runs it in its own process). `hold -- <command>`
 * runs the loop on its own; without a bucket (a local run) it idles until
 * stopped. `show` prints the lease as it is in the bucket.
 *
 *     deno run -A scripts/boot/lease_cli.ts hold -- supervisorctl ... signal TERM denokv
 *     deno run -A scripts/boot/lease_cli.ts show
 */
import { holdLease, loadLeaseConfig, ReplicaLease } from "./lease.ts";

/**
 * Renews `lease` until `signal` aborts; when it is lost, runs `stop` (the
 * command that stops denokv), retried a few times because it talks to
 * supervisord, which may be busy for a moment.
 */
export function keepLease(
  lease: ReplicaLease,
  stop: string[],
  log: (line: string) => void,
  signal?: AbortSignal,
): Promise<void> {
  return holdLease(lease, {
    log,
    signal,
    async onLost() {
      for (let attempt = 1;; attempt++) {
        try {
          return await run(stop);
        } catch (err) {
          if (attempt >= 5) throw err;
          await new Promise((r) => setTimeout(r, 1_000));
        }
      }
    },
  });
}

/** Runs `argv` once; throws with its output when it fails. */
async function run(argv: string[]): Promise<void> {
  const out = await new Deno.Command(argv[0], { args: argv.slice(1), stdin: "null" }).output();
  if (!out.success) {
    const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
    throw new Error(`${argv.join(" ")} exited ${out.code}: ${text.trim()}`);
  }
}

/** Resolves on SIGTERM or SIGINT. */
function stopped(): Promise<void> {
  return new Promise((resolve) => {
    for (const signal of ["SIGTERM", "SIGINT"] as const) Deno.addSignalListener(signal, resolve);
  });
}

/** Returns the exit code. */
export async function main(args: string[], env: Record<string, string | undefined>) {
  const log = (line: string) => console.error(`lease: ${line}`);
  const [command, ...rest] = args;
  const config = loadLeaseConfig(env);
  if (!config) {
    log("no BUCKET_NAME: a local run has no shared replica, so no lease to hold");
    // Stay up until stopped: `npm start` (scripts/dev_stack.ts) ends the stack when a program exits.
    if (command === "hold") await stopped();
    return 0;
  }
  const lease = new ReplicaLease(config);
  try {
    if (command === "show") {
      const state = await lease.read();
      console.log(JSON.stringify(
        state ? { key: lease.where, ...state, stale: lease.isStale(state) } : null,
      ));
      return 0;
    }
    const stop = rest[0] === "--" ? rest.slice(1) : rest;
    if (command !== "hold" || stop.length === 0) {
      log("usage: lease_cli.ts hold -- <command that stops denokv> | lease_cli.ts show");
      return 2;
    }
    const done = new AbortController();
    stopped().then(() => done.abort());
    await keepLease(lease, stop, log, done.signal);
    return 0;
  } finally {
    lease.close();
  }
}

if (import.meta.main) {
  try {
    Deno.exit(await main(Deno.args, Deno.env.toObject()));
  } catch (err) {
    console.error(`lease: ${err instanceof Error ? err.message : err}`);
    Deno.exit(1);
  }
}
