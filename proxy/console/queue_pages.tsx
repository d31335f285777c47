/** @jsxImportSource hono/jsx */
/**
 * The console's queue pages, server-rendered with Hono's JSX: every known
 * queue with its counts, pause state and dead letters, and one queue's pending
 * messages by state, a page at a time, with cancel. `queue_routes.tsx`
 * gathers the data and handles the requests.
 */
import type { DeadLetter, PendingMessage, PendingState, QueueStats } from "../../lib/kv_queue.ts";
import { Csrf, Layout } from "./layout.tsx";
import { encodeKey, formatKey, formatValue } from "./kv_format.ts";

/** The states pending messages are listed by, in the order the page offers them. */
export const PENDING_STATES: readonly PendingState[] = ["ready", "delayed", "running", "waiting"];

/** One queue prefix's figures, or why they could not be read. */
export interface QueueView {
  name: string;
  prefix: Deno.KvKey;
  stats?: QueueStats;
  paused?: boolean;
  dead: DeadLetter[];
  error?: string;
}

/** A POST button for one queue (and maybe one message); the route asks for confirmation. */
function QueueButton(
  props: { csrf: string; action: string; prefix: string; id?: string; label: string },
) {
  return (
    <form method="post" action={`/console/queues/${props.action}`} class="inline">
      <Csrf token={props.csrf} />
      <input type="hidden" name="prefix" value={props.prefix} />
      {props.id !== undefined && <input type="hidden" name="id" value={props.id} />}
      <button type="submit" class={props.action}>{props.label}</button>
    </form>
  );
}

/** The URL of a queue's pending list in `state`, from `cursor` on. */
export function pendingHref(prefix: string, state: PendingState, cursor?: string): string {
  const q = new URLSearchParams({ prefix, state });
  if (cursor !== undefined) q.set("cursor", cursor);
  return `/console/queues/pending?${q}`;
}

/** The queues: counts, pause and resume, links to the pending lists, dead letters. */
export function QueuesPage(props: { csrf: string; queues: QueueView[]; flash?: string }) {
  return (
    <Layout title="Queues" csrf={props.csrf} active="/console/queues">
      {props.flash && <p class="flash" id="flash">{props.flash}</p>}
      <p class="muted">
        Queue prefixes: the library's defaults and those in <code>QUEUE_PREFIXES</code>{" "}
        (a JSON list of keys). Pending and dead totals are the queue engine's exact counters; the
        ready / delayed / running split comes from its first 1,000 index entries.
      </p>
      {props.queues.map((q) => {
        const enc = encodeKey(q.prefix);
        return (
          <section class="queue" data-prefix={formatKey(q.prefix)}>
            <h2>
              {q.name} <code>{formatKey(q.prefix)}</code>{" "}
              {q.paused && <span class="bad paused">paused</span>}
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
            {q.paused !== undefined && (
              <div class="queue-actions">
                Pending messages: {PENDING_STATES.map((state) => (
                  <>
                    <a class={`pending-${state}`} href={pendingHref(enc, state)}>{state}</a>
                    {" "}
                  </>
                ))}
                {q.paused
                  ? <QueueButton csrf={props.csrf} action="resume" prefix={enc} label="Resume" />
                  : <QueueButton csrf={props.csrf} action="pause" prefix={enc} label="Pause" />}
              </div>
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
                        <QueueButton
                          csrf={props.csrf}
                          action="requeue"
                          prefix={enc}
                          id={d.id}
                          label="Requeue"
                        />{" "}
                        <QueueButton
                          csrf={props.csrf}
                          action="purge"
                          prefix={enc}
                          id={d.id}
                          label="Purge"
                        />
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

/** One queue's pending messages in one state, with cancel and the next page. */
export function PendingPage(
  props: {
    csrf: string;
    queue: { name: string; prefix: Deno.KvKey };
    state: PendingState;
    messages: PendingMessage[];
    next?: string;
    flash?: string;
  },
) {
  const enc = encodeKey(props.queue.prefix);
  return (
    <Layout title="Pending messages" csrf={props.csrf} active="/console/queues">
      {props.flash && <p class="flash" id="flash">{props.flash}</p>}
      <h2>
        {props.queue.name} <code>{formatKey(props.queue.prefix)}</code>
      </h2>
      <p id="states">
        {PENDING_STATES.map((state) => (
          <>
            {state === props.state
              ? <strong>{state}</strong>
              : <a class={`pending-${state}`} href={pendingHref(enc, state)}>{state}</a>}
            {" "}
          </>
        ))}
      </p>
      <p class="muted">
        Ready: due now; delayed: due later; running: leased by a worker (cancel refuses those);
        waiting: behind another message of its ordering key. Each page reads a bounded slice of the
        index, so a page may be short and still have a next one.
      </p>
      <table id="pending">
        <tr>
          <th>id</th>
          <th>type</th>
          <th>{props.state === "running" ? "lease ends" : "due"}</th>
          <th>attempts</th>
          <th>enqueued</th>
          <th>ordering key</th>
          <th></th>
        </tr>
        {props.messages.map((m) => (
          <tr data-id={m.id}>
            <td>
              <code>{m.id}</code>
            </td>
            <td>{m.type}</td>
            <td>{new Date(m.due).toISOString()}</td>
            <td>{m.attempts}</td>
            <td>{new Date(m.enqueuedAt).toISOString()}</td>
            <td>{m.orderingKey ?? ""}</td>
            <td>
              <form method="post" action="/console/queues/cancel" class="inline">
                <Csrf token={props.csrf} />
                <input type="hidden" name="prefix" value={enc} />
                <input type="hidden" name="id" value={m.id} />
                <input type="hidden" name="state" value={props.state} />
                <button type="submit" class="cancel">Cancel</button>
              </form>
            </td>
          </tr>
        ))}
      </table>
      {props.messages.length === 0 && <p id="empty">No {props.state} messages on this page.</p>}
      {props.next && (
        <p>
          <a id="next-page" href={pendingHref(enc, props.state, props.next)}>Next page</a>
        </p>
      )}
      <p>
        <a href="/console/queues">Back to the queues</a>
      </p>
    </Layout>
  );
}
