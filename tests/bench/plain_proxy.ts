/**
 * The naive alternative the proxy benchmark compares against: a Hono app
 * that forwards KV Connect with Hono's own `proxy()` helper (Deno `fetch`,
 * streamed bodies), as the documentation shows. `PORT` and `DENOKV_URL` as
 * for proxy/main.ts. Benchmark use only.
 */
import { Hono } from "hono";
import { proxy } from "hono/proxy";

if (import.meta.main) {
  const upstream = Deno.env.get("DENOKV_URL")!;
  const app = new Hono();
  app.all("*", (c) => proxy(upstream + c.req.path, c.req));
  Deno.serve({
    hostname: "127.0.0.1",
    port: Number(Deno.env.get("PORT")),
    onListen: () => {},
  }, app.fetch);
}
