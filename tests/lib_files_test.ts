/**
 * `/lib/` file serving: content type, ETag, HEAD, traversal and symlink
 * refusals (through `app.request()`), and a real `deno run --allow-import`
 * of a module served by a running proxy.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { createApp } from "../proxy/app.ts";
import { DENO, startProxy, TEST_TOKEN } from "./_helpers/processes.ts";

async function fixture(): Promise<{ root: string; lib: string }> {
  const root = await Deno.makeTempDir({ prefix: "lib-test-" });
  const lib = join(root, "lib");
  await Deno.mkdir(lib);
  await Deno.writeTextFile(join(root, "deno.json"), '{"secret": true}');
  await Deno.writeTextFile(join(lib, "greet.ts"), 'export const greeting: string = "hello";\n');
  await Deno.symlink(join(root, "deno.json"), join(lib, "escape.ts"));
  return { root, lib };
}

function appFor(lib: string) {
  return createApp({ denokvUrl: "http://127.0.0.1:9", libDir: lib, accessToken: TEST_TOKEN });
}

Deno.test("GET /lib/<file> serves TypeScript with a content type and an ETag", async () => {
  const { root, lib } = await fixture();
  try {
    const app = appFor(lib);
    const res = await app.request("/lib/greet.ts");
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("content-type"), "application/typescript; charset=utf-8");
    const tag = res.headers.get("etag");
    assert.ok(tag && tag.startsWith('"'), `etag ${tag}`);
    assert.match(await res.text(), /greeting/);

    const again = await app.request("/lib/greet.ts", { headers: { "if-none-match": tag! } });
    assert.equal(again.status, 304);

    const head = await app.request("/lib/greet.ts", { method: "HEAD" });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get("content-type"), "application/typescript; charset=utf-8");
    assert.equal(await head.text(), "");
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("GET /lib/ refuses traversal, encoded dot segments and symlinks out with 404", async () => {
  const { root, lib } = await fixture();
  try {
    const app = appFor(lib);
    for (
      const path of [
        "/lib/../deno.json",
        "/lib/%2e%2e/deno.json",
        "/lib/..%2fdeno.json",
        "/lib/%2e%2e%2fdeno.json",
        "/lib/.%2e/deno.json",
        "/lib/escape.ts",
        "/lib/",
        "/lib/missing.ts",
        "/lib/..\\deno.json",
      ]
    ) {
      const res = await app.request(path);
      const body = await res.text();
      assert.equal(res.status, 404, `${path} answered ${res.status}`);
      assert.ok(!body.includes("secret"), `${path} leaked the file`);
    }
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("GET /lib/ traversal over a real socket is 404 too", {
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  const { root, lib } = await fixture();
  await using proxy = await startProxy({ denokvUrl: "http://127.0.0.1:9", libDir: lib });
  try {
    // fetch() normalises "..", so send raw request lines.
    for (const path of ["/lib/../deno.json", "/lib/%2e%2e/deno.json", "/lib/..%2fdeno.json"]) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: proxy.port });
      await conn.write(
        new TextEncoder().encode(`GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`),
      );
      const reply = new TextDecoder().decode(
        await new Response(conn.readable).arrayBuffer(),
      );
      assert.match(reply, /^HTTP\/1\.1 404/, `${path}: ${reply.split("\r\n")[0]}`);
      assert.ok(!reply.includes("secret"));
    }
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("a real deno run --allow-import=127.0.0.1:<port> imports a module from /lib/", {
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  const { root, lib } = await fixture();
  await using proxy = await startProxy({ denokvUrl: "http://127.0.0.1:9", libDir: lib });
  try {
    const script = join(root, "use.ts");
    await Deno.writeTextFile(
      script,
      `import { greeting } from "${proxy.url}/lib/greet.ts";\nconsole.log(greeting + " from lib");\n`,
    );
    const out = await new Deno.Command(DENO, {
      args: [
        "run",
        "--no-config",
        "--reload",
        `--allow-import=127.0.0.1:${proxy.port}`,
        script,
      ],
      env: { DENO_DIR: join(root, "deno_dir") },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, stderr);
    assert.equal(new TextDecoder().decode(out.stdout).trim(), "hello from lib");
  } finally {
    await Deno.remove(root, { recursive: true });
  }
});

Deno.test("GET / explains how to connect; KV responses carry no wildcard CORS", async () => {
  const app = appFor("/nonexistent-lib");
  const res = await app.request("http://kv.example.dev/");
  const page = await res.text();
  assert.equal(res.status, 200);
  assert.match(page, /Deno\.openKv\("http:\/\/kv\.example\.dev"\)/);
  assert.match(page, /DENO_KV_ACCESS_TOKEN/);
  assert.match(page, /--allow-import=kv\.example\.dev/);
  assert.equal(res.headers.get("access-control-allow-origin"), null);
});

Deno.test("createApp() rejects bad options with the value given", () => {
  assert.throws(
    () => createApp({ denokvUrl: "not a url", libDir: "/x", accessToken: TEST_TOKEN }),
    /"denokvUrl" must be an http\(s\) URL: got not a url/,
  );
  assert.throws(
    () => createApp({ denokvUrl: "http://x", libDir: "relative", accessToken: TEST_TOKEN }),
    /"libDir" must be an absolute path: got relative/,
  );
  assert.throws(
    () =>
      createApp({
        denokvUrl: "http://x",
        libDir: "/x",
        accessToken: TEST_TOKEN,
        maxBodyBytes: -1,
      }),
    /"maxBodyBytes" must be a positive integer: got -1/,
  );
});

Deno.test("access log: one line per request, never the token", {
  sanitizeOps: false,
  sanitizeResources: false,
}, async () => {
  const lines: string[] = [];
  const app = createApp({
    denokvUrl: "http://127.0.0.1:9",
    libDir: "/nonexistent-lib",
    accessToken: TEST_TOKEN,
    log: (l) => lines.push(l),
  });
  const res = await app.request("/v2/snapshot_read?token=" + TEST_TOKEN, {
    method: "POST",
    headers: { authorization: `Bearer ${TEST_TOKEN}` },
    body: "x",
  });
  assert.equal(res.status, 503);
  await res.body?.cancel();
  assert.equal(lines.length, 1);
  assert.match(lines[0], /^POST \/v2\/snapshot_read 503 \d+\.\dms$/);
  assert.ok(!lines[0].includes(TEST_TOKEN));
});
