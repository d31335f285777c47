/** @jsxImportSource hono/jsx */
/**
 * The console's queue routes: the queues page, a queue's pending messages by
 * state with cursor paging, and the actions on them (requeue and purge a dead
 * letter, cancel a pending message, pause and resume a queue), each a POST
 * that `mod.tsx`'s guard has checked for a session and its CSRF token, shown
 * first as a confirmation page.
 */
import type { Context, Hono } from "hono";
import { KvQueue, type PendingState } from "../../lib/kv_queue.ts";
import { Confirm } from "./layout.tsx";
import { decodeKey, formatKey } from "./kv_format.ts";
import type { QueueRef } from "./queue_list.ts";
import {
  PENDING_STATES,
  pendingHref,
  PendingPage,
  QueuesPage,
  type QueueView,
} from "./queue_pages.tsx";

/** Pending messages per page (index entries read per page: see `KvQueue.listPending`). */
export const PENDING_PAGE_SIZE = 20;
/** Dead letters shown per queue. */
const DEAD_SHOWN = 50;

/** What the queue routes need from the console. */
export interface QueueRoutesContext {
  queues: readonly QueueRef[];
  /** The database (one connection, opened on first use). */
  db: () => Promise<Deno.Kv>;
  /** The CSRF token of the request's session (the guard has checked there is one). */
  csrfOf: (c: Context) => string;
}

type Action = "requeue" | "purge" | "cancel" | "pause" | "resume";

/** What each action asks before it acts, and whether it names a message. */
const ACTIONS: Record<Action, { needsId: boolean; question: (id: string, q: string) => string }> = {
  requeue: {
    needsId: true,
    question: (id, q) => `Requeue dead letter ${id} of ${q}? It will be delivered again.`,
  },
  purge: {
    needsId: true,
    question: (id, q) => `Purge dead letter ${id} of ${q}? It is deleted for good.`,
  },
  cancel: {
    needsId: true,
    question: (id, q) => `Cancel pending message ${id} of ${q}? It will never run.`,
  },
  pause: {
    needsId: false,
    question: (_, q) =>
      `Pause ${q}? No worker, in any process, takes another message until it is resumed; ` +
      `messages running now finish.`,
  },
  resume: {
    needsId: false,
    question: (_, q) => `Resume ${q}? Workers take its messages again.`,
  },
};

const isState = (s: unknown): s is PendingState =>
  typeof s === "string" && (PENDING_STATES as readonly string[]).includes(s);

const message = (err: unknown) => (err instanceof Error ? err.message : String(err));

/** Mounts the queue routes on `app` (after the console's guard). */
export function queueRoutes(app: Hono, ctx: QueueRoutesContext): void {
  /** The known queue an encoded prefix names, or undefined. */
  const known = (encoded: string): QueueRef | undefined => {
    let prefix: Deno.KvKey;
    try {
      prefix = decodeKey(encoded);
    } catch {
      return undefined;
    }
    return ctx.queues.find((q) => formatKey(q.prefix) === formatKey(prefix));
  };

  app.get("/console/queues", async (c) => {
    const store = await ctx.db();
    const views: QueueView[] = [];
    for (const q of ctx.queues) {
      try {
        const queue = new KvQueue(store, { prefix: q.prefix });
        const [stats, paused, dead] = await Promise.all([
          queue.stats(),
          queue.isPaused(),
          queue.listDead({ limit: DEAD_SHOWN }),
        ]);
        views.push({ ...q, stats, paused, dead });
      } catch (err) {
        views.push({ ...q, dead: [], error: message(err) });
      }
    }
    return c.html(<QueuesPage csrf={ctx.csrfOf(c)} queues={views} flash={c.req.query("done")} />);
  });

  app.get("/console/queues/pending", async (c) => {
    const q = known(c.req.query("prefix") ?? "");
    const state = c.req.query("state");
    if (!q || !isState(state)) return c.text("Bad request: unknown queue or state.", 400);
    const queue = new KvQueue(await ctx.db(), { prefix: q.prefix });
    let page;
    try {
      page = await queue.listPending(state, {
        limit: PENDING_PAGE_SIZE,
        cursor: c.req.query("cursor") || undefined,
      });
    } catch (err) {
      if (err instanceof TypeError) return c.text(`Bad request: ${err.message}`, 400);
      throw err;
    }
    return c.html(
      <PendingPage
        csrf={ctx.csrfOf(c)}
        queue={q}
        state={state}
        messages={page.messages}
        next={page.cursor}
        flash={c.req.query("done")}
      />,
    );
  });

  const act = (action: Action) => async (c: Context) => {
    const form = await c.req.parseBody();
    const prefixParam = String(form.prefix ?? "");
    const id = String(form.id ?? "");
    const q = known(prefixParam);
    if (!q || (ACTIONS[action].needsId && !id)) {
      return c.text("Bad request: unknown queue or no message id.", 400);
    }
    // A cancel returns to the list it came from.
    const back = action === "cancel" && isState(form.state)
      ? pendingHref(prefixParam, form.state)
      : "/console/queues";
    const name = formatKey(q.prefix);
    if (form.confirm !== "yes") {
      const fields: Record<string, string> = { prefix: prefixParam };
      if (ACTIONS[action].needsId) fields.id = id;
      if (action === "cancel" && isState(form.state)) fields.state = form.state;
      return c.html(
        <Confirm
          csrf={ctx.csrfOf(c)}
          action={`/console/queues/${action}`}
          question={ACTIONS[action].question(id, name)}
          fields={fields}
          back={back}
        />,
      );
    }
    const queue = new KvQueue(await ctx.db(), { prefix: q.prefix });
    let done: string;
    switch (action) {
      case "requeue": {
        const newId = await queue.requeueDead(id);
        done = newId === null
          ? `Dead letter ${id} was already gone.`
          : `Requeued ${id} as ${newId}.`;
        break;
      }
      case "purge":
        done = `Purged ${await queue.purgeDead([id])} dead letter(s).`;
        break;
      case "cancel":
        done = await queue.cancel(id)
          ? `Cancelled ${id}: it will not run.`
          : `${id} was not cancelled: it is no longer pending, or a worker is running it now.`;
        break;
      case "pause":
        await queue.pause();
        done = `Paused ${name}: workers take no more of its messages until it is resumed.`;
        break;
      case "resume":
        await queue.resume();
        done = `Resumed ${name}.`;
        break;
    }
    const sep = back.includes("?") ? "&" : "?";
    return c.redirect(`${back}${sep}done=${encodeURIComponent(done)}`, 303);
  };
  for (const action of Object.keys(ACTIONS) as Action[]) {
    app.post(`/console/queues/${action}`, act(action));
  }
}
