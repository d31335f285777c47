/**
 * Unit tests of the proxy's one token check (proxy/auth.ts) and of the access
 * log's escaping (proxy/app.ts).
 */
import assert from "node:assert/strict";
import { Hono } from "hono";
import { bearerChecker, requireToken, validateToken } from "../proxy/auth.ts";
import { escapeLogText } from "../proxy/app.ts";

const TOKEN = "tok:en!#$%&'()*+,-./ ;<=>?@[]^_`{|}~\"\\";

Deno.test("validateToken() accepts every printable ASCII character and names a bad one's position", () => {
  assert.equal(validateToken(TOKEN), TOKEN);
  assert.throws(() => validateToken("short"), /at least 12 characters: got 5/);
  assert.throws(() => validateToken("abc\u0001defghijklm"), /printable ASCII .* character 4 of 14/);
  assert.throws(() => validateToken(" leading-space-token"), /character 1 of 20/);
  assert.throws(() => validateToken("non-ascii-tokén-here"), /character 14 of 20/);
});

Deno.test("bearerChecker() matches exactly `Bearer <token>`", () => {
  const matches = bearerChecker(TOKEN);
  assert.equal(matches(`Bearer ${TOKEN}`), true);
  assert.equal(matches(`Bearer ${TOKEN}x`), false);
  assert.equal(matches(`Bearer ${TOKEN.slice(0, -1)}`), false);
  assert.equal(matches(`bearer ${TOKEN}`), false);
  assert.equal(matches(undefined), false);
  assert.equal(matches(""), false);
});

Deno.test("requireToken(): 401 with denokv's text; the route runs only with the token", async () => {
  const app = new Hono();
  app.post("/x", requireToken({ token: TOKEN }), (c) => c.text("in"));
  const ok = await app.request("/x", {
    method: "POST",
    headers: { authorization: `Bearer ${TOKEN}` },
  });
  assert.equal(await ok.text(), "in");
  const no = await app.request("/x", {
    method: "POST",
    headers: { authorization: "Bearer nope-nope-nope" },
  });
  assert.equal(no.status, 401);
  assert.equal(await no.text(), "Invalid access token.");
});

Deno.test("escapeLogText() leaves no control character, quote or non-ASCII byte", () => {
  assert.equal(escapeLogText('/a\nb\r\tc\x1b[31m"\\é'), '/a\\nb\\r\\tc\\x1b[31m\\"\\\\\\xe9');
  assert.equal(escapeLogText("/v2/atomic_write"), "/v2/atomic_write");
});
