/**
 * A scripted HTTP/1.1 server for tests of the proxy's upstream side: it reads
 * requests (with content-length) off raw TCP and answers each with exactly
 * the bytes a test asks for, or hangs up, or says nothing.
 */
export const encoder = new TextEncoder();
export const decoder = new TextDecoder();

export interface Received {
  head: string;
  body: string;
  connection: number;
}

/** What the scripted server does with a request: answer bytes, hang up, or say nothing. */
export type Script = (req: Received) => string | Uint8Array | "hang up" | "silence";

/** A TCP server that reads HTTP/1.1 requests (with content-length) and follows `script`. */
export function scriptedServer(script: Script) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const received: Received[] = [];
  const conns = new Set<Deno.Conn>();
  let connections = 0;
  (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      const id = ++connections;
      (async () => {
        let buf = new Uint8Array(0);
        const chunk = new Uint8Array(64 * 1024);
        try {
          for (;;) {
            const text = decoder.decode(buf);
            const end = text.indexOf("\r\n\r\n");
            if (end >= 0) {
              const head = text.slice(0, end);
              const length = Number(/content-length: (\d+)/i.exec(head)?.[1] ?? 0);
              if (buf.length >= end + 4 + length) {
                const body = decoder.decode(buf.subarray(end + 4, end + 4 + length));
                buf = buf.slice(end + 4 + length);
                const req = { head, body, connection: id };
                received.push(req);
                const answer = script(req);
                if (answer === "hang up") {
                  conn.close();
                  return;
                }
                if (answer !== "silence") {
                  await conn.write(typeof answer === "string" ? encoder.encode(answer) : answer);
                }
                continue;
              }
            }
            const n = await conn.read(chunk);
            if (n === null) return;
            const next = new Uint8Array(buf.length + n);
            next.set(buf);
            next.set(chunk.subarray(0, n), buf.length);
            buf = next;
          }
        } catch {
          /* closed by the test */
        } finally {
          conns.delete(conn);
          try {
            conn.close();
          } catch { /* already closed */ }
        }
      })();
    }
  })();
  const port = (listener.addr as Deno.NetAddr).port;
  return {
    url: `http://127.0.0.1:${port}`,
    received,
    /** Closes every open connection from the server side. */
    hangUpAll() {
      for (const c of conns) c.close();
    },
    close() {
      listener.close();
      for (const c of conns) c.close();
    },
  };
}

/** A 200 answer with `body` and a content-length. */
export function ok(body: string, extra = ""): string {
  return `HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: ${
    encoder.encode(body).length
  }\r\n${extra}\r\n${body}`;
}
