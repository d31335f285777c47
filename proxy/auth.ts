/**
 * The proxy's one access-token check, shared by the KV Connect path, `/status`,
 * `/metrics` and the console's login: the same token rules as denokv (any printable ASCII, at
 * least 12 characters, sent as `Authorization: Bearer <token>`), compared in
 * constant time from the headers alone, before any body byte is read.
 */
import type { MiddlewareHandler } from "hono";
import { cuttingAnswer } from "./closing.ts";

/** denokv refuses shorter tokens (`run_serve` in denokv's main.rs). */
export const MIN_TOKEN_LENGTH = 12;

/**
 * Visible ASCII and inner spaces: what an HTTP header value carries unchanged.
 * The Deno client refuses anything else in a header, and HTTP trims spaces at
 * either end, so such a token could never match.
 */
const PRINTABLE = /^[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?$/;

/**
 * Checks a token from the environment; throws an Error that says what is
 * wrong (never what the token is).
 *
 * @example
 * ```ts
 * import { validateToken } from "./auth.ts";
 * validateToken("any:printable!#token");
 * let message = "";
 * try {
 *   validateToken("tab\tinside-token");
 * } catch (err) {
 *   message = (err as Error).message;
 * }
 * if (!message.includes("printable ASCII")) throw new Error("accepted a tab");
 * ```
 */
export function validateToken(token: string | undefined, name = "DENO_KV_ACCESS_TOKEN"): string {
  const value = token ?? "";
  if (value.length < MIN_TOKEN_LENGTH) {
    throw new Error(`${name} must be at least ${MIN_TOKEN_LENGTH} characters: got ${value.length}`);
  }
  if (!PRINTABLE.test(value)) {
    const bad = [...value].findIndex((ch, i) =>
      !/[\x20-\x7e]/.test(ch) || ((i === 0 || i === value.length - 1) && ch === " ")
    );
    throw new Error(
      `${name} must be printable ASCII (letters, digits, punctuation, inner spaces) so an ` +
        `Authorization header can carry it: character ${bad + 1} of ${value.length} is not`,
    );
  }
  return value;
}

/** A predicate that tells whether a string equals `expected`, in time that depends only on `expected`'s length. */
function equalsChecker(expected: string): (given: string | null | undefined) => boolean {
  const bytes = new TextEncoder().encode(expected);
  return (given) => {
    const text = given ?? "";
    let diff = text.length ^ bytes.length;
    for (let i = 0; i < bytes.length; i++) {
      // charCodeAt past the end is NaN, which `| 0` makes 0: no early exit either way.
      diff |= bytes[i] ^ (text.charCodeAt(i) | 0);
    }
    return diff === 0;
  };
}

/**
 * Returns a predicate that tells whether a token typed by a person (the
 * console's login form) is the access token, in constant time.
 */
export function tokenChecker(token: string): (given: string | null | undefined) => boolean {
  return equalsChecker(validateToken(token));
}

/**
 * Returns a predicate that tells whether an `Authorization` header value is
 * `Bearer <token>`, in time that depends only on the token's length.
 */
export function bearerChecker(
  token: string,
): (authorization: string | null | undefined) => boolean {
  return equalsChecker(`Bearer ${validateToken(token)}`);
}

/** Options for {@linkcode requireToken}. */
export interface RequireTokenOptions {
  /** The access token. */
  token: string;
}

/**
 * Middleware that answers 401 unless the request carries the token. It reads
 * headers only, and resets the connection of a request that declared a body,
 * so a client without the token can neither make the proxy hold a body nor
 * keep the connection open.
 *
 * @example
 * ```ts
 * import { Hono } from "hono";
 * import { requireToken } from "./auth.ts";
 * const app = new Hono();
 * app.get("/secret", requireToken({ token: "a-long-enough-token" }), (c) => c.text("ok"));
 * const res = await app.request("/secret", {
 *   headers: { authorization: "Bearer a-long-enough-token" },
 * });
 * if (res.status !== 200) throw new Error(`expected 200, got ${res.status}`);
 * ```
 */
export function requireToken(opts: RequireTokenOptions): MiddlewareHandler {
  const matches = bearerChecker(opts.token);
  return async (c, next) => {
    if (matches(c.req.header("authorization"))) return await next();
    // denokv's own words, so clients see the same answer with or without the proxy.
    const text = "Invalid access token.";
    const headers = { "www-authenticate": 'Bearer realm="denokv"' };
    // A declared body is never read. Over HTTP/1.x (the only requests that
    // carry a Host header: HTTP/2 has :authority instead) the connection is
    // reset after the answer, so the client can neither hold it nor make the
    // proxy buffer. An HTTP/2 answer ends just its stream, and the Deno
    // client (which speaks HTTP/2 to a plain-HTTP server) sees a clean 401.
    const declared = c.req.header("transfer-encoding") !== undefined ||
      (c.req.header("content-length") ?? "0") !== "0";
    if (declared && c.req.header("host") !== undefined) return cuttingAnswer(401, text, headers);
    return c.text(text, 401, headers);
  };
}
