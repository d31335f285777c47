/**
 * The probes a scrape and the console's overview run: is denokv answering a
 * KV Connect metadata exchange, is Litestream replicating the database.
 */

/** How long each probe may take. */
const PROBE_TIMEOUT_MS = 2_000;

/** True when denokv answers a KV Connect metadata exchange with the token. */
export async function probeDenokv(denokvUrl: string, token: string): Promise<boolean> {
  try {
    const res = await fetch(new URL("/", denokvUrl), {
      method: "POST",
      headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
      body: JSON.stringify({ supportedVersions: [2, 3] }),
      signal: AbortSignal.timeout(PROBE_TIMEOUT_MS),
    });
    await res.body?.cancel();
    return res.ok;
  } catch {
    return false;
  }
}

/**
 * True when Litestream's own metrics endpoint (litestream.yml `addr:`, from
 * `LITESTREAM_ADDR`) answers and replicates `dbPath`. The proxy runs
 * without --allow-all, which Deno requires for /proc, so it cannot look for
 * the process itself; a stopped (hung) Litestream does not answer either.
 */
export async function litestreamRunning(addr: string, dbPath: string): Promise<boolean> {
  try {
    const res = await fetch(`http://${addr}/metrics`, {
      signal: AbortSignal.timeout(PROBE_TIMEOUT_MS),
    });
    const text = await res.text();
    return res.ok && text.includes(`db=${JSON.stringify(dbPath)}`);
  } catch {
    return false;
  }
}
