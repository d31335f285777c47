/**
 * An answer that also ends the connection. Deno's server keeps a connection
 * until a declared request body has arrived, even after answering
 * `connection: close`; so a client without the token that declares 1 MiB and
 * sends all but a byte would hold it (and what it sent) forever. The one way
 * a handler can cut it is a response body that fails mid-stream while the
 * request body is untouched: the server then resets the connection.
 * (Once a handler has started reading the request body, the server waits for
 * it whatever the answer; measured with Deno 2.9.6.)
 */

/** The error that makes the server reset a connection; kept out of the log by {@linkcode quietCuts}. */
export class ConnectionCut extends Error {
  override name = "ConnectionCut";
}

const encoder = new TextEncoder();

/**
 * An answer with `text` after which the connection is reset. Use it only for
 * requests whose body has not been touched.
 *
 * @example
 * ```ts
 * import { cuttingAnswer } from "./closing.ts";
 * const res = cuttingAnswer(401, "Unauthorized", {});
 * const reader = res.body!.getReader();
 * const first = await reader.read();
 * if (new TextDecoder().decode(first.value) !== "Unauthorized") throw new Error("wrong text");
 * const cut = await reader.read().then(() => false, () => true);
 * if (!cut) throw new Error("the body did not fail");
 * ```
 */
export function cuttingAnswer(
  status: number,
  text: string,
  headers: Record<string, string>,
): Response {
  let sent = false;
  const body = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (sent) return controller.error(new ConnectionCut("connection cut after the answer"));
      sent = true;
      controller.enqueue(encoder.encode(text));
    },
  }, { highWaterMark: 0 });
  return new Response(body, {
    status,
    headers: { ...headers, "content-type": "text/plain; charset=utf-8", connection: "close" },
  });
}

/**
 * A `Deno.serve` `onError` that keeps cut connections out of the log and
 * passes anything else to `fallback`.
 */
export function quietCuts(
  fallback: (err: unknown) => Response | Promise<Response>,
): (err: unknown) => Response | Promise<Response> {
  return (err) =>
    err instanceof ConnectionCut ? new Response(null, { status: 500 }) : fallback(err);
}
