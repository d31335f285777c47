/**
 * A loopback TCP relay in front of a server (S3 in the fault tests) that a
 * test can switch off (nothing listens: connection refused, as an outage
 * looks), back on at the same port, or slow down to a byte rate.
 */
import { freePort } from "./processes.ts";

/** A running relay. */
export interface TcpRelay {
  port: number;
  url: string;
  /** Stops listening and cuts every open connection. */
  off(): void;
  /** Listens again on the same port. */
  on(): void;
  /** Limits each direction of each connection to `bytesPerSecond` (0: no limit). */
  throttle(bytesPerSecond: number): void;
  [Symbol.asyncDispose](): Promise<void>;
}

/** Starts a relay to `127.0.0.1:targetPort`; `listening: false` starts it switched off. */
export function startTcpRelay(targetPort: number, { listening = true } = {}): TcpRelay {
  const port = freePort();
  let listener: Deno.Listener | null = null;
  let rate = 0;
  const open = new Set<Deno.Conn>();
  const pipe = async (from: Deno.Conn, to: Deno.Conn) => {
    const buf = new Uint8Array(16 * 1024);
    try {
      for (;;) {
        const want = rate > 0
          ? Math.max(1, Math.min(buf.length, Math.floor(rate / 10)))
          : buf.length;
        const n = await from.read(buf.subarray(0, want));
        if (n === null) break;
        let at = 0;
        while (at < n) at += await to.write(buf.subarray(at, n));
        if (rate > 0) await new Promise((r) => setTimeout(r, (n / rate) * 1000));
      }
    } catch { /* either side went away */ }
    for (const c of [from, to]) {
      try {
        c.close();
      } catch { /* closed */ }
      open.delete(c);
    }
  };
  const serve = async (l: Deno.Listener) => {
    for (;;) {
      let client: Deno.Conn;
      try {
        client = await l.accept();
      } catch {
        return;
      }
      try {
        const upstream = await Deno.connect({ hostname: "127.0.0.1", port: targetPort });
        open.add(client);
        open.add(upstream);
        pipe(client, upstream);
        pipe(upstream, client);
      } catch {
        client.close();
      }
    }
  };
  const on = () => {
    if (listener) return;
    listener = Deno.listen({ hostname: "127.0.0.1", port });
    serve(listener);
  };
  const off = () => {
    listener?.close();
    listener = null;
    for (const c of open) {
      try {
        c.close();
      } catch { /* closed */ }
    }
    open.clear();
  };
  if (listening) on();
  return {
    port,
    url: `http://127.0.0.1:${port}`,
    on,
    off,
    throttle(bytesPerSecond) {
      rate = bytesPerSecond;
    },
    [Symbol.asyncDispose]() {
      off();
      return Promise.resolve();
    },
  };
}
