/**
 * For the Deno-parity test: a listenQueue handler that always throws, on
 * Deno's native queue (`native`) or on withQueues (`ours`), with a
 * backoffSchedule of two short retries. Prints "delivered N" on stdout at the
 * end; Deno's (or our) error reports go to stderr.
 */
import { withQueues } from "../../lib/kv_queue.ts";

if (import.meta.main) {
  const raw = await Deno.openKv(":memory:");
  const kv = Deno.args[0] === "native" ? raw : withQueues(raw);
  let delivered = 0;
  kv.listenQueue((msg) => {
    delivered++;
    throw new Error(`boom ${msg}`);
  });
  await kv.enqueue("x", { backoffSchedule: [10, 10] });
  await new Promise((r) => setTimeout(r, 1_500));
  console.log(`delivered ${delivered}`);
  kv.close();
  Deno.exit(0);
}
