/**
 * A stand-in for the official `denokv` binary, for tests and local runs only
 * (the container image ships the real binary). It is a thin KV Connect HTTP
 * front over the official denokv SQLite engine that npm `@deno/kv` ships as a
 * napi module: request bodies are handed to the engine as the protobuf bytes
 * they are, so encoding, limits and semantics are denokv's own. This file adds
 * what denokv's `main.rs` adds: the command line, the metadata exchange, the
 * bearer-token and protocol-version checks, watch framing and error statuses.
 *
 * Usage, as for denokv: `denokv --sqlite-path P serve --addr 127.0.0.1:4513`,
 * with the token in `DENO_KV_ACCESS_TOKEN` (or `--access-token`).
 */
import { createRequire } from "node:module";
import process from "node:process";

/** The part of the napi module we call; every call takes a trailing `debug` flag. */
interface KvNapi {
  open(path: string, inMemory: boolean | undefined, debug: boolean): number;
  close(db: number, debug: boolean): void;
  snapshotRead(db: number, body: Uint8Array, debug: boolean): Promise<Uint8Array>;
  atomicWrite(db: number, body: Uint8Array, debug: boolean): Promise<Uint8Array>;
  startWatch(db: number, body: Uint8Array, debug: boolean): Promise<number>;
  dequeueNextWatchMessage(
    db: number,
    watch: number,
    debug: boolean,
  ): Promise<Uint8Array | undefined>;
  endWatch(db: number, watch: number, debug: boolean): void;
}

/** denokv refuses shorter tokens (`run_serve` in denokv/main.rs). */
export const MIN_TOKEN_LENGTH = 12;
/** denokv pings an open watch stream every 5 s with an empty frame. */
export const WATCH_PING_MS = 5_000;
/** denokv answers with the nil UUID as the database id. */
const NIL_UUID = "00000000-0000-0000-0000-000000000000";

/** Parsed command line of `denokv ... serve`. */
export interface StandinOptions {
  sqlitePath: string;
  addr: { hostname: string; port: number };
  accessToken: string;
  readOnly: boolean;
  /** Test-only, beside denokv's own options: log body sizes and watch ends (`STANDIN_TRACE=1`). */
  trace: boolean;
}

/** Parses denokv's own command line; throws with a usage message on anything else. */
export function parseArgs(args: string[], env: Record<string, string | undefined>): StandinOptions {
  let sqlitePath = env.DENO_KV_SQLITE_PATH;
  let accessToken = env.DENO_KV_ACCESS_TOKEN;
  let addr = "0.0.0.0:4512";
  let readOnly = false;
  let command: string | undefined;
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    const [flag, inline] = arg.startsWith("--") && arg.includes("=")
      ? [arg.slice(0, arg.indexOf("=")), arg.slice(arg.indexOf("=") + 1)]
      : [arg, undefined];
    const value = () => {
      const v = inline ?? args[++i];
      if (v === undefined) throw new Error(`${flag} needs a value`);
      return v;
    };
    if (flag === "--sqlite-path") sqlitePath = value();
    else if (flag === "--access-token") accessToken = value();
    else if (flag === "--addr") addr = value();
    else if (flag === "--read-only") readOnly = true;
    else if (!flag.startsWith("-") && command === undefined) command = flag;
    else throw new Error(`unexpected argument '${arg}'`);
  }
  if (command !== "serve") {
    throw new Error(`expected the 'serve' subcommand, got ${command ?? "none"}`);
  }
  if (!sqlitePath) throw new Error("--sqlite-path (or DENO_KV_SQLITE_PATH) is required");
  if (!accessToken) throw new Error("--access-token (or DENO_KV_ACCESS_TOKEN) is required");
  if (accessToken.length < MIN_TOKEN_LENGTH) {
    throw new Error(`Access token must be at minimum ${MIN_TOKEN_LENGTH} chars long.`);
  }
  const colon = addr.lastIndexOf(":");
  const port = Number(addr.slice(colon + 1));
  if (colon < 0 || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`--addr must be host:port, got ${addr}`);
  }
  const hostname = addr.slice(0, colon).replace(/^\[|\]$/g, "");
  const trace = env.STANDIN_TRACE === "1";
  return { sqlitePath, accessToken, readOnly, trace, addr: { hostname, port } };
}

/** An error answered the way denokv answers it: a status and a plain-text message. */
class ApiError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
  toResponse(): Response {
    return new Response(this.message, {
      status: this.status,
      headers: { "content-type": "text/plain; charset=utf-8" },
    });
  }
}

/** Engine error names (napi's `convert_error_to_str`) to denokv's messages. */
const ENGINE_ERRORS: Record<string, string> = {
  KeyTooLong: "A key exceeds the key size limit.",
  ValueTooLong: "A value exceeds the value size limit.",
  ReadRangeTooLarge:
    "The total number of entries requested across read ranges in the read request is too large.",
  AtomicWriteTooLarge: "The total size of the atomic write is too large.",
  TooManyReadRanges: "Too many read ranges requested in one read request.",
  TooManyWatchedKeys: "Too many keys watched in a single watch request.",
  TooManyChecks: "Too many checks included in atomic write.",
  TooManyMutations: "Too many mutations / enqueues included in atomic write.",
  TooManyQueueUndeliveredKeys: "Too many dead letter keys for a single queue message.",
  TooManyQueueBackoffIntervals: "Too many backoff intervals for a single queue message.",
  QueueBackoffIntervalTooLarge: "A backoff interval exceeds the maximum allowed backoff interval.",
  InvalidReadRangeLimit: "The read range limit of the snapshot read request is invalid.",
  InvalidVersionstamp: "Invalid versionstamp.",
  InvalidMutationKind: "Invalid mutation kind or arguments.",
  InvalidMutationExpireAt: "Invalid mutation expire at.",
  InvalidMutationEnqueueDeadline: "Invalid mutation enqueue deadline.",
};

function engineError(err: unknown): ApiError {
  // anyhow errors arrive with a "Stack backtrace:" appendix; keep the message.
  const message = (err instanceof Error ? err.message : String(err)).split(/\n\s*\n/)[0].trim();
  const known = ENGINE_ERRORS[message];
  if (known) return new ApiError(400, known);
  if (/failed to decode|DecodeError|buffer underflow|invalid wire type/i.test(message)) {
    return new ApiError(400, `Request protobuf is invalid: ${message}.`);
  }
  // denokv maps SqliteBackendError::TypeMismatch and SumOutOfRange to 400; the
  // npm engine says "Cannot sum KvU64 with Number" for a wrong-typed operand.
  if (/mismatch|non-U64|out of range|Failed to perform|Cannot \w+ KvU64 with/i.test(message)) {
    return new ApiError(400, message);
  }
  if (/closed/i.test(message)) {
    return new ApiError(503, "The server is temporarially unavailable, try again later.");
  }
  console.error(`denokv stand-in: engine error: ${message}`);
  return new ApiError(500, "An internal server error occurred.");
}

function loadNapi(): KvNapi {
  const require = createRequire(import.meta.url);
  // The engine is the platform package that @deno/kv depends on (linux x64 here).
  const name = `@deno/kv-${process.platform}-${process.arch}-gnu`;
  return require(name) as KvNapi;
}

function checkBearer(req: Request, token: string): void {
  const authorization = req.headers.get("authorization");
  const space = authorization?.indexOf(" ") ?? -1;
  if (!authorization || space < 0) {
    throw new ApiError(401, "Malformed authorization header.");
  }
  const scheme = authorization.slice(0, space);
  const given = authorization.slice(space + 1);
  if (scheme.toLowerCase() !== "bearer" || !timingSafeEqual(given, token)) {
    throw new ApiError(401, "Invalid access token.");
  }
}

function timingSafeEqual(a: string, b: string): boolean {
  const x = new TextEncoder().encode(a);
  const y = new TextEncoder().encode(b);
  let diff = x.length ^ y.length;
  for (let i = 0; i < Math.max(x.length, y.length); i++) diff |= (x[i] ?? 0) ^ (y[i] ?? 0);
  return diff === 0;
}

function checkDataPath(req: Request, token: string): void {
  const version = req.headers.get("x-denokv-version");
  if (version !== "2" && version !== "3") {
    throw new ApiError(400, "Expected protocol version 2.");
  }
  checkBearer(req, token);
  const dbId = req.headers.get("x-denokv-database-id");
  if (!dbId || dbId.toLowerCase() !== NIL_UUID) {
    throw new ApiError(400, "Invalid database id.");
  }
}

function protobuf(bytes: Uint8Array): Response {
  return new Response(bytes as Uint8Array<ArrayBuffer>, {
    headers: { "content-type": "application/x-protobuf" },
  });
}

function frame(payload: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + payload.length);
  new DataView(out.buffer).setUint32(0, payload.length, true);
  out.set(payload, 4);
  return out;
}

/** Builds the request handler over an opened engine database. */
export function createHandler(
  napi: KvNapi,
  db: number,
  options: Pick<StandinOptions, "accessToken" | "readOnly"> & {
    /** Receives test-only trace lines: each data-path body's size, each watch's end. */
    trace?: (line: string) => void;
  },
): (req: Request) => Promise<Response> {
  const token = options.accessToken;

  async function metadata(req: Request): Promise<Response> {
    let body: { supportedVersions?: unknown };
    try {
      body = await req.json();
    } catch {
      throw new ApiError(
        400,
        "The server requires at least protocol version 2. Use Deno 1.38.0 or newer.",
      );
    }
    const versions = Array.isArray(body?.supportedVersions) ? body.supportedVersions : [];
    const version = versions.includes(3) ? 3 : versions.includes(2) ? 2 : 0;
    if (version === 0) {
      throw new ApiError(
        400,
        "The server could not negotiate a protocol version. The server requires protocol version 2 or 3.",
      );
    }
    checkBearer(req, token);
    return Response.json({
      version,
      databaseId: NIL_UUID,
      endpoints: [{ url: "/v2", consistency: "strong" }],
      token,
      expiresAt: new Date(Date.now() + 24 * 3600_000).toISOString(),
    });
  }

  function watch(body: Uint8Array, signal: AbortSignal): Promise<Response> {
    return napi.startWatch(db, body, false).then((watchId) => {
      options.trace?.(`watch ${watchId} opened`);
      let closed = false;
      let ping: ReturnType<typeof setInterval> | undefined;
      const close = () => {
        if (closed) return;
        closed = true;
        clearInterval(ping);
        napi.endWatch(db, watchId, false);
        options.trace?.(`watch ${watchId} closed`);
      };
      signal.addEventListener("abort", close, { once: true });
      const stream = new ReadableStream<Uint8Array>({
        start(controller) {
          ping = setInterval(() => {
            if (!closed) controller.enqueue(frame(new Uint8Array(0)));
          }, WATCH_PING_MS);
          (async () => {
            try {
              while (!closed) {
                const next = await napi.dequeueNextWatchMessage(db, watchId, false);
                if (closed) break;
                if (next === undefined) break;
                controller.enqueue(frame(next));
              }
              close();
              controller.close();
            } catch (err) {
              close();
              try {
                controller.error(err);
              } catch { /* already closed by the client */ }
            }
          })();
        },
        cancel: close,
      });
      return new Response(stream, { headers: { "content-type": "application/octet-stream" } });
    });
  }

  return async function handle(req: Request): Promise<Response> {
    try {
      const { pathname } = new URL(req.url);
      if (req.method !== "POST") throw new ApiError(404, "Resource not found.");
      if (pathname === "/") return await metadata(req);
      if (!pathname.startsWith("/v2/")) throw new ApiError(404, "Resource not found.");
      const op = pathname.slice(4);
      if (op !== "snapshot_read" && op !== "atomic_write" && op !== "watch") {
        throw new ApiError(404, "Resource not found.");
      }
      checkDataPath(req, token);
      const body = new Uint8Array(await req.arrayBuffer());
      options.trace?.(`body ${op} ${body.length}`);
      try {
        if (op === "snapshot_read") return protobuf(await napi.snapshotRead(db, body, false));
        if (op === "watch") return await watch(body, req.signal);
        if (options.readOnly) throw new ApiError(400, "This database is read only.");
        return protobuf(await napi.atomicWrite(db, body, false));
      } catch (err) {
        if (err instanceof ApiError) throw err;
        throw engineError(err);
      }
    } catch (err) {
      if (err instanceof ApiError) return err.toResponse();
      console.error(`denokv stand-in: ${err}`);
      return new ApiError(500, "An internal server error occurred.").toResponse();
    }
  };
}

/** Opens the database and serves until the process is signalled. */
export function serve(options: StandinOptions): Deno.HttpServer {
  const napi = loadNapi();
  const db = napi.open(options.sqlitePath, false, false);
  const trace = options.trace
    ? (line: string) => console.error(`denokv stand-in: ${line}`)
    : undefined;
  const handler = createHandler(napi, db, { ...options, trace });
  const server = Deno.serve({
    hostname: options.addr.hostname,
    port: options.addr.port,
    onListen: ({ hostname, port }) => {
      console.error(
        `denokv stand-in: opened database at ${options.sqlitePath}; listening on http://${hostname}:${port}`,
      );
    },
  }, handler);
  const shutdown = async () => {
    await server.shutdown();
    napi.close(db, false);
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGTERM", shutdown);
  Deno.addSignalListener("SIGINT", shutdown);
  return server;
}

if (import.meta.main) {
  try {
    serve(parseArgs(Deno.args, process.env));
  } catch (err) {
    console.error(`error: ${err instanceof Error ? err.message : err}`);
    Deno.exit(2);
  }
}
