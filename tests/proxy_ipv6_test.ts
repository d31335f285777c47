/**
 * The proxy's default bind address: started the way supervisord starts it
 * (no HOSTNAME_BIND), it must answer over IPv4 (Fly's edge) and over IPv6
 * (`<app>.internal` on Fly's private network).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { DENO, freePort, ROOT, Running, TEST_TOKEN, waitFor } from "./_helpers/processes.ts";

async function status(url: string): Promise<number | string> {
  try {
    const res = await fetch(url, { signal: AbortSignal.timeout(5_000) });
    await res.body?.cancel();
    return res.status;
  } catch (err) {
    return err instanceof Error ? err.message : String(err);
  }
}

Deno.test("proxy/main.ts without HOSTNAME_BIND answers on 127.0.0.1 and on [::1]", async () => {
  const port = freePort();
  const child = new Deno.Command(DENO, {
    args: ["run", "--allow-net", "--allow-env", "--allow-read", join(ROOT, "proxy/main.ts")],
    cwd: ROOT,
    env: {
      DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
      PORT: String(port),
      // Nothing listens here: the info page does not need denokv.
      DENOKV_URL: `http://127.0.0.1:${freePort()}`,
      ACCESS_LOG: "off",
    },
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  await using proxy = new Running("proxy", child, port);
  await waitFor("the proxy to listen", async () => {
    if (proxy.exited) throw new Error(`proxy exited: ${proxy.output}`);
    return (await status(`http://127.0.0.1:${port}/`)) === 200;
  }, { timeoutMs: 30_000 });
  assert.equal(await status(`http://127.0.0.1:${port}/`), 200);
  assert.equal(await status(`http://[::1]:${port}/`), 200, proxy.output);
});
