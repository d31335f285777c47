/** Tests of proxy/status.ts through `app.request()`, on a real history file. */
import assert from "node:assert/strict";
import { Hono } from "hono";
import { statusRoutes } from "../proxy/status.ts";
import { appendHistory, type CheckRecord, HISTORY_KEEP } from "../scripts/backup_check/history.ts";

const TOKEN = "status-test-token-0123";

function record(id: string, finishedAt: Date): CheckRecord {
  return {
    status: "PASSED",
    app: "status-test",
    startedAt: new Date(finishedAt.getTime() - 5_000).toISOString(),
    finishedAt: finishedAt.toISOString(),
    canaryId: id,
    checks: [{ name: "canary", ok: true, detail: `canary ${id}`, ms: 10 }],
    delivery: "email",
  };
}

async function appOn(dataDir: string): Promise<Hono> {
  const app = new Hono();
  statusRoutes({ dataDir, accessToken: TOKEN })(app);
  return await Promise.resolve(app);
}

Deno.test("statusRoutes() GET /status is 401 without the token or with a wrong one", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await appendHistory(dir, record("a", new Date()));
    const app = await appOn(dir);
    const none = await app.request("/status");
    assert.equal(none.status, 401);
    assert.ok(!(await none.text()).includes("canary"));
    const wrong = await app.request("/status", { headers: { Authorization: "Bearer nope" } });
    assert.equal(wrong.status, 401);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("statusRoutes() GET /status returns the latest check and its age", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await appendHistory(dir, record("older", new Date(Date.now() - 86_400_000)));
    await appendHistory(dir, record("latest", new Date(Date.now() - 60_000)));
    const res = await (await appOn(dir)).request("/status", {
      headers: { Authorization: `Bearer ${TOKEN}` },
    });
    assert.equal(res.status, 200);
    const body = await res.json();
    assert.equal(body.backupCheck.canaryId, "latest");
    assert.equal(body.backupCheck.status, "PASSED");
    assert.ok(body.ageSeconds >= 59 && body.ageSeconds <= 120, `age ${body.ageSeconds}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("statusRoutes() GET /status is 404 JSON before any check has run", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const res = await (await appOn(dir)).request("/status", {
      headers: { Authorization: `Bearer ${TOKEN}` },
    });
    assert.equal(res.status, 404);
    assert.deepEqual(await res.json(), { error: "no backup check has run yet", backupCheck: null });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("appendHistory() keeps the last HISTORY_KEEP lines", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (let i = 0; i < HISTORY_KEEP + 5; i++) {
      await appendHistory(dir, record(`r${i}`, new Date()));
    }
    const lines = (await Deno.readTextFile(`${dir}/backup-checks.jsonl`)).trim().split("\n");
    assert.equal(lines.length, HISTORY_KEEP);
    assert.equal(JSON.parse(lines[0]).canaryId, "r5");
    assert.equal(JSON.parse(lines.at(-1)!).canaryId, `r${HISTORY_KEEP + 4}`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("statusRoutes() rejects an empty token at construction", () => {
  assert.throws(() => statusRoutes({ dataDir: "/data", accessToken: "" }), /"accessToken"/);
});
