/**
 * A `Deno.Kv` wrapper for the re-sent-commit tests: the Deno KV client re-sends
 * a write whose answer was lost or was a 5xx, even when the server applied it.
 * Here a commit can be applied and then fail the call ("lost"), be applied a
 * second time with the second answer returned ("twice"), or be kept for a
 * later replay.
 */

type Call = [method: string, args: unknown[]];
export type Mode = "lost" | "twice" | "normal";

export interface ResendingKv {
  kv: Deno.Kv;
  /** Decides, per commit, what happens to it (default: `mode` for every commit). */
  mode: (calls: readonly Call[]) => Mode;
  /** Every commit made, as its recorded calls. */
  commits: Call[][];
  /** Applies recorded commit `calls` again on the real kv (a late re-send). */
  replay(calls: readonly Call[]): Promise<Deno.KvCommitResult | Deno.KvCommitError>;
}

const RECORDED = new Set(["check", "set", "delete", "sum", "min", "max", "mutate"]);

function apply(kv: Deno.Kv, calls: readonly Call[]): Deno.AtomicOperation {
  const op = kv.atomic();
  for (const [m, args] of calls) {
    (op as unknown as Record<string, (...a: unknown[]) => unknown>)[m](...args);
  }
  return op;
}

/** Wraps `kv` so that its atomic commits misbehave as `mode` says. */
export function resendingKv(kv: Deno.Kv, mode: Mode | ((calls: readonly Call[]) => Mode)) {
  const state: ResendingKv = {
    kv: undefined as unknown as Deno.Kv,
    mode: typeof mode === "function" ? mode : () => mode,
    commits: [],
    replay: (calls) => apply(kv, calls).commit(),
  };
  const atomic = () => {
    const calls: Call[] = [];
    const real = kv.atomic();
    const protoCommit = Object.getPrototypeOf(real).commit as () => Promise<
      Deno.KvCommitResult | Deno.KvCommitError
    >;
    const op: Deno.AtomicOperation = new Proxy(real, {
      get(target, prop) {
        // A commit patched on the instance (withQueues does) wraps the one below.
        if (prop === "commit" && !Object.hasOwn(target, "commit")) {
          return async () => {
            state.commits.push(calls);
            const how = state.mode(calls);
            const first = await protoCommit.call(target);
            if (how === "normal" || !first.ok) return first;
            if (how === "lost") throw new Error("connection reset (the commit was applied)");
            return await apply(kv, calls).commit();
          };
        }
        const v = Reflect.get(target, prop, target);
        if (typeof v !== "function") return v;
        // Only the calls that end up in the request are recorded for replays.
        if (!RECORDED.has(prop as string)) return v.bind(target);
        return (...args: unknown[]) => {
          calls.push([prop as string, args]);
          v.apply(target, args);
          return op;
        };
      },
    });
    return op;
  };
  state.kv = new Proxy(kv, {
    get(target, prop) {
      if (prop === "atomic") return atomic;
      const v = Reflect.get(target, prop, target);
      return typeof v === "function" ? v.bind(target) : v;
    },
  });
  return state;
}
