/**
 * End-to-end KV Connect tests with the real Deno KV client: the same suite
 * through the proxy and directly against denokv (the pinned official binary;
 * `deno task test:standin` runs this file against the stand-in), plus watch,
 * authentication and outage behaviour.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { kvSuite } from "./_helpers/kv_suite.ts";
import {
  KV_SERVER,
  openRemoteKv,
  startDenokv,
  startProxy,
  startStack,
  TEST_TOKEN,
  waitFor,
} from "./_helpers/processes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

Deno.test("KV Connect through the proxy: the KV suite", opts, async (t) => {
  await using stack = await startStack();
  const kv = await openRemoteKv(stack.proxy.url);
  try {
    await kvSuite(t, kv);
  } finally {
    kv.close();
  }
});

Deno.test(`${KV_SERVER} denokv directly: the KV suite`, opts, async (t) => {
  await using stack = await startStack();
  const kv = await openRemoteKv(stack.denokv.url);
  try {
    await kvSuite(t, kv);
  } finally {
    kv.close();
  }
});

Deno.test(
  "kv.watch() through the proxy sees another client's change and outlives a ping",
  opts,
  async () => {
    await using stack = await startStack();
    const watcher = await openRemoteKv(stack.proxy.url);
    const writer = await openRemoteKv(stack.proxy.url);
    try {
      const key = ["watched"];
      const reader = watcher.watch([key]).getReader();
      const initial = await reader.read();
      assert.equal(initial.value?.[0].value, null);

      const t0 = performance.now();
      await writer.set(key, "first");
      const first = await reader.read();
      const firstMs = performance.now() - t0;
      assert.equal(first.value?.[0].value, "first");
      assert.ok(firstMs < 1_000, `change seen after ${firstMs.toFixed(0)} ms`);

      // denokv sends an empty ping frame every 5 s; the stream must survive it.
      await new Promise((r) => setTimeout(r, 6_000));
      const t1 = performance.now();
      await writer.set(key, "second");
      const second = await reader.read();
      const secondMs = performance.now() - t1;
      assert.equal(second.value?.[0].value, "second");
      assert.ok(secondMs < 1_000, `change after ping seen after ${secondMs.toFixed(0)} ms`);
      await reader.cancel();
    } finally {
      watcher.close();
      writer.close();
    }
  },
);

Deno.test(
  "a client that drops its watch through the proxy ends the watch on denokv too",
  opts,
  async () => {
    await using stack = await startStack({ tap: true });
    const tap = stack.tap!;
    const kv = await openRemoteKv(stack.proxy.url);
    const reader = kv.watch([["dropped"]]).getReader();
    await reader.read();
    await waitFor("the watch to open upstream", () => tap.requests("/v2/watch").length === 1);
    const [{ conn }] = tap.requests("/v2/watch");
    assert.ok(!tap.closed(conn), "the upstream watch closed before the client dropped it");
    const t0 = performance.now();
    await reader.cancel();
    kv.close();
    // Before denokv's next 5 s ping could have noticed it.
    await waitFor("the watch to end upstream", () => tap.closed(conn), { timeoutMs: 4_000 });
    assert.ok(performance.now() - t0 < 4_000);
  },
);

Deno.test(
  "wrong token: Deno.openKv fails with the 401 message and returns no data",
  opts,
  async () => {
    await using stack = await startStack();
    const good = await openRemoteKv(stack.proxy.url);
    await good.set(["secret"], "do not leak");
    good.close();

    const bad = await openRemoteKv(stack.proxy.url, "wrong-token-000000000").catch((e) => e);
    // The client may connect lazily: the first operation must fail with the 401 then.
    const err = bad instanceof Error ? bad : await bad.get(["secret"]).then(
      (v: unknown) => v,
      (e: unknown) => e,
    );
    if (!(bad instanceof Error)) bad.close();
    assert.ok(err instanceof Error, `expected an error, got ${JSON.stringify(err)}`);
    assert.match(err.message, /401|Invalid access token/);

    const raw = await fetch(`${stack.proxy.url}/v2/snapshot_read`, {
      method: "POST",
      headers: {
        authorization: "Bearer wrong-token-000000000",
        "x-denokv-version": "3",
        "x-denokv-database-id": "00000000-0000-0000-0000-000000000000",
      },
      body: new Uint8Array(0),
    });
    assert.equal(raw.status, 401);
    assert.equal(await raw.text(), "Invalid access token.");
  },
);

Deno.test("malformed KV Connect requests get a clear 4xx and lose no data", opts, async () => {
  await using stack = await startStack();
  const kv = await openRemoteKv(stack.proxy.url);
  await kv.set(["kept"], "safe");
  const headers = {
    authorization: `Bearer ${TEST_TOKEN}`,
    "x-denokv-version": "3",
    "x-denokv-database-id": "00000000-0000-0000-0000-000000000000",
  };
  const garbage = await fetch(`${stack.proxy.url}/v2/atomic_write`, {
    method: "POST",
    headers,
    body: new Uint8Array([0xff, 0xff, 0xff, 0x01, 0x02]),
  });
  assert.equal(garbage.status, 400);
  assert.match(await garbage.text(), /protobuf is invalid/i);

  const noVersion = await fetch(`${stack.proxy.url}/v2/snapshot_read`, {
    method: "POST",
    headers: { authorization: `Bearer ${TEST_TOKEN}` },
    body: new Uint8Array(0),
  });
  assert.equal(noVersion.status, 400);
  assert.equal(await noVersion.text(), "Expected protocol version 2.");

  const oldClient = await fetch(`${stack.proxy.url}/`, {
    method: "POST",
    headers: { authorization: `Bearer ${TEST_TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify({ supportedVersions: [1] }),
  });
  assert.equal(oldClient.status, 400);
  assert.match(await oldClient.text(), /protocol version 2 or 3/);

  const tooLarge = await fetch(`${stack.proxy.url}/v2/atomic_write`, {
    method: "POST",
    headers,
    body: new Uint8Array(2 * 1024 * 1024),
  });
  assert.equal(tooLarge.status, 413);
  assert.match(await tooLarge.text(), /too large/);

  assert.equal((await kv.get(["kept"])).value, "safe");
  kv.close();
});

Deno.test(
  "denokv stopped: KV requests and /healthz get 503; restarted: both recover",
  opts,
  async () => {
    await using stack = await startStack();
    const base = stack.proxy.url;
    const health = await fetch(`${base}/healthz`);
    assert.equal(health.status, 200);
    await health.body?.cancel();

    const kv = await openRemoteKv(base);
    await kv.set(["before"], 1);
    const sqlitePath = join(stack.dir, "denokv.sqlite");
    const port = stack.denokv.port;
    await stack.denokv.stop("SIGKILL");

    const down = await fetch(`${base}/healthz`);
    assert.equal(down.status, 503);
    assert.match(await down.text(), /denokv unavailable/);
    const kvDown = await fetch(`${base}/v2/snapshot_read`, {
      method: "POST",
      headers: { authorization: `Bearer ${TEST_TOKEN}`, "x-denokv-version": "3" },
      body: new Uint8Array(0),
    });
    assert.equal(kvDown.status, 503);
    assert.match(await kvDown.text(), /unreachable/);

    await using again = await startDenokv({ sqlitePath, port });
    await waitFor("healthz to recover", async () => {
      const res = await fetch(`${base}/healthz`);
      await res.body?.cancel();
      return res.status === 200;
    });
    // The client retries 5xx by itself, so the open connection recovers too.
    assert.equal((await kv.get(["before"])).value, 1);
    assert.equal((await kv.set(["after"], 2)).ok, true);
    kv.close();
    assert.ok(again.port === port);
  },
);

Deno.test("proxy answers 503 instead of hanging when denokv never answers", opts, async () => {
  // A listener that accepts connections and never replies.
  const silent = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns: Deno.Conn[] = [];
  (async () => {
    for await (const c of silent) conns.push(c);
  })();
  const port = (silent.addr as Deno.NetAddr).port;
  await using proxy = await startProxy({
    denokvUrl: `http://127.0.0.1:${port}`,
    env: { UPSTREAM_TIMEOUT_MS: "1000" },
  });
  const res = await fetch(`${proxy.url}/v2/snapshot_read`, {
    method: "POST",
    headers: { authorization: `Bearer ${TEST_TOKEN}`, "x-denokv-version": "3" },
    body: new Uint8Array(0),
  });
  assert.equal(res.status, 503);
  assert.match(await res.text(), /no answer within 1000 ms/);
  silent.close();
  for (const c of conns) c.close();
});
