/**
 * Reads a request body whole within a deadline. One interval timer serves
 * every body in flight (a timer per request costs a visible share of the
 * proxy's CPU), and the common case, a body already in with its headers,
 * never touches it.
 */

/** The body did not arrive in time. */
export class BodyTimeout extends Error {
  override name = "BodyTimeout";
}

interface Pending {
  deadline: number;
  fail: (err: Error) => void;
}

const pending = new Set<Pending>();
let sweeper: ReturnType<typeof setInterval> | undefined;

function sweep(): void {
  const now = Date.now();
  for (const p of pending) {
    if (p.deadline > now) continue;
    pending.delete(p);
    p.fail(new BodyTimeout(`the request body did not arrive within the time allowed`));
  }
  if (pending.size === 0) {
    clearInterval(sweeper);
    sweeper = undefined;
  }
}

/**
 * The body of `req`, or a {@linkcode BodyTimeout} when it has not arrived
 * `timeoutMs` (plus at most 250 ms) after the call.
 *
 * @example
 * ```ts
 * import { readBodyWithin } from "./body.ts";
 * const body = await readBodyWithin(new Request("http://x/", { method: "POST", body: "hi" }), 1000);
 * if (new TextDecoder().decode(body) !== "hi") throw new Error("wrong body");
 * ```
 */
export function readBodyWithin(
  req: Request,
  timeoutMs: number,
): Promise<Uint8Array<ArrayBuffer>> {
  return new Promise((resolve, reject) => {
    const entry: Pending = { deadline: Date.now() + timeoutMs, fail: reject };
    req.arrayBuffer().then((buf) => {
      pending.delete(entry);
      resolve(new Uint8Array(buf));
    }, (err) => {
      pending.delete(entry);
      reject(err);
    });
    // Added after the read started: a body already here resolves first and
    // removes the entry before any sweep sees it.
    pending.add(entry);
    if (sweeper === undefined) {
      sweeper = setInterval(sweep, Math.min(250, Math.max(10, Math.floor(timeoutMs / 4))));
      Deno.unrefTimer(sweeper);
    }
  });
}
