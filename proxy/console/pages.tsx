/** @jsxImportSource hono/jsx */
/**
 * The console's pages, server-rendered with Hono's JSX: overview (health,
 * replication, backup checks, traffic), queues, the data browser and usage.
 * They take plain data; `mod.tsx` gathers it and handles the requests.
 */
import type { CheckRecord } from "../../scripts/backup_check/history.ts";
import type { DeadLetter, QueueStats } from "../../lib/kv_queue.ts";
import type { Health, MinuteUsage } from "../metrics.ts";
import { Chart, Csrf, Layout } from "./layout.tsx";
import { encodeKey, formatKey, formatValue, valueType } from "./kv_format.ts";

function ago(ms: number): string {
  const s = Math.max(0, ms / 1000);
  if (s < 120) return `${s.toFixed(0)} s ago`;
  if (s < 7200) return `${(s / 60).toFixed(0)} min ago`;
  if (s < 172800) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} days ago`;
}

function Up(props: { up?: boolean; id: string }) {
  if (props.up === undefined) return <span id={props.id} class="muted">not monitored</span>;
  return props.up
    ? <span id={props.id} class="ok">up</span>
    : <span id={props.id} class="bad">down</span>;
}

function Card(props: { label: string; children?: unknown }) {
  return (
    <div class="card">
      <div class="label">{props.label}</div>
      <div class="value">{props.children}</div>
    </div>
  );
}

/** The overview: health of each process, replication, backup checks, traffic. */
export function OverviewPage(
  props: { csrf: string; health: Health; history: CheckRecord[]; usage: MinuteUsage[] },
) {
  const { health, history, usage } = props;
  const upload = health.replica?.newestUpload;
  const checks = history.slice(-30);
  const latest = checks.at(-1);
  const minutes = usage.map((u) => u.minute / 1000);
  return (
    <Layout title="Overview" csrf={props.csrf} active="/console" charts>
      <h2>Processes</h2>
      <div class="cards">
        <Card label="proxy">
          <span id="proxy-status" class="ok">up</span>
        </Card>
        <Card label="denokv">
          <Up id="denokv-status" up={health.denokvUp} />
        </Card>
        <Card label="Litestream">
          <Up id="litestream-status" up={health.litestreamUp} />
        </Card>
      </div>
      <h2>Replication</h2>
      <div class="cards">
        <Card label="replication lag">
          <span id="replication-lag">
            {health.replica ? `${health.replica.lagSeconds.toFixed(0)} s` : "no bucket configured"}
          </span>
        </Card>
        <Card label="last upload to the bucket">
          <span id="last-upload">
            {upload ? `${upload.toISOString()} (${ago(health.now - upload.getTime())})` : "none"}
          </span>
        </Card>
        {health.replica?.error && (
          <Card label="bucket listing">
            <span class="bad">{health.replica.error}</span>
          </Card>
        )}
      </div>
      <h2>Nightly backup checks</h2>
      {latest
        ? (
          <p id="backup-latest">
            Last check{" "}
            <span class={latest.status === "PASSED" ? "ok" : "bad"}>{latest.status}</span> at{" "}
            {latest.finishedAt} ({ago(health.now - Date.parse(latest.finishedAt))})
            {latest.failedStep ? `, failed at ${latest.failedStep}` : ""}.
          </p>
        )
        : <p id="backup-latest">No backup check has run yet.</p>}
      {checks.length > 0 && (
        <Chart
          id="backup-chart"
          title="Backup checks: passed (1) or failed (0), and duration in seconds"
          series={["passed", "duration (s)"]}
          data={[
            checks.map((r) => Date.parse(r.finishedAt) / 1000),
            checks.map((r) => (r.status === "PASSED" ? 1 : 0)),
            checks.map((r) => (Date.parse(r.finishedAt) - Date.parse(r.startedAt)) / 1000),
          ]}
        />
      )}
      {checks.length > 0 && (
        <table id="backup-history">
          <tr>
            <th>finished</th>
            <th>result</th>
            <th>first failing step</th>
            <th>steps</th>
          </tr>
          {checks.slice().reverse().map((r) => (
            <tr>
              <td>{r.finishedAt}</td>
              <td class={r.status === "PASSED" ? "ok" : "bad"}>{r.status}</td>
              <td>{r.failedStep ?? ""}</td>
              <td>{r.checks.map((c) => `${c.ok ? "✓" : "✗"} ${c.name}`).join("  ")}</td>
            </tr>
          ))}
        </table>
      )}
      <h2>Traffic (last hour)</h2>
      <Chart
        id="rate-chart"
        title="KV Connect requests per minute"
        series={["requests", "errors"]}
        data={[minutes, usage.map((u) => u.requests), usage.map((u) => u.errors)]}
      />
      <Chart
        id="latency-chart"
        title="Latency per minute (ms): mean and max"
        series={["mean", "max"]}
        data={[
          minutes,
          usage.map((u) => (u.requests ? u.latencyMsSum / u.requests : null)),
          usage.map((u) => (u.requests ? u.latencyMsMax : null)),
        ]}
      />
    </Layout>
  );
}

/** One queue prefix's figures, or why they could not be read. */
export interface QueueView {
  name: string;
  prefix: Deno.KvKey;
  stats?: QueueStats;
  dead: DeadLetter[];
  error?: string;
}

/** The queues: counts, dead letters with requeue and purge. */
export function QueuesPage(props: { csrf: string; queues: QueueView[]; flash?: string }) {
  return (
    <Layout title="Queues" csrf={props.csrf} active="/console/queues">
      {props.flash && <p class="flash" id="flash">{props.flash}</p>}
      <p class="muted">
        Queue prefixes: the library's defaults and those in <code>QUEUE_PREFIXES</code>{" "}
        (a JSON list of keys). Pending messages cannot be listed or cancelled: the queue engine has
        no API for that yet.
      </p>
      {props.queues.map((q) => {
        const enc = encodeKey(q.prefix);
        return (
          <section class="queue" data-prefix={formatKey(q.prefix)}>
            <h2>
              {q.name} <code>{formatKey(q.prefix)}</code>
            </h2>
            {q.error && <p class="error">{q.error}</p>}
            {q.stats && (
              <table class="queue-stats">
                <tr>
                  <th>ready</th>
                  <th>delayed</th>
                  <th>running</th>
                  <th>dead</th>
                </tr>
                <tr>
                  <td class="ready">{q.stats.ready}</td>
                  <td class="delayed">{q.stats.delayed}</td>
                  <td class="running">{q.stats.running}</td>
                  <td class="dead">{q.stats.dead}</td>
                </tr>
              </table>
            )}
            {q.dead.length > 0 && (
              <>
                <h3>Dead letters</h3>
                <table class="dead-letters">
                  <tr>
                    <th>id</th>
                    <th>type</th>
                    <th>value</th>
                    <th>attempts</th>
                    <th>error</th>
                    <th>failed</th>
                    <th></th>
                  </tr>
                  {q.dead.map((d) => (
                    <tr data-id={d.id}>
                      <td>
                        <code>{d.id}</code>
                      </td>
                      <td>{d.type}</td>
                      <td>
                        <pre>{formatValue(d.value)}</pre>
                      </td>
                      <td>{d.attempts}</td>
                      <td class="dead-error">{d.error}</td>
                      <td>{new Date(d.failedAt).toISOString()}</td>
                      <td>
                        <form method="post" action="/console/queues/requeue" class="inline">
                          <Csrf token={props.csrf} />
                          <input type="hidden" name="prefix" value={enc} />
                          <input type="hidden" name="id" value={d.id} />
                          <button type="submit" class="requeue">Requeue</button>
                        </form>{" "}
                        <form method="post" action="/console/queues/purge" class="inline">
                          <Csrf token={props.csrf} />
                          <input type="hidden" name="prefix" value={enc} />
                          <input type="hidden" name="id" value={d.id} />
                          <button type="submit" class="purge">Purge</button>
                        </form>
                      </td>
                    </tr>
                  ))}
                </table>
              </>
            )}
          </section>
        );
      })}
    </Layout>
  );
}

/** The data browser: entries under a prefix, a page at a time. */
export function DataPage(
  props: {
    csrf: string;
    prefixText: string;
    entries: Deno.KvEntry<unknown>[];
    next?: string;
    error?: string;
    flash?: string;
  },
) {
  return (
    <Layout title="Data" csrf={props.csrf} active="/console/data">
      {props.flash && <p class="flash" id="flash">{props.flash}</p>}
      <form method="get" action="/console/data">
        <label>
          Key prefix{" "}
          <input
            type="text"
            name="prefix"
            id="prefix"
            value={props.prefixText}
            placeholder='["users", 42]'
          />
        </label>{" "}
        <button type="submit" id="browse">Browse</button>
      </form>
      <p class="muted">Parts: "strings", numbers, bigints (12n), true/false. Empty: every key.</p>
      {props.error && <p class="error" id="error">{props.error}</p>}
      <table id="entries">
        <tr>
          <th>key</th>
          <th>type</th>
          <th>value</th>
          <th>versionstamp</th>
        </tr>
        {props.entries.map((e) => (
          <tr>
            <td>
              <a class="key" href={`/console/data/entry?key=${encodeKey(e.key)}`}>
                {formatKey(e.key)}
              </a>
            </td>
            <td>{valueType(e.value)}</td>
            <td>
              <pre>{formatValue(e.value).slice(0, 200)}</pre>
            </td>
            <td>
              <code>{e.versionstamp}</code>
            </td>
          </tr>
        ))}
      </table>
      {props.entries.length === 0 && <p id="empty">No entries under this prefix.</p>}
      {props.next && (
        <p>
          <a
            id="next-page"
            href={`/console/data?prefix=${encodeURIComponent(props.prefixText)}&cursor=${
              encodeURIComponent(props.next)
            }`}
          >
            Next page
          </a>
        </p>
      )}
    </Layout>
  );
}

/** One entry, its value printed whole, with delete. */
export function EntryPage(props: { csrf: string; entry: Deno.KvEntryMaybe<unknown> }) {
  const { entry } = props;
  return (
    <Layout title="Entry" csrf={props.csrf} active="/console/data">
      <table id="entry">
        <tr>
          <th>key</th>
          <td>
            <code id="entry-key">{formatKey(entry.key)}</code>
          </td>
        </tr>
        <tr>
          <th>type</th>
          <td id="entry-type">
            {entry.versionstamp === null ? "(missing)" : valueType(entry.value)}
          </td>
        </tr>
        <tr>
          <th>versionstamp</th>
          <td>
            <code id="entry-versionstamp">{entry.versionstamp ?? "none"}</code>
          </td>
        </tr>
        <tr>
          <th>value</th>
          <td>
            <pre id="entry-value">{entry.versionstamp === null ? "" : formatValue(entry.value)}</pre>
          </td>
        </tr>
      </table>
      {entry.versionstamp !== null && (
        <form method="post" action="/console/data/delete">
          <Csrf token={props.csrf} />
          <input type="hidden" name="key" value={encodeKey(entry.key)} />
          <p>
            <button type="submit" id="delete" class="danger">Delete this key</button>
          </p>
        </form>
      )}
      <p>
        <a href="/console/data">Back to the browser</a>
      </p>
    </Layout>
  );
}

/** Usage: KV reads, writes and bytes per minute, like Deploy's KV units. */
export function UsagePage(props: { csrf: string; usage: MinuteUsage[] }) {
  const usage = props.usage;
  const total = usage.reduce(
    (t, u) => ({
      reads: t.reads + u.reads,
      writes: t.writes + u.writes,
      watches: t.watches + u.watches,
      bytesIn: t.bytesIn + u.bytesIn,
      bytesOut: t.bytesOut + u.bytesOut,
      readUnits: t.readUnits + u.readUnits,
      writeUnits: t.writeUnits + u.writeUnits,
    }),
    { reads: 0, writes: 0, watches: 0, bytesIn: 0, bytesOut: 0, readUnits: 0, writeUnits: 0 },
  );
  const minutes = usage.map((u) => u.minute / 1000);
  return (
    <Layout title="Usage" csrf={props.csrf} active="/console/usage" charts>
      <p class="muted">
        KV Connect traffic through this proxy since it started (at most the last hour): successful
        reads (snapshot_read), writes (atomic_write) and watches, body bytes in and out, and
        Deploy-style KV units (a read unit per started 4 KiB of a read's answer, a write unit per
        started 1 KiB of a write's request; KV Connect framing included, so estimates).
      </p>
      <div class="cards">
        <Card label="reads">
          <span id="total-reads">{total.reads}</span>
        </Card>
        <Card label="writes">
          <span id="total-writes">{total.writes}</span>
        </Card>
        <Card label="watches">
          <span id="total-watches">{total.watches}</span>
        </Card>
        <Card label="read units (4 KiB)">
          <span id="total-read-units">{total.readUnits}</span>
        </Card>
        <Card label="write units (1 KiB)">
          <span id="total-write-units">{total.writeUnits}</span>
        </Card>
        <Card label="bytes in">
          <span id="total-bytes-in">{total.bytesIn}</span>
        </Card>
        <Card label="bytes out">
          <span id="total-bytes-out">{total.bytesOut}</span>
        </Card>
      </div>
      <Chart
        id="usage-chart"
        title="Reads and writes per minute"
        series={["reads", "writes"]}
        data={[minutes, usage.map((u) => u.reads), usage.map((u) => u.writes)]}
      />
      <table id="usage-minutes">
        <tr>
          <th>minute (UTC)</th>
          <th>reads</th>
          <th>writes</th>
          <th>watches</th>
          <th>read units</th>
          <th>write units</th>
          <th>bytes in</th>
          <th>bytes out</th>
        </tr>
        {usage.filter((u) => u.requests > 0).reverse().map((u) => (
          <tr>
            <td>{new Date(u.minute).toISOString().slice(0, 16)}</td>
            <td>{u.reads}</td>
            <td>{u.writes}</td>
            <td>{u.watches}</td>
            <td>{u.readUnits}</td>
            <td>{u.writeUnits}</td>
            <td>{u.bytesIn}</td>
            <td>{u.bytesOut}</td>
          </tr>
        ))}
      </table>
    </Layout>
  );
}
