/**
 * Tests for proxy/upstream.ts, the proxy's keep-alive HTTP/1.1 client, against
 * a scripted TCP server that answers each request with exactly the bytes (or
 * the silence, or the hang-up) a test asks for.
 */
import assert from "node:assert/strict";
import { UnsendableRequest, Upstream, UpstreamError } from "../proxy/upstream.ts";
import { decoder, encoder, ok, scriptedServer } from "./_helpers/scripted_server.ts";

function post(upstream: Upstream, body = "hello", idempotent = false) {
  return upstream.send({
    method: "POST",
    path: "/v2/snapshot_read",
    headers: new Headers({ authorization: "Bearer secret-token-123", "x-denokv-version": "3" }),
    body: encoder.encode(body),
    idempotent,
  });
}

const text = (res: { body: Uint8Array }) => decoder.decode(res.body);

Deno.test("Upstream.send() forwards end-to-end headers and the body, and reuses its connection", async () => {
  const server = scriptedServer((req) => ok(`got ${req.body}`));
  const upstream = new Upstream(server.url);
  try {
    const res = await upstream.send({
      method: "POST",
      path: "/v2/atomic_write?x=1",
      headers: new Headers({
        authorization: "Bearer secret-token-123",
        connection: "keep-alive, x-hop",
        "x-hop": "drop me",
        "keep-alive": "timeout=5",
        te: "trailers",
        host: "client.example",
        "x-denokv-version": "3",
      }),
      body: encoder.encode("payload"),
    });
    assert.equal(res.status, 200);
    assert.equal(text(res), "got payload");
    assert.deepEqual(res.headers, [["content-type", "text/plain"]]);
    const head = server.received[0].head;
    assert.match(head, /^POST \/v2\/atomic_write\?x=1 HTTP\/1\.1\r\n/);
    assert.match(head, /\r\nauthorization: Bearer secret-token-123(\r\n|$)/);
    assert.match(head, /\r\nx-denokv-version: 3(\r\n|$)/);
    assert.match(head, /\r\nhost: 127\.0\.0\.1:\d+(\r\n|$)/);
    assert.match(head, /\r\ncontent-length: 7(\r\n|$)/);
    for (const dropped of ["x-hop", "keep-alive", "te", "connection"]) {
      assert.doesNotMatch(head, new RegExp(`\r\n${dropped}:`), `${dropped} was forwarded`);
    }
    assert.ok(!head.includes("client.example"), "the client's host was forwarded");
    for (let i = 0; i < 5; i++) assert.equal(text(await post(upstream, `n${i}`)), `got n${i}`);
    assert.deepEqual(new Set(server.received.map((r) => r.connection)), new Set([1]));
    assert.equal(upstream.openConnections, 1);
  } finally {
    upstream.close();
    server.close();
  }
});

Deno.test("Upstream.send() reads chunked answers, answers without a length, and skips 1xx", async () => {
  let n = 0;
  const server = scriptedServer(() => {
    n++;
    if (n === 1) {
      return "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" +
        "5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
    }
    if (n === 2) return "HTTP/1.1 100 Continue\r\n\r\n" + ok("after continue");
    return "HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end";
  });
  const upstream = new Upstream(server.url);
  try {
    assert.equal(text(await post(upstream)), "hello, world");
    assert.equal(text(await post(upstream)), "after continue");
    // The body without a length ends when the server closes the connection.
    const untilEnd = post(upstream);
    await new Promise((r) => setTimeout(r, 100));
    server.hangUpAll();
    assert.equal(text(await untilEnd), "until the end");
    assert.equal(upstream.openConnections, 0, "a connection: close answer is not reused");
  } finally {
    upstream.close();
    server.close();
  }
});

Deno.test("Upstream.send() answers of every size arrive whole", async () => {
  const big = "x".repeat(3 * 1024 * 1024 + 7);
  const server = scriptedServer((req) => ok(req.body === "big" ? big : "small"));
  const upstream = new Upstream(server.url);
  try {
    assert.equal(text(await post(upstream, "big")), big);
    assert.equal(text(await post(upstream, "small")), "small");
    assert.equal(upstream.openConnections, 1);
  } finally {
    upstream.close();
    server.close();
  }
});

Deno.test("Upstream drops an idle connection the server closed and opens a new one", async () => {
  const server = scriptedServer((req) => ok(req.body));
  const upstream = new Upstream(server.url);
  try {
    assert.equal(text(await post(upstream, "one")), "one");
    server.hangUpAll();
    // The pending read on the idle connection notices the end of stream.
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(upstream.openConnections, 0);
    // A write is not idempotent: it must not have needed a retry to succeed.
    assert.equal(text(await post(upstream, "two", false)), "two");
    assert.deepEqual(server.received.map((r) => r.connection), [1, 2]);
  } finally {
    upstream.close();
    server.close();
  }
});

Deno.test("Upstream: a hang-up after the request is retried for reads only", async () => {
  let hangUp = true;
  const server = scriptedServer((req) => {
    if (req.body === "warm") return ok("warm");
    if (hangUp) {
      hangUp = false;
      return "hang up";
    }
    return ok(req.body);
  });
  const upstream = new Upstream(server.url);
  try {
    await post(upstream, "warm");
    assert.equal(text(await post(upstream, "read", true)), "read");
    assert.equal(server.received.filter((r) => r.body === "read").length, 2, "sent twice");

    hangUp = true;
    await post(upstream, "warm");
    await assert.rejects(() => post(upstream, "write", false), UpstreamError);
    assert.equal(server.received.filter((r) => r.body === "write").length, 1, "never sent twice");
  } finally {
    upstream.close();
    server.close();
  }
});

Deno.test("Upstream: silence gives a clear timeout, broken answers a clear error", async () => {
  const server = scriptedServer((req) => {
    if (req.body === "silence") return "silence";
    if (req.body === "status") return "SMTP/1.0 nonsense\r\n\r\n";
    if (req.body === "length") return "HTTP/1.1 200 OK\r\ncontent-length: -4\r\n\r\n";
    if (req.body === "truncated") return "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc";
    if (req.body === "chunk") return "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n";
    if (req.body === "crlf") {
      return "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n";
    }
    return ok(req.body);
  });
  const upstream = new Upstream(server.url, { timeoutMs: 300 });
  try {
    const t0 = performance.now();
    await assert.rejects(() => post(upstream, "silence"), {
      name: "UpstreamError",
      message: "no answer within 300 ms",
    });
    assert.ok(performance.now() - t0 < 2_000, "the timeout fired late");
    await assert.rejects(() => post(upstream, "status"), /malformed status line: SMTP\/1.0/);
    await assert.rejects(() => post(upstream, "length"), /invalid content-length: -4/);
    const truncated = post(upstream, "truncated");
    await new Promise((r) => setTimeout(r, 50));
    server.hangUpAll();
    await assert.rejects(() => truncated, /closed the connection in the middle of an answer/);
    await assert.rejects(() => post(upstream, "chunk"), /malformed chunk size: zz/);
    await assert.rejects(() => post(upstream, "crlf"), /no CRLF after its data/);
    // After all that the client still works.
    assert.equal(text(await post(upstream, "fine")), "fine");
  } finally {
    upstream.close();
    server.close();
  }
});

Deno.test("Upstream.send() refuses a method or target that could split the request line, sending nothing", async () => {
  const server = scriptedServer((req) => ok(req.body));
  const upstream = new Upstream(server.url);
  try {
    const bad: [string, string][] = [
      ["POST", "/v2/x HTTP/1.1\r\nhost: y\r\n\r\nPOST /v2/atomic_write"],
      ["POST", "/a b"],
      ["POST", "v2/no-leading-slash"],
      ["GET / HTTP/1.1\r\n", "/"],
    ];
    for (const [method, path] of bad) {
      await assert.rejects(
        () => upstream.send({ method, path, headers: new Headers(), body: new Uint8Array(0) }),
        UnsendableRequest,
      );
    }
    assert.equal(server.received.length, 0);
    assert.equal(text(await post(upstream, "fine")), "fine");
  } finally {
    upstream.close();
    server.close();
  }
});

Deno.test("Upstream reuses a connection only after a clean HTTP/1.1 or keep-alive HTTP/1.0 answer", async () => {
  const answers = [
    "HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nhi",
    "HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nhi",
    ok("hi"),
  ];
  let n = 0;
  const server = scriptedServer(() => answers[n++]);
  const upstream = new Upstream(server.url);
  try {
    for (let i = 0; i < answers.length; i++) assert.equal(text(await post(upstream)), "hi");
    // HTTP/1.0 closes, and a message framed two ways is not trusted after.
    assert.deepEqual(server.received.map((r) => r.connection), [1, 2, 3, 3]);
  } finally {
    upstream.close();
    server.close();
  }
});

Deno.test("Upstream: a read retried after a hang-up goes to a fresh connection", async () => {
  // Connections 1 and 2 look alive but hang up on the next request (as after
  // a restart the pending reads have not noticed yet).
  const server = scriptedServer((req) =>
    req.body === "read" && req.connection <= 2 ? "hang up" : ok(req.body)
  );
  const upstream = new Upstream(server.url);
  try {
    await Promise.all([post(upstream, "warm 1"), post(upstream, "warm 2")]);
    assert.equal(upstream.openConnections, 2);
    assert.equal(text(await post(upstream, "read", true)), "read");
    assert.deepEqual(
      server.received.filter((r) => r.body === "read").map((r) => r.connection),
      [2, 3],
    );
  } finally {
    upstream.close();
    server.close();
  }
});

Deno.test("Upstream: an unreachable server is an UpstreamError naming the cause", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  const upstream = new Upstream(`http://127.0.0.1:${port}`);
  await assert.rejects(() => post(upstream), (e: unknown) => {
    assert.ok(e instanceof UpstreamError);
    assert.match(e.message, /refused/i);
    return true;
  });
  upstream.close();
});

Deno.test("new Upstream() rejects bad options with the value given", () => {
  assert.throws(() => new Upstream("https://example.com"), {
    name: "TypeError",
    message: '"origin" must be an http: URL: got https://example.com/',
  });
  assert.throws(() => new Upstream("http://127.0.0.1:1", { timeoutMs: 0 }), {
    name: "RangeError",
    message: '"timeoutMs" must be a positive integer: got 0',
  });
});
