// A Node program using npm @deno/kv, Deno's KV client for Node, against the URL
// in argv[2] with the token in DENO_KV_ACCESS_TOKEN. Prints one JSON line per step.
import { openKv } from "@deno/kv";

const out = (step, value) => console.log(JSON.stringify({ step, value }));
const kv = await openKv(process.argv[2], { accessToken: process.env.DENO_KV_ACCESS_TOKEN });
try {
  const set = await kv.set(["node", "a"], { hello: "node" });
  out("set", set.ok);
  const got = await kv.get(["node", "a"]);
  out("get", { value: got.value, same: got.versionstamp === set.versionstamp });
  await kv.set(["node", "big"], new Uint8Array(65_536));
  out("big", (await kv.get(["node", "big"])).value.length);
  out(
    "too big",
    await kv.set(["node", "bigger"], new Uint8Array(65_537)).then(
      () => "stored",
      (err) => err.message,
    ),
  );
  const stale = await kv.atomic().check({ key: ["node", "a"], versionstamp: null })
    .set(["node", "a"], 1).commit();
  out("stale check", stale.ok);
  await kv.atomic().sum(["node", "n"], 5n).sum(["node", "n"], 2n).commit();
  out("sum", String((await kv.get(["node", "n"])).value.value));
  const keys = [];
  for await (const entry of kv.list({ prefix: ["node"] })) keys.push(entry.key.join("/"));
  out("list", keys);
  const reader = kv.watch([["node", "a"]]).getReader();
  const first = await reader.read();
  setTimeout(() => kv.set(["node", "a"], "changed"), 200);
  const second = await reader.read();
  out("watch", [first.value[0].value, second.value[0].value]);
  await reader.cancel();
} finally {
  kv.close();
}
