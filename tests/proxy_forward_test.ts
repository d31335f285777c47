/**
 * The proxy's forwarding of KV Connect requests (proxy/app.ts) against a
 * scripted upstream that records exactly what arrives and answers what a
 * test asks for: request targets, statuses without a body, timeouts of reads
 * and writes, methods.
 */
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { createApp } from "../proxy/app.ts";
import { ok, scriptedServer } from "./_helpers/scripted_server.ts";

const LIB_DIR = fileURLToPath(new URL("../lib", import.meta.url));
const TOKEN = "test-token-0123456789";

function appFor(
  url: string,
  options: { upstreamTimeoutMs?: number; upstreamWriteTimeoutMs?: number } = {},
) {
  return createApp({ denokvUrl: url, libDir: LIB_DIR, accessToken: TOKEN, ...options });
}

const kvHeaders = { authorization: `Bearer ${TOKEN}`, "x-denokv-version": "3" };

Deno.test("forwarding: the target goes upstream as sent, never percent-decoded into a second request", async () => {
  const server = scriptedServer((req) => ok(`answer to ${req.head.split("\r\n")[0]}`));
  const app = appFor(server.url);
  try {
    const smuggle = "/v2/snapshot_read%20HTTP/1.1%0D%0Ahost:%20x%0D%0Acontent-length:%200" +
      "%0D%0A%0D%0APOST%20/v2/atomic_write";
    const res = await app.request(`http://proxy.example${smuggle}?q=1`, {
      method: "POST",
      headers: kvHeaders,
      body: new Uint8Array([1, 2, 3]),
    });
    assert.equal(res.status, 200);
    assert.equal(await res.text(), `answer to POST ${smuggle}?q=1 HTTP/1.1`);
    assert.equal(server.received.length, 1, "the upstream saw more than one request");
    assert.equal(server.received[0].body, "\x01\x02\x03");
  } finally {
    server.close();
  }
});

Deno.test("forwarding: answers without a body (204, 304) pass through as they are", async () => {
  const server = scriptedServer((req) =>
    req.body === "204"
      ? "HTTP/1.1 204 No Content\r\nx-kept: yes\r\n\r\n"
      : "HTTP/1.1 304 Not Modified\r\n\r\n"
  );
  const app = appFor(server.url);
  try {
    const noContent = await app.request("http://proxy.example/v2/snapshot_read", {
      method: "POST",
      headers: kvHeaders,
      body: "204",
    });
    assert.equal(noContent.status, 204);
    assert.equal(noContent.headers.get("x-kept"), "yes");
    assert.equal(await noContent.text(), "");
    const notModified = await app.request("http://proxy.example/v2/snapshot_read", {
      method: "POST",
      headers: kvHeaders,
      body: "304",
    });
    assert.equal(notModified.status, 304);
  } finally {
    server.close();
  }
});

Deno.test("forwarding: a silent read is 503 (the client retries); a silent write is 408 (it must not)", async () => {
  const server = scriptedServer(() => "silence");
  const app = appFor(server.url, { upstreamTimeoutMs: 200, upstreamWriteTimeoutMs: 400 });
  try {
    const read = await app.request("http://proxy.example/v2/snapshot_read", {
      method: "POST",
      headers: kvHeaders,
      body: "r",
    });
    assert.equal(read.status, 503);
    assert.match(await read.text(), /unreachable, try again: no answer within 200 ms/);
    const write = await app.request("http://proxy.example/v2/atomic_write", {
      method: "POST",
      headers: kvHeaders,
      body: "w",
    });
    assert.equal(write.status, 408);
    assert.match(
      await write.text(),
      /did not answer this write within 400 ms: it may or may not have been applied/,
    );
    // Each was sent exactly once.
    assert.deepEqual(server.received.map((r) => r.body), ["r", "w"]);
  } finally {
    server.close();
  }
});

Deno.test("forwarding: KV Connect paths take POST only; other methods are 404 without a call upstream", async () => {
  const server = scriptedServer((req) => ok(req.body));
  const app = appFor(server.url);
  try {
    for (const method of ["GET", "HEAD", "PUT", "DELETE"]) {
      const res = await app.request("http://proxy.example/v2/snapshot_read", {
        method,
        headers: kvHeaders,
      });
      assert.equal(res.status, 404, method);
      await res.body?.cancel();
    }
    assert.equal(server.received.length, 0);
  } finally {
    server.close();
  }
});

Deno.test("forwarding: a write whose answer breaks off (hang-up or half an answer) is 409, never a 5xx; a read is 503", async () => {
  const server = scriptedServer((req) =>
    req.body.startsWith("half")
      ? "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part"
      : "hang up"
  );
  const app = appFor(server.url);
  const send = async (path: string, body: string) => {
    const pending = app.request(`http://proxy.example${path}`, {
      method: "POST",
      headers: kvHeaders,
      body,
    });
    // Half an answer, then the connection closes.
    if (body.startsWith("half")) setTimeout(() => server.hangUpAll(), 300);
    const res = await pending;
    return { status: res.status, text: await res.text() };
  };
  try {
    for (const body of ["hang up", "half an answer"]) {
      const write = await send("/v2/atomic_write", body);
      assert.equal(write.status, 409, `${body}: ${write.text}`);
      assert.match(write.text, /may or may not have been applied/);
      const read = await send("/v2/snapshot_read", body);
      assert.equal(read.status, 503, `${body}: ${read.text}`);
    }
  } finally {
    server.close();
  }
});
