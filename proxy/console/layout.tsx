/** @jsxImportSource hono/jsx */
/**
 * The console's page frame and small shared pieces: navigation, the logout
 * button, hidden CSRF fields and the confirmation page every state change
 * passes through.
 */
import type { Child } from "hono/jsx";

/** The pages of the navigation bar. */
const NAV = [
  ["/console", "Overview"],
  ["/console/queues", "Queues"],
  ["/console/data", "Data"],
  ["/console/usage", "Usage"],
] as const;

/** The whole HTML page; `csrf` absent on the login page (no navigation there). */
export function Layout(
  props: { title: string; csrf?: string; active?: string; charts?: boolean; children?: Child },
) {
  return (
    <html lang="en">
      <head>
        <meta charset="utf-8" />
        <meta name="viewport" content="width=device-width, initial-scale=1" />
        <title>{props.title} · denokv console</title>
        <link rel="icon" href="data:," />
        <link rel="stylesheet" href="/console/assets/console.css" />
        {props.charts && <link rel="stylesheet" href="/console/assets/uPlot.min.css" />}
      </head>
      <body>
        <header>
          <strong>denokv console</strong>
          {props.csrf !== undefined && (
            <nav>
              {NAV.map(([href, label]) => (
                <a href={href} class={props.active === href ? "active" : ""}>{label}</a>
              ))}
              <form method="post" action="/console/logout" class="inline">
                <Csrf token={props.csrf} />
                <button type="submit" id="logout">Log out</button>
              </form>
            </nav>
          )}
        </header>
        <main>
          <h1>{props.title}</h1>
          {props.children}
        </main>
        {props.charts && <script src="/console/assets/uPlot.iife.min.js"></script>}
        {props.charts && <script src="/console/assets/charts.js"></script>}
      </body>
    </html>
  );
}

/** The hidden CSRF field every console form carries. */
export function Csrf(props: { token: string }) {
  return <input type="hidden" name="_csrf" value={props.token} />;
}

/**
 * The confirmation step of a state change: the same POST again, with every
 * field kept and `confirm=yes` added.
 */
export function Confirm(
  props: {
    csrf: string;
    action: string;
    question: string;
    fields: Record<string, string>;
    back: string;
  },
) {
  return (
    <Layout title="Please confirm" csrf={props.csrf}>
      <p id="question">{props.question}</p>
      <form method="post" action={props.action}>
        <Csrf token={props.csrf} />
        {Object.entries(props.fields).map(([name, value]) => (
          <input type="hidden" name={name} value={value} />
        ))}
        <input type="hidden" name="confirm" value="yes" />
        <button type="submit" id="confirm" class="danger">Yes, do it</button>{" "}
        <a href={props.back}>Cancel</a>
      </form>
    </Layout>
  );
}

/** A chart drawn by assets/charts.js from the JSON beside it. */
export function Chart(
  props: { id: string; title: string; series: string[]; data: (number | null)[][] },
) {
  return (
    <figure class="chart">
      <figcaption>{props.title}</figcaption>
      <div class="chart-area" data-chart={props.id}></div>
      {/* Raw JSON, not HTML-escaped; "<" is escaped so it cannot close the script. */}
      <script
        type="application/json"
        id={`${props.id}-data`}
        dangerouslySetInnerHTML={{
          __html: JSON.stringify({ series: props.series, data: props.data }).replace(
            /</g,
            "\\u003c",
          ),
        }}
      />
    </figure>
  );
}
