/**
 * Console sessions and the login throttle. A session is a random id in an
 * HttpOnly, SameSite=Strict cookie that maps, in this process only, to its
 * CSRF token and expiry: the cookie never holds the access token, and a
 * restart of the proxy logs everyone out.
 */
import { timingSafeEqual } from "node:crypto";

/** How long a session lasts without being used. */
export const SESSION_IDLE_MS = 12 * 60 * 60 * 1000;
/** The cookie's name. */
export const SESSION_COOKIE = "denokv_console";

/** One logged-in browser. */
export interface Session {
  id: string;
  csrf: string;
  expires: number;
}

function randomId(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_")
    .replace(/=+$/, "");
}

/** The sessions of this proxy process. */
export class Sessions {
  #byId = new Map<string, Session>();

  create(now = Date.now()): Session {
    const session = { id: randomId(), csrf: randomId(), expires: now + SESSION_IDLE_MS };
    this.#byId.set(session.id, session);
    return session;
  }

  /** The live session of `id`, its expiry pushed back; undefined if unknown or expired. */
  get(id: string | undefined, now = Date.now()): Session | undefined {
    if (!id) return undefined;
    const session = this.#byId.get(id);
    if (!session) return undefined;
    if (session.expires <= now) {
      this.#byId.delete(id);
      return undefined;
    }
    session.expires = now + SESSION_IDLE_MS;
    return session;
  }

  delete(id: string): void {
    this.#byId.delete(id);
  }
}

/** True when `given` is the session's CSRF token (constant time). */
export function csrfMatches(session: Session, given: unknown): boolean {
  if (typeof given !== "string") return false;
  const a = new TextEncoder().encode(given);
  const b = new TextEncoder().encode(session.csrf);
  return a.length === b.length && timingSafeEqual(a, b);
}

/** First wrong token: answered after this long; each further one doubles it... */
export const THROTTLE_BASE_MS = 250;
/** ...up to this. */
export const THROTTLE_MAX_MS = 8_000;
/** Failures older than this are forgotten. */
const THROTTLE_FORGET_MS = 15 * 60 * 1000;
/** Past this many clients, forgotten ones are dropped so guesses from many addresses cannot grow memory. */
const THROTTLE_MAX_CLIENTS = 10_000;

/**
 * Slows down token guessing per client: the answer to each attempt waits
 * `THROTTLE_BASE_MS * 2^(failures-1)` (capped), and a client may have one
 * attempt in flight at a time, so parallel guesses are refused, not queued.
 */
export class LoginThrottle {
  #clients = new Map<string, { failures: number; last: number; busy: boolean }>();

  #forget(now: number): void {
    for (const [client, state] of this.#clients) {
      if (!state.busy && now - state.last > THROTTLE_FORGET_MS) this.#clients.delete(client);
    }
  }

  /** The wait before answering `client`'s next attempt. */
  delayMs(client: string, now = Date.now()): number {
    const state = this.#clients.get(client);
    if (!state || now - state.last > THROTTLE_FORGET_MS || state.failures === 0) return 0;
    return Math.min(THROTTLE_BASE_MS * 2 ** (state.failures - 1), THROTTLE_MAX_MS);
  }

  /**
   * Runs `check` for `client` after the client's delay; undefined when an
   * attempt of the same client is still in flight.
   */
  async attempt(client: string, check: () => boolean): Promise<boolean | undefined> {
    const now = Date.now();
    let state = this.#clients.get(client);
    if (state?.busy) return undefined;
    if (!state || now - state.last > THROTTLE_FORGET_MS) {
      if (this.#clients.size >= THROTTLE_MAX_CLIENTS) this.#forget(now);
      state = { failures: 0, last: now, busy: false };
      this.#clients.set(client, state);
    }
    state.busy = true;
    try {
      const wait = this.delayMs(client, now);
      if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      const ok = check();
      state.failures = ok ? 0 : state.failures + 1;
      state.last = Date.now();
      return ok;
    } finally {
      state.busy = false;
    }
  }
}
