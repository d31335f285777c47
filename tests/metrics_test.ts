/**
 * Metrics (`proxy/metrics.ts`) on a real stack: known KV Connect traffic goes
 * through the proxy under supervisord, and the scrape, parsed with a
 * Prometheus text parser, must count exactly that; replication lag must rise
 * while Litestream is stopped; the public `/metrics` needs the token; queue
 * depths equal what was enqueued, read from the engine's counters.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import parsePrometheus from "parse-prometheus-text-format";
import { freePort, openRemoteKv, ROOT, TEST_TOKEN, waitFor } from "./_helpers/processes.ts";
import { startFauxS3 } from "./_helpers/s3.ts";
import { cmdline, descendants, startSupervised, waitHealthy } from "./_helpers/supervised.ts";
import { appendHistory } from "../scripts/backup_check/history.ts";
import { KvQueue, KvQueueRunner } from "../lib/kv_queue.ts";
import { readQueueCounters } from "../proxy/metrics_queues.ts";

interface Family {
  name: string;
  type: string;
  metrics: { value?: string; labels?: Record<string, string>; count?: string }[];
}
const parse = parsePrometheus as unknown as (text: string) => Family[];

/** The value of `name` whose labels include `labels`; 0 when no such series was exported. */
function value(families: Family[], name: string, labels: Record<string, string> = {}): number {
  const family = families.find((f) => f.name === name);
  if (!family) return 0;
  let sum = 0;
  for (const m of family.metrics) {
    if (Object.entries(labels).every(([k, v]) => m.labels?.[k] === v)) {
      sum += Number(m.value ?? m.count);
    }
  }
  return sum;
}

/** The raw text of the last scrape: the parser keeps only one series of a labelled histogram. */
let lastText = "";

async function scrape(url: string, headers: Record<string, string> = {}): Promise<Family[]> {
  // A scrape that hangs fails the test instead of stalling it.
  const res = await fetch(`${url}/metrics`, { headers, signal: AbortSignal.timeout(30_000) });
  const text = await res.text();
  assert.equal(res.status, 200, text);
  assert.match(res.headers.get("content-type") ?? "", /^text\/plain; version=0.0.4/);
  lastText = text;
  return parse(text);
}

/** One sample line of the last scrape, e.g. `x_count{operation="watch"}`. */
function sample(series: string): number {
  const line = lastText.split("\n").find((l) => l.startsWith(series + " "));
  assert(line, `no ${series} in the scrape`);
  return Number(line.slice(series.length + 1));
}

async function supervisorctl(env: Record<string, string>, action: string): Promise<void> {
  const out = await new Deno.Command("supervisorctl", {
    args: ["-c", join(ROOT, "supervisord.conf"), action, "denokv"],
    env,
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert(out.success, new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr));
}

Deno.test({
  name: "metrics: a scrape counts the reads, writes, watches and upstream failure that were sent",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "metrics-test-" });
    const metricsPort = freePort();
    const privateUrl = `http://127.0.0.1:${metricsPort}`;
    try {
      await using stack = await startSupervised(s3, {
        dataDir: join(dir, "data"),
        replicaPath: "metrics",
        env: {
          METRICS_PORT: String(metricsPort),
          METRICS_HOSTNAME: "127.0.0.1",
        },
      });
      const finishedAt = new Date(Date.now() - 120_000).toISOString();
      await appendHistory(stack.dataDir, {
        status: "PASSED",
        app: "metrics-test",
        startedAt: finishedAt,
        finishedAt,
        canaryId: "c",
        checks: [],
      });

      const N = 7, M = 5, W = 3;
      const kv = await openRemoteKv(stack.url);
      const readers: ReadableStreamDefaultReader<unknown>[] = [];
      try {
        for (let i = 0; i < M; i++) assert((await kv.set(["m", i], `v${i}`)).ok);
        for (let i = 0; i < N; i++) assert.equal((await kv.get(["m", i % M])).value, `v${i % M}`);
        for (let i = 0; i < W; i++) {
          const reader = kv.watch([["m", i]]).getReader();
          await reader.read(); // the first frame: the stream is open through the proxy
          readers.push(reader);
        }
        const open = await scrape(privateUrl);
        assert.equal(value(open, "denokv_watch_streams_open"), W);
      } finally {
        for (const r of readers) await r.cancel().catch(() => {});
        kv.close();
      }
      await waitFor(
        "the watch streams to close",
        async () => value(await scrape(privateUrl), "denokv_watch_streams_open") === 0,
        {
          timeoutMs: 30_000,
          intervalMs: 200,
        },
      );

      // A request of known size moves the byte counters exactly: 123 zero bytes are no valid
      // protobuf, so denokv answers 4xx. (A wrong token would not do: the proxy answers that
      // itself from the headers and cuts the connection without reading the body.)
      const before = await scrape(privateUrl);
      const body = new Uint8Array(123);
      const res = await fetch(`${stack.url}/v2/snapshot_read`, {
        method: "POST",
        headers: { authorization: `Bearer ${TEST_TOKEN}` },
        body,
      });
      const answer = new Uint8Array(await res.arrayBuffer());
      assert(res.status >= 400 && res.status < 500, `status ${res.status}`);
      const after = await scrape(privateUrl);
      const delta = (name: string) =>
        value(after, name, { operation: "snapshot_read" }) -
        value(before, name, { operation: "snapshot_read" });
      assert.equal(delta("denokv_request_bytes_total"), 123);
      assert.equal(delta("denokv_response_bytes_total"), answer.length);

      // One upstream failure: denokv stopped under the proxy.
      await supervisorctl(stack.env, "stop");
      const failed = await fetch(`${stack.url}/v2/snapshot_read`, {
        method: "POST",
        headers: { authorization: `Bearer ${TEST_TOKEN}` },
        body: new Uint8Array(10),
      });
      await failed.body?.cancel();
      assert.equal(failed.status, 503);
      const down = await scrape(privateUrl);
      assert.equal(value(down, "denokv_up"), 0);
      await supervisorctl(stack.env, "start");
      await waitHealthy(stack);

      const m = await scrape(privateUrl);
      const requests = (operation: string, status_class: string) =>
        value(m, "denokv_requests_total", { operation, status_class });
      assert.equal(requests("atomic_write", "2xx"), M);
      assert.equal(requests("snapshot_read", "2xx"), N);
      assert.equal(requests("watch", "2xx"), W);
      // The client decides when to refresh its metadata; it did at least once.
      assert(requests("metadata", "2xx") >= 1);
      assert.equal(requests("snapshot_read", "4xx"), 1);
      assert.equal(requests("snapshot_read", "5xx"), 1);
      assert.equal(value(m, "denokv_upstream_errors_total"), 1);
      assert.equal(value(m, "denokv_upstream_errors_total", { kind: "error" }), 1);
      assert.equal(
        m.find((f) => f.name === "denokv_request_duration_seconds")?.type,
        "HISTOGRAM",
      );
      assert.equal(
        sample('denokv_request_duration_seconds_count{operation="snapshot_read"}'),
        N + 2,
      );
      assert.equal(sample('denokv_request_duration_seconds_count{operation="atomic_write"}'), M);
      assert.equal(sample('denokv_request_duration_seconds_count{operation="watch"}'), W);
      assert.equal(value(m, "denokv_up"), 1);
      assert.equal(value(m, "denokv_litestream_up"), 1);
      assert.equal(value(m, "denokv_backup_check_success"), 1);
      const age = value(m, "denokv_backup_check_age_seconds");
      assert(age >= 120 && age < 600, `backup check age ${age}`);
      assert(value(m, "denokv_replica_last_upload_timestamp_seconds") > Date.now() / 1000 - 120);
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "metrics: replication lag rises while Litestream is stopped and falls back once it resumes",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "metrics-lag-test-" });
    const metricsPort = freePort();
    const privateUrl = `http://127.0.0.1:${metricsPort}`;
    let stopped: number | undefined;
    try {
      await using stack = await startSupervised(s3, {
        dataDir: join(dir, "data"),
        replicaPath: "lag",
        env: {
          METRICS_PORT: String(metricsPort),
          METRICS_HOSTNAME: "127.0.0.1",
        },
      });
      const kv = await openRemoteKv(stack.url);
      try {
        assert((await kv.set(["lag", 0], "before")).ok);
        await waitFor("replication to catch up", async () => {
          const m = await scrape(privateUrl);
          return value(m, "denokv_replication_lag_seconds") === 0 &&
            value(m, "denokv_replica_last_upload_timestamp_seconds") > 0;
        }, { timeoutMs: 30_000, intervalMs: 500 });
        assert.equal(value(await scrape(privateUrl), "denokv_litestream_up"), 1);

        const pid = descendants(stack.supervisord.child.pid).find((p) =>
          /litestream replicate/.test(cmdline(p))
        );
        assert(pid, "no litestream process under supervisord");
        Deno.kill(pid, "SIGSTOP");
        stopped = pid;
        // Litestream syncs every second: wait past that before writing.
        await new Promise((r) => setTimeout(r, 2_500));
        assert((await kv.set(["lag", 1], "while stopped")).ok);
        let first = 0;
        await waitFor("the lag to show", async () => {
          const m = await scrape(privateUrl);
          assert.equal(value(m, "denokv_litestream_up"), 0);
          first = value(m, "denokv_replication_lag_seconds");
          return first > 0;
        }, { timeoutMs: 30_000, intervalMs: 500 });
        await new Promise((r) => setTimeout(r, 3_000));
        const later = value(await scrape(privateUrl), "denokv_replication_lag_seconds");
        assert(later >= first + 2.5, `lag ${first} s, then ${later} s three seconds later`);

        Deno.kill(pid, "SIGCONT");
        stopped = undefined;
        await waitFor("the lag to fall back to 0", async () => {
          const m = await scrape(privateUrl);
          return value(m, "denokv_replication_lag_seconds") === 0 &&
            value(m, "denokv_litestream_up") === 1;
        }, { timeoutMs: 60_000, intervalMs: 500 });
      } finally {
        if (stopped) Deno.kill(stopped, "SIGCONT");
        kv.close();
      }
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name:
    "metrics: the public /metrics refuses a missing or wrong token, the private port needs none",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "metrics-auth-test-" });
    const metricsPort = freePort();
    try {
      await using stack = await startSupervised(s3, {
        dataDir: join(dir, "data"),
        replicaPath: "auth",
        env: {
          METRICS_PORT: String(metricsPort),
          METRICS_HOSTNAME: "127.0.0.1",
        },
      });
      const refused: Record<string, string>[] = [{}, {
        authorization: "Bearer wrong-token-123456",
      }];
      for (const headers of refused) {
        const res = await fetch(`${stack.url}/metrics`, { headers });
        const text = await res.text();
        assert(res.status >= 400 && res.status < 500, `status ${res.status}`);
        assert(!text.includes("denokv_requests_total"), text);
      }
      const m = await scrape(stack.url, { authorization: `Bearer ${TEST_TOKEN}` });
      assert.equal(value(m, "denokv_up"), 1);
      assert.equal(value(await scrape(`http://127.0.0.1:${metricsPort}`), "denokv_up"), 1);
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test("ProxyMetrics.routes() accepts a token with ':', '!' and '#' (Hono's bearerAuth would not)", async () => {
  const { Hono } = await import("hono");
  const { ProxyMetrics } = await import("../proxy/metrics.ts");
  const token = "tok:en!#with-specials";
  const metrics = new ProxyMetrics({
    denokvUrl: `http://127.0.0.1:${freePort()}`,
    accessToken: token,
    dataDir: "/nonexistent",
    dbPath: "/nonexistent/denokv.sqlite",
  });
  const app = new Hono();
  metrics.routes()(app);
  const ok = await app.request("/metrics", { headers: { authorization: `Bearer ${token}` } });
  assert.equal(ok.status, 200);
  assert.match(await ok.text(), /^denokv_up 0$/m);
  for (const wrong of [`Bearer ${token}x`, `Bearer ${token.slice(0, -1)}`, token, ""]) {
    const res = await app.request("/metrics", { headers: { authorization: wrong } });
    await res.body?.cancel();
    assert.equal(res.status, 401, wrong);
  }
  metrics.close();
});

Deno.test({
  name: "metrics: queue depths by prefix and state equal what was enqueued, died and paused; " +
    "denokv stopped: the scrape still answers, without stale depths",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    await using s3 = await startFauxS3();
    const dir = await Deno.makeTempDir({ prefix: "metrics-queue-test-" });
    const metricsPort = freePort();
    const privateUrl = `http://127.0.0.1:${metricsPort}`;
    let runner: KvQueueRunner | undefined;
    try {
      await using stack = await startSupervised(s3, {
        dataDir: join(dir, "data"),
        replicaPath: "queues",
        env: {
          METRICS_PORT: String(metricsPort),
          METRICS_HOSTNAME: "127.0.0.1",
          QUEUE_PREFIXES: `[["jobs"]]`,
        },
      });
      const kv = await openRemoteKv(stack.url);
      try {
        // Default queue: N delayed; Deno face: M ready; jobs: D dead and P delayed, paused.
        const N = 7, M = 3, D = 4, P = 2;
        const plain = new KvQueue(kv);
        const ids = await plain.enqueueMany("later", [...Array(N).keys()], { delayMs: 600_000 });
        const deno = new KvQueue(kv, { prefix: ["__kvq__", "deno"] });
        for (let i = 0; i < M; i++) await deno.enqueue("now", i);
        const jobs = new KvQueue(kv, { prefix: ["jobs"] });
        jobs.handle("fail", () => {
          throw new Error("always fails");
        });
        runner = new KvQueueRunner(kv, jobs);
        const running = runner.run();
        await jobs.enqueueMany("fail", [...Array(D).keys()], { maxAttempts: 1 });
        await waitFor("the jobs to die", async () => (await jobs.stats()).dead === D, {
          timeoutMs: 30_000,
          intervalMs: 200,
        });
        await runner.stop();
        await running;
        runner = undefined;
        await jobs.enqueueMany("fail", [...Array(P).keys()], { delayMs: 600_000 });
        await jobs.pause();

        const depth = (m: Family[], prefix: Deno.KvKey, state: string) =>
          value(m, "denokv_queue_messages", { prefix: JSON.stringify(prefix), state });
        const m = await scrape(privateUrl);
        assert.equal(
          m.find((f) => f.name === "denokv_queue_messages")?.metrics.length,
          8,
          "pending and dead for the 3 default queues and QUEUE_PREFIXES' one",
        );
        assert.deepEqual(
          [
            ["__kvq__"],
            ["__kvq__", "deno"],
            ["__kvq__", "fedify"],
            ["jobs"],
          ].map((p) => [depth(m, p, "pending"), depth(m, p, "dead")]),
          [[N, 0], [M, 0], [0, 0], [P, D]],
        );
        assert.equal(value(m, "denokv_queue_paused", { prefix: `["jobs"]` }), 1);
        assert.equal(value(m, "denokv_queue_paused", { prefix: `["__kvq__"]` }), 0);
        assert.equal(value(m, "denokv_queue_read_failed"), 0);

        // The counters move with the queue: a cancel, a purge and a resume show at the next scrape.
        assert.equal(await plain.cancel(ids[0]), true);
        assert.equal(await jobs.purgeDead(), D);
        await jobs.resume();
        const after = await scrape(privateUrl);
        assert.equal(depth(after, ["__kvq__"], "pending"), N - 1);
        assert.equal(depth(after, ["jobs"], "dead"), 0);
        assert.equal(value(after, "denokv_queue_paused", { prefix: `["jobs"]` }), 0);

        // denokv stopped: the scrape answers in time and exports no stale depths.
        await supervisorctl(stack.env, "stop");
        const started = performance.now();
        const down = await scrape(privateUrl);
        const ms = performance.now() - started;
        assert(ms < 10_000, `the scrape took ${ms} ms with denokv stopped`);
        assert.equal(value(down, "denokv_queue_read_failed"), 1);
        assert.equal(down.find((f) => f.name === "denokv_queue_messages")?.metrics.length ?? 0, 0);
        await supervisorctl(stack.env, "start");
        await waitHealthy(stack);
        await waitFor("the queue depths to come back", async () => {
          const back = await scrape(privateUrl);
          return value(back, "denokv_queue_read_failed") === 0 &&
            depth(back, ["__kvq__"], "pending") === N - 1;
        }, { timeoutMs: 30_000, intervalMs: 500 });
      } finally {
        await runner?.stop().catch(() => {});
        kv.close();
      }
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test("readQueueCounters() reads the same few keys for an empty queue and a backlog of 2,000", async () => {
  const kv = await Deno.openKv(":memory:");
  const calls = { getMany: 0, keys: 0, other: 0 };
  // Counts every read the function makes: getMany calls and their keys, and anything else.
  const counting = new Proxy(kv, {
    get(target, name) {
      const v = Reflect.get(target, name);
      if (typeof v !== "function") return v;
      return (...args: unknown[]) => {
        if (name === "getMany") {
          calls.getMany++;
          calls.keys += (args[0] as unknown[]).length;
        } else calls.other++;
        return v.apply(target, args);
      };
    },
  });
  const queues = [["__kvq__"], ["__kvq__", "deno"], ["__kvq__", "fedify"], ["jobs"]].map((
    prefix,
  ) => ({ prefix }));
  try {
    const empty = await readQueueCounters(counting, queues);
    assert.deepEqual(empty.map((q) => [q.pending, q.dead, q.paused]), Array(4).fill([0, 0, false]));
    const reads = { ...calls };
    assert.deepEqual(reads, { getMany: 2, keys: 12, other: 0 });

    const jobs = new KvQueue(kv, { prefix: ["jobs"] });
    for (let i = 0; i < 2_000; i += 500) {
      await jobs.enqueueMany("x", Array(500).fill(i), { delayMs: 600_000 });
    }
    await jobs.pause();
    calls.getMany = calls.keys = calls.other = 0;
    const full = await readQueueCounters(counting, queues);
    assert.deepEqual(calls, reads);
    assert.deepEqual(full[3], { prefix: ["jobs"], pending: 2_000, dead: 0, paused: true });
    const stats = await jobs.stats();
    assert.equal(stats.ready + stats.delayed + stats.running, full[3].pending);
  } finally {
    kv.close();
  }
});
