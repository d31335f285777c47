/**
 * The operator's console (`proxy/console/`) in a real browser: headless
 * Debian Chromium driven by playwright-core against a real stack (supervisord,
 * Litestream, fauxqs). Screenshots of each page go to docs/ with
 * UPDATE_SCREENSHOTS=1.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { type Browser, chromium, type Page } from "playwright-core";
import { openRemoteKv, ROOT, TEST_TOKEN, waitFor } from "./_helpers/processes.ts";
import { startFauxS3 } from "./_helpers/s3.ts";
import { startSupervised } from "./_helpers/supervised.ts";
import { appendHistory, type CheckRecord } from "../scripts/backup_check/history.ts";
import { KvQueue, KvQueueRunner } from "../lib/kv_queue.ts";

const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--no-first-run",
];

function record(status: "PASSED" | "FAILED", hoursAgo: number): CheckRecord {
  const finished = Date.now() - hoursAgo * 3_600_000;
  return {
    status,
    app: "console-test",
    startedAt: new Date(finished - 4_000).toISOString(),
    finishedAt: new Date(finished).toISOString(),
    canaryId: crypto.randomUUID(),
    failedStep: status === "FAILED" ? "restore" : undefined,
    checks: [{ name: "canary", ok: true, detail: "", ms: 1 }],
  };
}

/** Logs in through a POST of the login form; returns status and ms taken. */
async function postLogin(
  url: string,
  token: string,
  headers: Record<string, string> = {},
): Promise<{ status: number; ms: number }> {
  const started = performance.now();
  const res = await fetch(`${url}/console/login`, {
    method: "POST",
    headers,
    body: new URLSearchParams({ token }),
    redirect: "manual",
  });
  await res.body?.cancel();
  return { status: res.status, ms: performance.now() - started };
}

/** Screenshots go to docs/ only when asked (`UPDATE_SCREENSHOTS=1`): a test run leaves the tree clean. */
let shotDir = join(ROOT, "docs");

/** How long the messages of the test's second queue wait: longer than the steps before the cancel. */
const JOB_DELAY_MS = 25_000;

async function shot(page: Page, name: string): Promise<void> {
  await page.screenshot({ path: join(shotDir, `console-${name}.png`), fullPage: true });
}

/** The values the data browser must show, exactly, per type. */
const TYPED: [string, unknown, string, string][] = [
  ["string", "hello <world>", "string", `"hello <world>"`],
  ["number", 42.5, "number", "42.5"],
  ["bigint", 12345678901234567890n, "bigint", "12345678901234567890n"],
  ["u64", new Deno.KvU64(7n), "Deno.KvU64", "[Deno.KvU64: 7n]"],
  ["bytes", new Uint8Array([1, 2, 255]), "Uint8Array", "Uint8Array(3) [ 1, 2, 255 ]"],
  ["date", new Date("2026-01-02T03:04:05.678Z"), "Date", "2026-01-02T03:04:05.678Z"],
  ["map", new Map<string, unknown>([["a", 1], ["b", 2n]]), "Map", `Map(2) { "a" => 1, "b" => 2n }`],
  ["set", new Set([1, "x"]), "Set", `Set(2) { 1, "x" }`],
  [
    "object",
    { name: "Ada", tags: ["a", "b"], nested: { when: new Date(0), n: 1n } },
    "object",
    `{\n  name: "Ada",\n  tags: [ "a", "b" ],\n  nested: { when: 1970-01-01T00:00:00.000Z, n: 1n }\n}`,
  ],
];

Deno.test({
  name: "console: login, health and backups, dead letter requeue, pause, pending list and " +
    "cancel (the message never runs), resume, typed data, delete, usage, logout",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "console-test-" });
    if (Deno.env.get("UPDATE_SCREENSHOTS") !== "1") shotDir = dir;
    let browser: Browser | undefined;
    let runner: KvQueueRunner | undefined;
    const kv = { current: undefined as Deno.Kv | undefined };
    try {
      await using stack = await startSupervised(s3, {
        dataDir: join(dir, "data"),
        replicaPath: "console",
        env: { QUEUE_PREFIXES: `[["jobs"]]` },
      });
      await appendHistory(stack.dataDir, record("FAILED", 48));
      await appendHistory(stack.dataDir, record("PASSED", 24));
      await appendHistory(stack.dataDir, record("PASSED", 1));
      const url = stack.url;

      // No page without a session: GETs go to the login form, POSTs are refused.
      for (const path of ["/console", "/console/queues", "/console/data", "/console/usage"]) {
        const res = await fetch(`${url}${path}`, { redirect: "manual" });
        await res.body?.cancel();
        assert.equal(res.status, 303, path);
        assert.equal(res.headers.get("location"), "/console/login", path);
      }
      const anonymous = await fetch(`${url}/console/data/delete`, {
        method: "POST",
        body: new URLSearchParams({ key: "x", confirm: "yes" }),
      });
      await anonymous.body?.cancel();
      assert.equal(anonymous.status, 403);

      // Wrong tokens are refused, each answer slower than the last; off Fly, a forged
      // Fly-Client-IP (the 4th) does not make a new client.
      const wrong: number[] = [];
      for (let i = 0; i < 4; i++) {
        const forged: Record<string, string> = i === 3 ? { "fly-client-ip": "192.0.2.7" } : {};
        const r = await postLogin(url, `wrong-token-${i}-xxxxxxxx`, forged);
        assert.equal(r.status, 401);
        wrong.push(r.ms);
      }
      console.log(
        `figure: wrong-token answers took ${wrong.map((m) => m.toFixed(0)).join(", ")} ms`,
      );
      assert(wrong[3] >= 900, `4th wrong token answered after ${wrong[3]} ms`);
      assert(wrong[3] > wrong[1] * 2, `no slow-down: ${wrong.join(", ")}`);

      // Seed data, a dead letter and a runner that delivers it once requeued.
      kv.current = await openRemoteKv(url);
      for (const [name, value] of TYPED) await kv.current.set(["typed", name], value);
      for (let i = 0; i < 25; i++) await kv.current.set(["paged", i], i);
      const queue = new KvQueue(kv.current);
      let armed = false;
      let delivered: unknown;
      queue.handle("mail", (data) => {
        if (!armed) throw new Error("smtp down: boom");
        delivered = data;
      });
      runner = new KvQueueRunner(kv.current, queue);
      const running = runner.run();
      await queue.enqueue("mail", { to: "ada@example.com" }, { maxAttempts: 1 });
      await waitFor("the message to die", async () => (await queue.stats()).dead === 1, {
        timeoutMs: 30_000,
        intervalMs: 200,
      });
      armed = true;

      browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: CHROMIUM_ARGS });
      const context = await browser.newContext({ viewport: { width: 1200, height: 900 } });
      const page = await context.newPage();
      // Scripts must run clean under the console's Content-Security-Policy.
      const pageErrors: string[] = [];
      page.on("pageerror", (err) => pageErrors.push(err.message));
      page.on("console", (msg) => {
        if (msg.type() === "error") pageErrors.push(msg.text());
      });

      await page.goto(`${url}/console`);
      assert.equal(new URL(page.url()).pathname, "/console/login");
      await shot(page, "login");
      await page.fill("#token", "another-wrong-token-xx");
      await page.click("#login");
      assert.equal(await page.textContent("#error"), "Wrong token.");
      await page.fill("#token", TEST_TOKEN);
      await page.click("#login");
      assert.equal(new URL(page.url()).pathname, "/console");
      pageErrors.length = 0; // the refused login above logs its 401

      // The cookie is HttpOnly, SameSite=Strict and is not the token.
      const [cookie] = await context.cookies();
      assert.equal(cookie.httpOnly, true);
      assert.equal(cookie.sameSite, "Strict");
      assert(!cookie.value.includes(TEST_TOKEN));

      // Overview: health and backup history.
      assert.equal(await page.textContent("#denokv-status"), "up");
      assert.equal(await page.textContent("#litestream-status"), "up");
      assert.equal(await page.textContent("#proxy-status"), "up");
      assert.match((await page.textContent("#backup-latest")) ?? "", /Last check PASSED/);
      assert.equal(await page.locator("#backup-history tr").count(), 4);
      assert.equal(await page.locator("#backup-history td.bad").count(), 1);
      await page.waitForSelector("[data-chart=backup-chart] canvas", { timeout: 10_000 })
        .catch((err) => {
          throw new Error(`no chart drawn: ${pageErrors.join("; ")}`, { cause: err });
        });
      await shot(page, "overview");

      // A second queue, from QUEUE_PREFIXES: 25 delayed messages, no runner yet.
      const jobs = new KvQueue(kv.current, { prefix: ["jobs"] });
      const ran: number[] = [];
      jobs.handle<number>("report", (n) => {
        ran.push(n);
      });
      const jobIds: string[] = [];
      for (let i = 0; i < 25; i++) {
        jobIds.push(await jobs.enqueue("report", i, { delayMs: JOB_DELAY_MS }));
      }
      const jobsDue = Date.now() + JOB_DELAY_MS;

      // Queues: the counts of each; pause the jobs queue through the confirmation.
      await page.click("text=Queues");
      const jobsSection = page.locator(`section.queue[data-prefix='["jobs"]']`);
      assert.equal(await jobsSection.locator("td.delayed").textContent(), "25");
      assert.equal(await jobsSection.locator(".paused").count(), 0);
      await jobsSection.locator("button.pause").click();
      assert.match((await page.textContent("#question")) ?? "", /^Pause \["jobs"\]\?/);
      await page.click("#confirm");
      assert.match((await page.textContent("#flash")) ?? "", /^Paused \["jobs"\]/);
      assert.equal(await jobs.isPaused(), true);
      assert.equal(await jobsSection.locator(".paused").count(), 1);

      // The dead letter with its error; requeue, confirm, then it is delivered.
      const row = page.locator("section.queue", { hasText: "KvQueue (default)" })
        .locator("table.dead-letters tr", { hasText: "smtp down: boom" });
      assert.equal(await row.count(), 1);
      await shot(page, "queues");
      await row.locator("button.requeue").click();
      assert.match((await page.textContent("#question")) ?? "", /^Requeue dead letter/);
      await page.click("#confirm");
      assert.match((await page.textContent("#flash")) ?? "", /^Requeued /);
      await waitFor("the requeued message to be delivered", () => delivered !== undefined, {
        timeoutMs: 30_000,
      });
      assert.deepEqual(delivered, { to: "ada@example.com" });
      await runner.stop();
      await running;
      runner = undefined;

      // The jobs queue's delayed messages, 20 and 5 with the cursor; cancel one on page 2.
      await page.goto(`${url}/console/queues`);
      await jobsSection.locator("a.pending-delayed").click();
      const listed = () =>
        page.locator("#pending tr[data-id]").evaluateAll((rows) =>
          rows.map((r) => r.getAttribute("data-id"))
        );
      assert.deepEqual(await listed(), jobIds.slice(0, 20));
      await shot(page, "pending");
      await page.click("#next-page");
      assert.deepEqual(await listed(), jobIds.slice(20));
      assert.equal(await page.locator("#next-page").count(), 0);
      const cancelled = jobIds[22];
      await page.locator(`#pending tr[data-id="${cancelled}"] button.cancel`).click();
      assert.match(
        (await page.textContent("#question")) ?? "",
        new RegExp(`^Cancel pending message ${cancelled} of \\["jobs"\\]\\?`),
      );
      await page.click("#confirm");
      assert.equal(await page.textContent("#flash"), `Cancelled ${cancelled}: it will not run.`);
      assert(
        Date.now() < jobsDue,
        "the cancel came after the messages were due: raise JOB_DELAY_MS",
      );
      await page.click("#next-page");
      assert.deepEqual(await listed(), [...jobIds.slice(20, 22), ...jobIds.slice(23)]);

      // A runner on the paused queue: past every due time, nothing runs.
      runner = new KvQueueRunner(kv.current, jobs);
      const jobsRunning = runner.run();
      await new Promise((r) => setTimeout(r, jobsDue - Date.now() + 2_000));
      assert.deepEqual(ran, []);
      await page.goto(`${url}/console/queues`);
      assert.equal(await jobsSection.locator("td.ready").textContent(), "24");

      // Resume through the confirmation: the 24 others run, the cancelled one never does.
      await jobsSection.locator("button.resume").click();
      assert.match((await page.textContent("#question")) ?? "", /^Resume \["jobs"\]\?/);
      await page.click("#confirm");
      assert.match((await page.textContent("#flash")) ?? "", /^Resumed \["jobs"\]/);
      assert.equal(await jobs.isPaused(), false);
      await waitFor("the 24 other messages to run", () => ran.length >= 24, {
        timeoutMs: 60_000,
      });
      await waitFor("the jobs queue to be empty", async () => {
        const s = await jobs.stats();
        return s.ready + s.delayed + s.running === 0;
      }, { timeoutMs: 30_000, intervalMs: 200 });
      await new Promise((r) => setTimeout(r, 1_000));
      assert.deepEqual(
        ran.toSorted((a, b) => a - b),
        [...Array(25).keys()].filter((i) => i !== 22),
      );
      await runner.stop();
      await jobsRunning;
      runner = undefined;

      // Data: a prefix, each type shown exactly.
      await page.click("text=Data");
      await page.fill("#prefix", `["typed"]`);
      await page.click("#browse");
      assert.equal(await page.locator("#entries a.key").count(), TYPED.length);
      await shot(page, "data");
      for (const [name, , type, text] of TYPED) {
        await page.goto(`${url}/console/data?prefix=${encodeURIComponent(`["typed"]`)}`);
        await page.click(`a.key:text-is('["typed", "${name}"]')`);
        assert.equal(await page.textContent("#entry-type"), type, name);
        assert.equal(await page.textContent("#entry-value"), text, name);
        assert.match((await page.textContent("#entry-versionstamp")) ?? "", /^[0-9a-f]{20}$/);
        if (name === "object") await shot(page, "entry");
      }
      // Paging with the cursor: 25 entries are 20 and 5.
      await page.goto(`${url}/console/data?prefix=${encodeURIComponent(`["paged"]`)}`);
      assert.equal(await page.locator("#entries a.key").count(), 20);
      await page.click("#next-page");
      assert.equal(await page.locator("#entries a.key").count(), 5);
      assert.equal(await page.textContent("#entries a.key >> nth=0"), `["paged", 20]`);

      // Delete a key, through the confirmation.
      await page.goto(`${url}/console/data?prefix=${encodeURIComponent(`["typed"]`)}`);
      await page.click(`a.key:text-is('["typed", "string"]')`);
      await page.click("#delete");
      assert.match(
        (await page.textContent("#question")) ?? "",
        /^Delete the key \["typed", "string"\]/,
      );
      await page.click("#confirm");
      assert.match((await page.textContent("#flash")) ?? "", /^Deleted /);
      assert.equal((await kv.current.get(["typed", "string"])).versionstamp, null);

      // A POST with the session but without the CSRF token is refused.
      const session = `${cookie.name}=${cookie.value}`;
      const forged = await fetch(`${url}/console/data/delete`, {
        method: "POST",
        headers: { cookie: session },
        body: new URLSearchParams({ key: "x", confirm: "yes" }),
      });
      await forged.body?.cancel();
      assert.equal(forged.status, 403);

      // Usage: the counts move by exactly the traffic sent.
      const totals = async () => {
        await page.goto(`${url}/console/usage`);
        return {
          reads: Number(await page.textContent("#total-reads")),
          writes: Number(await page.textContent("#total-writes")),
          readUnits: Number(await page.textContent("#total-read-units")),
          writeUnits: Number(await page.textContent("#total-write-units")),
        };
      };
      kv.current.close();
      kv.current = await openRemoteKv(url);
      await kv.current.get(["warm-up"]); // the metadata exchange and one read
      const before = await totals();
      for (let i = 0; i < 6; i++) await kv.current.set(["usage", i], i);
      for (let i = 0; i < 9; i++) await kv.current.get(["usage", i % 6]);
      const after = await totals();
      assert.deepEqual(
        { reads: after.reads - before.reads, writes: after.writes - before.writes },
        {
          reads: 9,
          writes: 6,
        },
      );
      await shot(page, "usage");

      assert.deepEqual(pageErrors, []);

      // Log out: the session is gone.
      await page.click("#logout");
      assert.equal(new URL(page.url()).pathname, "/console/login");
      await page.goto(`${url}/console/data`);
      assert.equal(new URL(page.url()).pathname, "/console/login");
      const stale = await fetch(`${url}/console`, {
        headers: { cookie: session },
        redirect: "manual",
      });
      await stale.body?.cancel();
      assert.equal(stale.status, 303);
    } finally {
      await runner?.stop().catch(() => {});
      kv.current?.close();
      await browser?.close();
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test("encodeKey() and decodeKey() round-trip every key part type; parseKeyPrefix() reads typed parts", async () => {
  const { decodeKey, encodeKey, parseKeyPrefix, formatKey } = await import(
    "../proxy/console/kv_format.ts"
  );
  const key: Deno.KvKey = ["a/b+c", -1.5, 2n ** 70n, false, new Uint8Array([0, 255])];
  const encoded = encodeKey(key);
  assert.match(encoded, /^[A-Za-z0-9_-]+$/);
  assert.deepEqual(decodeKey(encoded), key);
  assert.deepEqual(parseKeyPrefix(`["users", 42, 7n, true, "a,\\"b"]`), [
    "users",
    42,
    7n,
    true,
    `a,"b`,
  ]);
  assert.deepEqual(parseKeyPrefix(""), []);
  assert.throws(() => parseKeyPrefix("[users]"), /a key prefix is a list of/);
  assert.equal(formatKey(["x", 1, 2n]), `["x", 1, 2n]`);
});

Deno.test("LoginThrottle refuses a client's second attempt while its first is still waiting", async () => {
  const { LoginThrottle } = await import("../proxy/console/session.ts");
  const throttle = new LoginThrottle();
  assert.equal(await throttle.attempt("c", () => false), false);
  const slow = throttle.attempt("c", () => false); // waits THROTTLE_BASE_MS first
  assert.equal(await throttle.attempt("c", () => true), undefined);
  assert.equal(await throttle.attempt("other", () => true), true);
  assert.equal(await slow, false);
  assert.equal(throttle.delayMs("c"), 500);
});
