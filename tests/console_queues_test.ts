/**
 * The console's queue routes (`proxy/console/queue_routes.tsx`) without a
 * browser: `app.request()` against a queue on `Deno.openKv(":memory:")` with
 * a real runner, for what the browser test does not reach: bad input, a
 * running message that cancel must refuse, and the confirmation step.
 */
import assert from "node:assert/strict";
import { Hono } from "hono";
import { consoleRoutes } from "../proxy/console/mod.tsx";
import { encodeKey } from "../proxy/console/kv_format.ts";
import { ProxyMetrics } from "../proxy/metrics.ts";
import { KvQueue, KvQueueRunner } from "../lib/kv_queue.ts";
import { freePort, waitFor } from "./_helpers/processes.ts";

const TOKEN = "console-queues-token";

/** A console on `kv`, logged in: returns a request function carrying the session and the CSRF token. */
async function loggedIn(kv: Deno.Kv, metrics: ProxyMetrics) {
  const app = new Hono();
  consoleRoutes({
    accessToken: TOKEN,
    dataDir: "/nonexistent",
    metrics,
    openKv: () => Promise.resolve(kv),
    queuePrefixes: [["jobs"]],
  })(app);
  const login = await app.request("/console/login", {
    method: "POST",
    body: new URLSearchParams({ token: TOKEN }),
  });
  assert.equal(login.status, 303);
  const cookie = (login.headers.get("set-cookie") ?? "").split(";")[0];
  const page = await (await app.request("/console/queues", { headers: { cookie } })).text();
  const csrf = page.match(/name="_csrf" value="([^"]+)"/)?.[1];
  assert(csrf, "no CSRF token on the queues page");
  const get = (path: string) => app.request(path, { headers: { cookie } });
  const post = (path: string, fields: Record<string, string>, withCsrf = true) =>
    app.request(path, {
      method: "POST",
      headers: { cookie },
      body: new URLSearchParams(withCsrf ? { _csrf: csrf, ...fields } : fields),
    });
  return { get, post };
}

Deno.test({
  name: "console queue routes: bad queue, state or cursor are refused; a running message is " +
    "not cancelled; cancel and pause act only once confirmed, and only with the CSRF token",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const kv = await Deno.openKv(":memory:");
    const metrics = new ProxyMetrics({
      denokvUrl: `http://127.0.0.1:${freePort()}`,
      accessToken: TOKEN,
      dataDir: "/nonexistent",
      dbPath: "/nonexistent/denokv.sqlite",
    });
    let runner: KvQueueRunner | undefined;
    const release = Promise.withResolvers<void>();
    try {
      const { get, post } = await loggedIn(kv, metrics);
      const jobs = encodeKey(["jobs"]);

      // Bad input: a queue that is not listed, an unknown state, a cursor that is not one.
      for (
        const path of [
          `/console/queues/pending?prefix=${encodeKey(["other"])}&state=ready`,
          `/console/queues/pending?prefix=not-a-key&state=ready`,
          `/console/queues/pending?prefix=${jobs}&state=sleeping`,
          `/console/queues/pending?prefix=${jobs}&state=ready&cursor=nonsense`,
        ]
      ) {
        const res = await get(path);
        await res.body?.cancel();
        assert.equal(res.status, 400, path);
      }
      const unknown = await post("/console/queues/pause", {
        prefix: encodeKey(["other"]),
        confirm: "yes",
      });
      await unknown.body?.cancel();
      assert.equal(unknown.status, 400);

      // A message running now: listed as running, and cancel refuses it.
      const queue = new KvQueue(kv, { prefix: ["jobs"] });
      let runs = 0;
      queue.handle("slow", async () => {
        runs++;
        await release.promise;
      });
      runner = new KvQueueRunner(kv, queue);
      const running = runner.run();
      const id = await queue.enqueue("slow", null);
      await waitFor("the message to start", () => runs === 1, { timeoutMs: 10_000 });
      const listed = await (await get(`/console/queues/pending?prefix=${jobs}&state=running`))
        .text();
      assert.match(listed, new RegExp(`data-id="${id}"`));

      // Without confirm=yes: the confirmation page, nothing done.
      const ask = await post("/console/queues/cancel", { prefix: jobs, id, state: "running" });
      assert.equal(ask.status, 200);
      assert.match(
        await ask.text(),
        new RegExp(`Cancel pending message ${id} of \\[&quot;jobs&quot;\\]\\?`),
      );
      const refused = await post("/console/queues/cancel", {
        prefix: jobs,
        id,
        state: "running",
        confirm: "yes",
      });
      assert.equal(refused.status, 303);
      const back = new URL(refused.headers.get("location")!, "http://x");
      assert.equal(back.pathname, "/console/queues/pending");
      assert.equal(back.searchParams.get("state"), "running");
      assert.equal(
        back.searchParams.get("done"),
        `${id} was not cancelled: it is no longer pending, or a worker is running it now.`,
      );
      release.resolve();
      await waitFor("the message to complete", async () => {
        const s = await queue.stats();
        return s.ready + s.delayed + s.running === 0;
      }, { timeoutMs: 10_000, intervalMs: 50 });
      assert.equal(runs, 1);

      // Pause: not without the CSRF token, not before the confirmation, then for good.
      const forged = await post("/console/queues/pause", { prefix: jobs, confirm: "yes" }, false);
      await forged.body?.cancel();
      assert.equal(forged.status, 403);
      const askPause = await post("/console/queues/pause", { prefix: jobs });
      assert.match(await askPause.text(), /Pause \[&quot;jobs&quot;\]\?/);
      assert.equal(await queue.isPaused(), false);
      const paused = await post("/console/queues/pause", { prefix: jobs, confirm: "yes" });
      await paused.body?.cancel();
      assert.equal(paused.status, 303);
      assert.equal(await queue.isPaused(), true);
      const resumed = await post("/console/queues/resume", { prefix: jobs, confirm: "yes" });
      await resumed.body?.cancel();
      assert.equal(await queue.isPaused(), false);

      await runner.stop();
      await running;
      runner = undefined;
    } finally {
      release.resolve();
      await runner?.stop().catch(() => {});
      metrics.close();
      kv.close();
    }
  },
});
