/**
 * Deno's KV client for Node (npm `@deno/kv`) through the proxy to the official
 * denokv: Node apps share a database with Deno apps over the same KV Connect URL.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { ROOT, startStack, TEST_TOKEN } from "./_helpers/processes.ts";

Deno.test(
  "npm @deno/kv in Node through the proxy: set, get, the value limit, atomic check and sum, list, watch",
  { sanitizeOps: false, sanitizeResources: false },
  async () => {
    await using stack = await startStack();
    const run = async (token: string) => {
      const out = await new Deno.Command("node", {
        args: [join(ROOT, "tests/node_fixtures/kv_client.mjs"), stack.proxy.url],
        cwd: ROOT,
        env: { DENO_KV_ACCESS_TOKEN: token },
        stdout: "piped",
        stderr: "piped",
        signal: AbortSignal.timeout(60_000),
      }).output();
      const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
      return { code: out.code, stdout: text(out.stdout), stderr: text(out.stderr) };
    };
    const ok = await run(TEST_TOKEN);
    assert.equal(ok.code, 0, ok.stderr);
    const steps = Object.fromEntries(
      ok.stdout.trim().split("\n").map((line) => {
        const { step, value } = JSON.parse(line);
        return [step, value];
      }),
    );
    assert.deepEqual(steps, {
      set: true,
      get: { value: { hello: "node" }, same: true },
      big: 65_536,
      "too big": "Unexpected response status: 400 A value exceeds the value size limit.",
      "stale check": false,
      sum: "7",
      list: ["node/a", "node/big", "node/n"],
      watch: [{ hello: "node" }, "changed"],
    });
    // A wrong token: the client fails to open with the server's 401.
    const wrong = await run(`${TEST_TOKEN}-wrong`);
    assert.notEqual(wrong.code, 0);
    assert.match(wrong.stderr, /Unexpected response status: 401/);
  },
);
