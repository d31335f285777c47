/**
 * A keep-alive HTTP/1.1 client for the one server the proxy forwards to
 * (denokv), for calls whose answer is read whole: `snapshot_read`,
 * `atomic_write` and the metadata exchange. The watch stream stays on
 * `fetch`.
 *
 * Why not `fetch`: measured here, Deno's `fetch` costs about three times the
 * CPU of the whole `Deno.serve` side of a forwarded KV request (see the
 * README's proxy benchmark), and on a one-vCPU machine that CPU is taken
 * from denokv. This client writes each request in one syscall, keeps a read
 * pending on idle connections so that one the server closed is dropped
 * before reuse, and parses the answer in place.
 */

/** Options of {@linkcode Upstream}. */
export interface UpstreamOptions {
  /** Time allowed for a whole answer (ms); then its connection is closed. Default 10,000. */
  timeoutMs?: number;
  /** Idle connections kept for reuse. Default 32. */
  maxIdle?: number;
  /** Connections idle longer than this are closed, not reused (ms). Default 10,000. */
  maxIdleMs?: number;
  /** Largest response head accepted (bytes). Default 64 KiB. */
  maxHeadBytes?: number;
  /** Largest response body accepted (bytes). Default 128 MiB. */
  maxBodyBytes?: number;
}

/** One request to send. */
export interface UpstreamRequest {
  method: string;
  /** Path and query, e.g. `/v2/snapshot_read`. */
  path: string;
  /** Forwarded but for hop-by-hop ones, `host` and `content-length`. */
  headers: Headers;
  body: Uint8Array;
  /** Safe to send again when a reused connection turns out closed (reads). */
  idempotent?: boolean;
  /** Time allowed for the whole answer (ms). Default: the client's `timeoutMs`. */
  timeoutMs?: number;
}

/** An answer read whole. */
export interface UpstreamResponse {
  status: number;
  /** End-to-end header lines in order, names lower-cased (no framing or hop-by-hop ones). */
  headers: [string, string][];
  body: Uint8Array<ArrayBuffer>;
}

/** The upstream could not be reached, did not answer in time, or broke the protocol. */
export class UpstreamError extends Error {
  override name = "UpstreamError";
  /**
   * True when the request was sent whole and no whole answer came: the
   * server may or may not have acted on it.
   */
  readonly sent: boolean;
  /** True when the time allowed ran out. */
  readonly timedOut: boolean;
  constructor(message: string, options: { sent?: boolean; timedOut?: boolean } = {}) {
    super(message);
    this.sent = options.sent ?? false;
    this.timedOut = options.timedOut ?? false;
  }
}

/** A request line that cannot be sent as it is (a method or path with spaces or controls). */
export class UnsendableRequest extends TypeError {
  override name = "UnsendableRequest";
}

/** Headers that describe one hop only (RFC 9110 section 7.6.1) and are never forwarded. */
export const HOP_BY_HOP: ReadonlySet<string> = new Set([
  "expect",
  "connection",
  "keep-alive",
  "proxy-authenticate",
  "proxy-authorization",
  "proxy-connection",
  "te",
  "trailer",
  "transfer-encoding",
  "upgrade",
]);

/** The header names a `Connection` header value lists (hop-by-hop as well). */
export function connectionTokens(value: string | null | undefined): string[] {
  return value?.split(",").map((s) => s.trim().toLowerCase()).filter(Boolean) ?? [];
}

const encoder = new TextEncoder();
/** Header bytes are Latin-1 by definition: no byte can fail to decode. */
const decoder = new TextDecoder("latin1");
/** A method is an HTTP token. */
const METHOD = /^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/;
/** A request target is visible ASCII: no space, no control, nothing to split a request line with. */
const TARGET = /^\/[\x21-\x7e]*$/;
const CR = 13;
const LF = 10;

/** One TCP connection with its read buffer. */
class Connection {
  buf = new Uint8Array(16 * 1024);
  /** Bytes in `buf` not consumed yet. */
  len = 0;
  idleSince = 0;
  /** When a busy connection must have its whole answer. */
  deadline = Infinity;
  timedOut = false;
  closed = false;
  /** The server ended the stream. */
  ended = false;
  #reading: Promise<number | null> | null = null;

  constructor(readonly conn: Deno.TcpConn) {}

  /** Reads more into the buffer (one read at a time; callers share a pending one). */
  more(): Promise<number | null> {
    if (this.#reading) return this.#reading;
    if (this.len === this.buf.length) this.reserve(this.buf.length * 2);
    const reading = this.conn.read(this.buf.subarray(this.len)).then((n) => {
      this.#reading = null;
      if (n === null) this.ended = true;
      else this.len += n;
      return n;
    }, (err) => {
      this.#reading = null;
      throw err;
    });
    this.#reading = reading;
    return reading;
  }

  /** Makes room for `size` bytes in all (only between reads). */
  reserve(size: number): void {
    if (size <= this.buf.length) return;
    const next = new Uint8Array(Math.max(size, this.buf.length * 2));
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }

  /** Drops the first `n` buffered bytes. */
  consume(n: number): void {
    this.buf.copyWithin(0, n, this.len);
    this.len -= n;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    try {
      this.conn.close();
    } catch { /* already closed */ }
  }
}

/** The connection ended before any byte of an answer arrived. */
class ClosedEarly extends Error {
  constructor(cause: unknown, readonly beforeWrite: boolean) {
    super(cause instanceof Error ? cause.message : String(cause));
  }
}

/** `value`, or `fallback` when undefined; anything but a positive integer is a RangeError naming it. */
export function positiveInteger(
  name: string,
  value: number | undefined,
  fallback: number,
): number {
  if (value === undefined) return fallback;
  if (!Number.isInteger(value) || value <= 0) {
    throw new RangeError(`"${name}" must be a positive integer: got ${value}`);
  }
  return value;
}

/** Index of the `\r\n\r\n` that ends a response head, or -1. */
function headEnd(buf: Uint8Array, from: number, to: number): number {
  for (let i = Math.max(0, from); i + 3 < to; i++) {
    if (buf[i] === CR && buf[i + 1] === LF && buf[i + 2] === CR && buf[i + 3] === LF) return i;
  }
  return -1;
}

/** Writes all of `bytes`. */
async function writeAll(conn: Deno.TcpConn, bytes: Uint8Array): Promise<void> {
  let written = 0;
  while (written < bytes.length) written += await conn.write(bytes.subarray(written));
}

/**
 * A pool of keep-alive HTTP/1.1 connections to one origin.
 *
 * @example
 * ```ts
 * import { Upstream } from "./upstream.ts";
 * const server = Deno.serve({ port: 0, onListen() {} }, (req) => new Response(req.method));
 * const upstream = new Upstream(`http://127.0.0.1:${server.addr.port}`);
 * const res = await upstream.send({
 *   method: "POST",
 *   path: "/",
 *   headers: new Headers(),
 *   body: new Uint8Array(0),
 * });
 * if (new TextDecoder().decode(res.body) !== "POST") throw new Error("wrong answer");
 * upstream.close();
 * await server.shutdown();
 * ```
 */
export class Upstream {
  readonly hostname: string;
  readonly port: number;
  readonly timeoutMs: number;
  readonly #host: string;
  readonly #maxIdle: number;
  readonly #maxIdleMs: number;
  readonly #maxHeadBytes: number;
  readonly #maxBodyBytes: number;
  #idle: Connection[] = [];
  readonly #open = new Set<Connection>();
  readonly #busy = new Set<Connection>();
  #sweeper: ReturnType<typeof setInterval> | undefined;
  #closed = false;

  constructor(origin: string | URL, options: UpstreamOptions = {}) {
    const url = new URL(origin);
    if (url.protocol !== "http:") {
      throw new TypeError(`"origin" must be an http: URL: got ${url.href}`);
    }
    this.hostname = url.hostname.replace(/^\[|\]$/g, "");
    this.port = Number(url.port || 80);
    this.#host = url.host;
    this.timeoutMs = positiveInteger("timeoutMs", options.timeoutMs, 10_000);
    this.#maxIdle = positiveInteger("maxIdle", options.maxIdle, 32);
    this.#maxIdleMs = positiveInteger("maxIdleMs", options.maxIdleMs, 10_000);
    this.#maxHeadBytes = positiveInteger("maxHeadBytes", options.maxHeadBytes, 64 * 1024);
    this.#maxBodyBytes = positiveInteger("maxBodyBytes", options.maxBodyBytes, 128 * 1024 * 1024);
  }

  /** Connections open now, idle or busy. */
  get openConnections(): number {
    return this.#open.size;
  }

  /**
   * Sends `req` and reads the answer whole. Throws {@linkcode UnsendableRequest}
   * (before sending anything) for a method or path that cannot go in a request
   * line, and {@linkcode UpstreamError} when there is no whole answer.
   */
  async send(req: UpstreamRequest): Promise<UpstreamResponse> {
    const head = this.#head(req);
    const bytes = new Uint8Array(head.length + req.body.length);
    bytes.set(head);
    bytes.set(req.body, head.length);
    const timeoutMs = req.timeoutMs ?? this.timeoutMs;
    // A reused connection the server closed a moment ago fails before any
    // answer; a request that is safe to repeat gets one fresh connection.
    for (let attempt = 0;; attempt++) {
      const reused = attempt === 0 ? this.#take() : null;
      const c = reused ?? await this.#connect(timeoutMs);
      try {
        return await this.#exchange(c, bytes, req.method, timeoutMs);
      } catch (err) {
        this.#discard(c);
        const early = err instanceof ClosedEarly;
        const retry = reused !== null && early && !c.timedOut &&
          (req.idempotent || (err as ClosedEarly).beforeWrite);
        if (retry) continue;
        const sent = !(early && (err as ClosedEarly).beforeWrite);
        if (c.timedOut) {
          throw new UpstreamError(`no answer within ${timeoutMs} ms`, { sent, timedOut: true });
        }
        if (err instanceof UpstreamError) throw new UpstreamError(err.message, { sent });
        throw new UpstreamError(err instanceof Error ? err.message : String(err), { sent });
      }
    }
  }

  /** Closes every connection; calls still running fail. */
  close(): void {
    this.#closed = true;
    for (const c of this.#open) c.close();
    this.#open.clear();
    this.#busy.clear();
    this.#idle = [];
    clearInterval(this.#sweeper);
    this.#sweeper = undefined;
  }

  #head(req: UpstreamRequest): Uint8Array {
    if (!METHOD.test(req.method)) {
      throw new UnsendableRequest(`not a method: ${JSON.stringify(req.method.slice(0, 40))}`);
    }
    if (!TARGET.test(req.path)) {
      throw new UnsendableRequest(`not a request target: ${JSON.stringify(req.path.slice(0, 80))}`);
    }
    const connection = req.headers.get("connection");
    const named = connection === null ? [] : connectionTokens(connection);
    let head = `${req.method} ${req.path} HTTP/1.1\r\nhost: ${this.#host}\r\n` +
      `content-length: ${req.body.length}\r\n`;
    // Headers objects reject CR and LF in names and values, so nothing can be injected.
    for (const [name, value] of req.headers) {
      if (name === "host" || name === "content-length" || HOP_BY_HOP.has(name)) continue;
      if (named.length > 0 && named.includes(name)) continue;
      head += `${name}: ${value}\r\n`;
    }
    return encoder.encode(head + "\r\n");
  }

  #take(): Connection | null {
    const now = Date.now();
    while (this.#idle.length > 0) {
      const c = this.#idle.pop()!;
      if (!c.closed && !c.ended && c.len === 0 && now - c.idleSince <= this.#maxIdleMs) return c;
      this.#discard(c);
    }
    return null;
  }

  async #connect(timeoutMs: number): Promise<Connection> {
    let conn: Deno.TcpConn;
    try {
      // Connects are rare (connections are kept): a timer each is cheap here.
      conn = await Deno.connect({
        hostname: this.hostname,
        port: this.port,
        signal: AbortSignal.timeout(timeoutMs),
      });
    } catch (err) {
      const timedOut = err instanceof DOMException && err.name === "TimeoutError";
      throw new UpstreamError(
        timedOut
          ? `no connection within ${timeoutMs} ms`
          : err instanceof Error
          ? err.message
          : String(err),
        { timedOut },
      );
    }
    conn.setNoDelay(true);
    const c = new Connection(conn);
    this.#open.add(c);
    return c;
  }

  #discard(c: Connection): void {
    c.close();
    this.#open.delete(c);
    this.#busy.delete(c);
  }

  /** Puts `c` back in the pool, with a read pending that notices the server closing it. */
  #release(c: Connection): void {
    this.#busy.delete(c);
    if (this.#closed || c.closed || this.#idle.length >= this.#maxIdle) return this.#discard(c);
    c.idleSince = Date.now();
    // A large answer grew the buffer; idle connections keep a small one.
    if (c.buf.length > 1024 * 1024) c.buf = new Uint8Array(16 * 1024);
    this.#idle.push(c);
    const done = () => {
      // Still idle: an end of stream, stray bytes or an error mean it is done for.
      if (!this.#idle.includes(c)) return;
      this.#idle = this.#idle.filter((x) => x !== c);
      this.#discard(c);
    };
    c.more().then((n) => {
      if (n === null || c.len > 0) done();
    }, done);
  }

  /**
   * One timer for all busy connections: a per-request `setTimeout` costs a
   * visible share of the proxy's CPU. Answers are cut between `timeoutMs`
   * and `timeoutMs` + a quarter of it (at most 250 ms) late.
   */
  #watchDeadline(c: Connection, timeoutMs: number): void {
    c.deadline = Date.now() + timeoutMs;
    this.#busy.add(c);
    if (this.#sweeper !== undefined) return;
    const sweeper = setInterval(() => {
      const now = Date.now();
      for (const b of this.#busy) {
        if (b.deadline > now) continue;
        b.timedOut = true;
        this.#discard(b);
      }
      if (this.#busy.size === 0) {
        clearInterval(sweeper);
        this.#sweeper = undefined;
      }
    }, Math.min(250, Math.ceil(this.timeoutMs / 4)));
    Deno.unrefTimer(sweeper);
    this.#sweeper = sweeper;
  }

  async #exchange(
    c: Connection,
    bytes: Uint8Array,
    method: string,
    timeoutMs: number,
  ): Promise<UpstreamResponse> {
    this.#watchDeadline(c, timeoutMs);
    try {
      await writeAll(c.conn, bytes);
    } catch (err) {
      throw new ClosedEarly(err, true);
    }
    const { response, reusable } = await this.#readResponse(c, method);
    if (reusable) this.#release(c);
    else this.#discard(c);
    return response;
  }

  async #readResponse(
    c: Connection,
    method: string,
  ): Promise<{ response: UpstreamResponse; reusable: boolean }> {
    let answered = false;
    const more = async () => {
      let n: number | null;
      try {
        n = await c.more();
      } catch (err) {
        if (!answered) throw new ClosedEarly(err, false);
        throw err;
      }
      if (n === null) {
        if (!answered && c.len === 0) throw new ClosedEarly("connection closed", false);
        throw new UpstreamError("denokv closed the connection in the middle of an answer");
      }
      answered = true;
    };
    for (;;) {
      // The head: status line and headers up to the blank line.
      let end = headEnd(c.buf, 0, c.len);
      while (end < 0) {
        if (c.len > this.#maxHeadBytes) throw new UpstreamError("response head too large");
        const scanned = c.len;
        await more();
        end = headEnd(c.buf, scanned - 3, c.len);
      }
      const lines = decoder.decode(c.buf.subarray(0, end)).split("\r\n");
      const status = /^HTTP\/1\.([01]) (\d{3})(?: .*)?$/.exec(lines[0]);
      if (!status) throw new UpstreamError(`malformed status line: ${lines[0].slice(0, 80)}`);
      const http10 = status[1] === "0";
      const code = Number(status[2]);
      const headers: [string, string][] = [];
      let length: number | undefined;
      let encodings: string[] | undefined;
      const named: string[] = [];
      for (let i = 1; i < lines.length; i++) {
        const colon = lines[i].indexOf(":");
        if (colon <= 0) throw new UpstreamError(`malformed header line: ${lines[i].slice(0, 80)}`);
        const name = lines[i].slice(0, colon).trim().toLowerCase();
        const value = lines[i].slice(colon + 1).trim();
        if (name === "content-length") {
          if (!/^\d+$/.test(value) || (length !== undefined && Number(value) !== length)) {
            throw new UpstreamError(`invalid content-length: ${value.slice(0, 40)}`);
          }
          length = Number(value);
        } else if (name === "transfer-encoding") {
          encodings = [...(encodings ?? []), ...connectionTokens(value)];
        } else if (name === "connection") {
          named.push(...connectionTokens(value));
        } else if (!HOP_BY_HOP.has(name)) {
          headers.push([name, value]);
        }
      }
      c.consume(end + 4);
      // 1xx answers come before the real one.
      if (code >= 100 && code < 200) continue;
      let body: Uint8Array<ArrayBuffer>;
      // HTTP/1.0 closes unless it says otherwise; a message framed two ways
      // (RFC 9112 section 6.3) is read by its transfer coding and not trusted after.
      let reusable = http10 ? named.includes("keep-alive") : !named.includes("close");
      if (encodings !== undefined && length !== undefined) reusable = false;
      const chunked = encodings?.at(-1) === "chunked";
      if (method === "HEAD" || code === 204 || code === 304) body = new Uint8Array(0);
      else if (chunked) body = await this.#readChunked(c, more);
      else if (length !== undefined && encodings === undefined) {
        if (length > this.#maxBodyBytes) throw new UpstreamError("response body too large");
        c.reserve(length);
        while (c.len < length) await more();
        body = c.buf.slice(0, length);
        c.consume(length);
      } else {
        // No length: the body runs to the end of the connection.
        reusable = false;
        for (;;) {
          if (c.len > this.#maxBodyBytes) throw new UpstreamError("response body too large");
          try {
            await more();
          } catch (err) {
            if (err instanceof UpstreamError) break;
            throw err;
          }
        }
        body = c.buf.slice(0, c.len);
        c.len = 0;
      }
      return {
        response: {
          status: code,
          headers: named.length === 0 ? headers : headers.filter(([n]) => !named.includes(n)),
          body,
        },
        // Leftover bytes would be an answer to nothing: do not reuse.
        reusable: reusable && c.len === 0,
      };
    }
  }

  async #readChunked(c: Connection, more: () => Promise<void>): Promise<Uint8Array<ArrayBuffer>> {
    const parts: Uint8Array[] = [];
    let total = 0;
    const line = async (): Promise<string> => {
      let at = -1;
      while ((at = c.buf.subarray(0, c.len).indexOf(LF)) < 0) {
        if (c.len > this.#maxHeadBytes) throw new UpstreamError("chunk header too large");
        await more();
      }
      const text = decoder.decode(c.buf.subarray(0, at)).replace(/\r$/, "");
      c.consume(at + 1);
      return text;
    };
    for (;;) {
      const sizeLine = await line();
      const sizeText = sizeLine.split(";")[0].trim();
      if (!/^[0-9a-fA-F]+$/.test(sizeText)) {
        throw new UpstreamError(`malformed chunk size: ${sizeLine.slice(0, 40)}`);
      }
      const size = parseInt(sizeText, 16);
      if (size === 0) {
        // Trailers, if any, end with an empty line.
        while ((await line()) !== "");
        break;
      }
      total += size;
      if (total > this.#maxBodyBytes) throw new UpstreamError("response body too large");
      c.reserve(size + 2);
      while (c.len < size + 2) await more();
      if (c.buf[size] !== CR || c.buf[size + 1] !== LF) {
        throw new UpstreamError("malformed chunk: no CRLF after its data");
      }
      parts.push(c.buf.slice(0, size));
      c.consume(size + 2);
    }
    const body = new Uint8Array(total);
    let at = 0;
    for (const p of parts) {
      body.set(p, at);
      at += p.length;
    }
    return body;
  }
}
