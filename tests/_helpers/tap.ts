/**
 * A TCP tap between the proxy and denokv: it relays bytes unchanged and records,
 * per upstream connection, each HTTP/1.1 request's path and body size and when
 * the connection closed. Tests use it to see what reached the real denokv.
 */

/** One thing the tap saw. */
export type TapEvent =
  | { conn: number; kind: "request"; path: string; bodyBytes: number }
  | { conn: number; kind: "closed" };

/** A running tap; `url` is what the proxy should use as `DENOKV_URL`. */
export interface Tap extends AsyncDisposable {
  readonly url: string;
  readonly events: TapEvent[];
  /** Requests seen for `path`, in order. */
  requests(path: string): { conn: number; bodyBytes: number }[];
  /** True once the connection that carried request `conn` has closed. */
  closed(conn: number): boolean;
}

const HEAD_END = new TextEncoder().encode("\r\n\r\n");

function indexOf(haystack: Uint8Array, needle: Uint8Array): number {
  outer: for (let i = 0; i + needle.length <= haystack.length; i++) {
    for (let j = 0; j < needle.length; j++) if (haystack[i + j] !== needle[j]) continue outer;
    return i;
  }
  return -1;
}

/** Parses request heads out of a client-to-server byte stream, skipping bodies. */
class RequestParser {
  #buffer = new Uint8Array(0);
  #bodyLeft = 0;
  constructor(readonly onRequest: (path: string, bodyBytes: number) => void) {}
  push(chunk: Uint8Array): void {
    let data = chunk;
    if (this.#bodyLeft > 0) {
      const skip = Math.min(this.#bodyLeft, data.length);
      this.#bodyLeft -= skip;
      data = data.subarray(skip);
    }
    if (data.length === 0) return;
    const joined = new Uint8Array(this.#buffer.length + data.length);
    joined.set(this.#buffer);
    joined.set(data, this.#buffer.length);
    this.#buffer = joined;
    while (this.#bodyLeft === 0) {
      const end = indexOf(this.#buffer, HEAD_END);
      if (end < 0) return;
      const head = new TextDecoder().decode(this.#buffer.subarray(0, end));
      const [requestLine, ...headers] = head.split("\r\n");
      const length = headers.map((h) => /^content-length:\s*(\d+)/i.exec(h)).find(Boolean);
      const bodyBytes = length ? Number(length[1]) : 0;
      this.onRequest(requestLine.split(" ")[1] ?? "", bodyBytes);
      const rest = this.#buffer.subarray(end + HEAD_END.length);
      const skip = Math.min(bodyBytes, rest.length);
      this.#bodyLeft = bodyBytes - skip;
      this.#buffer = rest.slice(skip);
    }
  }
}

/** Starts a tap on a free loopback port that relays to `target` (`http://host:port`). */
export function startTap(target: string): Tap {
  const { hostname, port } = new URL(target);
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const events: TapEvent[] = [];
  const open = new Set<Deno.Conn>();
  let next = 0;
  const relay = async (client: Deno.Conn) => {
    const conn = ++next;
    const server = await Deno.connect({ hostname, port: Number(port) }).catch(() => null);
    if (!server) {
      client.close();
      return;
    }
    open.add(client).add(server);
    const parser = new RequestParser((path, bodyBytes) =>
      events.push({ conn, kind: "request", path, bodyBytes })
    );
    const up = (async () => {
      for await (const chunk of client.readable.pipeThrough(new TransformStream())) {
        parser.push(chunk);
        const writer = server.writable.getWriter();
        await writer.write(chunk).finally(() => writer.releaseLock());
      }
    })().catch(() => {});
    const down = server.readable.pipeTo(client.writable).catch(() => {});
    await Promise.race([up, down]);
    for (const c of [client, server]) {
      try {
        c.close();
      } catch { /* already closed */ }
      open.delete(c);
    }
    events.push({ conn, kind: "closed" });
  };
  const accepting = (async () => {
    for await (const client of listener) relay(client);
  })().catch(() => {});
  return {
    url: `http://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`,
    events,
    requests(path) {
      return events.flatMap((e) =>
        e.kind === "request" && e.path === path ? [{ conn: e.conn, bodyBytes: e.bodyBytes }] : []
      );
    },
    closed(conn) {
      return events.some((e) => e.kind === "closed" && e.conn === conn);
    },
    async [Symbol.asyncDispose]() {
      listener.close();
      for (const c of open) {
        try {
          c.close();
        } catch { /* already closed */ }
      }
      await accepting;
    },
  };
}
