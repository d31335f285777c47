/**
 * Where Litestream serves its metrics (litestream.yml `addr: ${LITESTREAM_ADDR}`): one
 * variable and one default for the start-up step that sets it, the proxy's `/healthz` and
 * `denokv_litestream_up`, and the watchdog, which all ask it whether replication runs.
 */

/** Loopback only: nothing outside the machine needs Litestream's own metrics. */
export const DEFAULT_LITESTREAM_ADDR = "127.0.0.1:4514";

/** `host:port` from `LITESTREAM_ADDR`, or the default when it is unset or empty. */
export function litestreamAddr(env: Record<string, string | undefined>): string {
  return env.LITESTREAM_ADDR || DEFAULT_LITESTREAM_ADDR;
}
