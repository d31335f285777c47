/** Unit tests of the proxy's entry point: configuration and the batched access log. */
import assert from "node:assert/strict";
import { bufferedLog, loadConfig } from "../proxy/main.ts";

Deno.test("bufferedLog() batches lines into one write and flushes after the delay", async () => {
  const writes: string[] = [];
  const out = {
    writeSync(p: Uint8Array) {
      writes.push(new TextDecoder().decode(p));
      return p.length;
    },
  };
  const log = bufferedLog(out, 20);
  log("GET /a 200 1.0ms");
  log("GET /b 404 0.5ms");
  assert.equal(writes.length, 0);
  await new Promise((r) => setTimeout(r, 60));
  assert.deepEqual(writes, ["GET /a 200 1.0ms\nGET /b 404 0.5ms\n"]);
});

Deno.test("bufferedLog() writes at once when 16 KiB are pending", () => {
  const writes: number[] = [];
  const log = bufferedLog({
    writeSync(p: Uint8Array) {
      writes.push(p.length);
      return p.length;
    },
  }, 60_000);
  // 164 lines of 100 bytes reach 16 KiB with the last one.
  for (let i = 0; i < 163; i++) log("x".repeat(99));
  assert.equal(writes.length, 0);
  log("x".repeat(99));
  assert.deepEqual(writes, [16_400]);
});

Deno.test("loadConfig() rejects a short token, a bad port and a bad URL, naming the value", () => {
  const token = "a-long-enough-token";
  assert.throws(
    () => loadConfig({ DENO_KV_ACCESS_TOKEN: "short" }),
    /DENO_KV_ACCESS_TOKEN must be at least 12 characters: got 5/,
  );
  assert.throws(
    () => loadConfig({ DENO_KV_ACCESS_TOKEN: token, PORT: "http" }),
    /PORT must be a port number: got http/,
  );
  assert.throws(
    () => loadConfig({ DENO_KV_ACCESS_TOKEN: token, DENOKV_URL: "::nope" }),
    /DENOKV_URL must be a URL: got ::nope/,
  );
  const config = loadConfig({ DENO_KV_ACCESS_TOKEN: token });
  assert.equal(config.port, 4512);
  assert.equal(config.denokvUrl, "http://127.0.0.1:4513");
  assert.ok(config.libDir.endsWith("/lib"));
});
