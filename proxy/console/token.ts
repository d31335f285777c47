/**
 * The access-token check used by `/metrics` and the console login: a
 * constant-time comparison that accepts any printable token denokv accepts
 * (Hono's `bearerAuth` only takes token68 characters, so `:`, `!` or `#`
 * would lock an operator out). To be replaced by the shared check in
 * `proxy/auth.ts` once that lands.
 */
import { createHash, timingSafeEqual } from "node:crypto";

function digest(s: string): Uint8Array {
  return createHash("sha256").update(s, "utf8").digest();
}

/** True when `given` equals `expected`; the time taken does not depend on where they differ. */
export function tokenMatches(given: string | undefined, expected: string): boolean {
  if (given === undefined) return false;
  // Equal-length digests keep timingSafeEqual from throwing and hide the token's length.
  return timingSafeEqual(digest(given), digest(expected));
}

/** The token of an `Authorization: Bearer <token>` header, or undefined. */
export function bearerToken(header: string | undefined): string | undefined {
  const m = /^Bearer +(.+?) *$/i.exec(header ?? "");
  return m?.[1];
}
