/**
 * The queues the proxy knows of: the queue engine's three default prefixes
 * and those an operator lists in `QUEUE_PREFIXES`. The console shows them and
 * the metrics export their depths.
 */

/** A queue the console and the metrics show: a label and its key prefix. */
export interface QueueRef {
  name: string;
  prefix: Deno.KvKey;
}

/** The queues every server has: the typed API's, the Deno face's and Fedify's. */
export const DEFAULT_QUEUES: readonly QueueRef[] = [
  { name: "KvQueue (default)", prefix: ["__kvq__"] },
  { name: "withQueues (Deno face)", prefix: ["__kvq__", "deno"] },
  { name: "Fedify", prefix: ["__kvq__", "fedify"] },
];

/** Parses `QUEUE_PREFIXES`: a JSON list of keys of strings and numbers, e.g. `[["jobs"]]`. */
export function parseQueuePrefixes(raw: string | undefined): Deno.KvKey[] {
  if (raw === undefined || raw.trim() === "") return [];
  let parsed: unknown;
  try {
    parsed = JSON.parse(raw);
  } catch {
    throw new Error(`QUEUE_PREFIXES must be a JSON list of keys such as [["jobs"]]: got ${raw}`);
  }
  const ok = Array.isArray(parsed) && parsed.every((k) =>
    Array.isArray(k) && k.length > 0 &&
    k.every((p) => typeof p === "string" || typeof p === "number")
  );
  if (!ok) {
    throw new Error(`QUEUE_PREFIXES must be a JSON list of keys such as [["jobs"]]: got ${raw}`);
  }
  return parsed as Deno.KvKey[];
}

/**
 * The default queues, then each extra prefix once (a prefix listed twice, or
 * one of the defaults, would show and export the same counters twice).
 */
export function queueList(extra: readonly Deno.KvKey[] = []): QueueRef[] {
  const out: QueueRef[] = [];
  const seen = new Set<string>();
  for (
    const q of [...DEFAULT_QUEUES, ...extra.map((prefix) => ({ name: "QUEUE_PREFIXES", prefix }))]
  ) {
    // Prefixes hold only strings and numbers (parseQueuePrefixes), so JSON names them exactly.
    const id = JSON.stringify(q.prefix);
    if (seen.has(id)) continue;
    seen.add(id);
    out.push({ name: q.name, prefix: q.prefix });
  }
  return out;
}
