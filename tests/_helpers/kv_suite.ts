/**
 * The KV behaviour every KV Connect endpoint must show, written once and run
 * against several targets (the stand-in directly, and through the proxy).
 */
import assert from "node:assert/strict";
import { withTimeout } from "../../scripts/backup_check/backup_check.ts";

/** Registers the suite's steps on `t`, each against a fresh key prefix of `kv`. */
export async function kvSuite(t: Deno.TestContext, kv: Deno.Kv): Promise<void> {
  const ns = crypto.randomUUID();

  await t.step("set, get and delete", async () => {
    const key = [ns, "plain", "one"];
    const res = await kv.set(key, { hello: "world", n: 1n, at: new Date(0) });
    assert.equal(res.ok, true);
    const got = await kv.get(key);
    assert.deepEqual(got.value, { hello: "world", n: 1n, at: new Date(0) });
    assert.equal(got.versionstamp, res.versionstamp);
    await kv.delete(key);
    const gone = await kv.get(key);
    assert.equal(gone.value, null);
    assert.equal(gone.versionstamp, null);
  });

  await t.step("list with prefix, start/end, reverse, limit and cursor", async () => {
    const op = kv.atomic();
    for (let i = 0; i < 10; i++) op.set([ns, "list", i], `v${i}`);
    op.set([ns, "other", 0], "x");
    assert.equal((await op.commit()).ok, true);

    const all = await Array.fromAsync(kv.list<string>({ prefix: [ns, "list"] }));
    assert.deepEqual(all.map((e) => e.value), Array.from({ length: 10 }, (_, i) => `v${i}`));

    const range = await Array.fromAsync(
      kv.list<string>({ start: [ns, "list", 3], end: [ns, "list", 6] }),
    );
    assert.deepEqual(range.map((e) => e.key[2]), [3, 4, 5]);

    const rev = await Array.fromAsync(
      kv.list<string>({ prefix: [ns, "list"] }, { reverse: true, limit: 3 }),
    );
    assert.deepEqual(rev.map((e) => e.key[2]), [9, 8, 7]);

    const first = kv.list<string>({ prefix: [ns, "list"] }, { limit: 4 });
    const page1 = await Array.fromAsync(first);
    assert.deepEqual(page1.map((e) => e.key[2]), [0, 1, 2, 3]);
    const rest = await Array.fromAsync(
      kv.list<string>({ prefix: [ns, "list"] }, { cursor: first.cursor }),
    );
    assert.deepEqual(rest.map((e) => e.key[2]), [4, 5, 6, 7, 8, 9]);

    const paged = await Array.fromAsync(
      kv.list<string>({ prefix: [ns, "list"] }, { batchSize: 3 }),
    );
    assert.equal(paged.length, 10);
  });

  await t.step("getMany", async () => {
    await kv.set([ns, "many", "a"], 1);
    await kv.set([ns, "many", "b"], 2);
    const got = await kv.getMany<number[]>([[ns, "many", "a"], [ns, "many", "missing"], [
      ns,
      "many",
      "b",
    ]]);
    assert.deepEqual(got.map((e) => e.value), [1, null, 2]);
  });

  await t.step("atomic with passing and failing check", async () => {
    const key = [ns, "atomic", "balance"];
    await kv.set(key, 10);
    const current = await kv.get<number>(key);
    const ok = await kv.atomic().check(current).set(key, 20).set([ns, "atomic", "log"], "a")
      .commit();
    assert.equal(ok.ok, true);
    const stale = await kv.atomic().check(current).set(key, 30).set([ns, "atomic", "log"], "b")
      .commit();
    assert.equal(stale.ok, false);
    assert.equal((await kv.get(key)).value, 20);
    assert.equal((await kv.get([ns, "atomic", "log"])).value, "a");
    const absent = await kv.atomic().check({ key: [ns, "atomic", "new"], versionstamp: null })
      .set([ns, "atomic", "new"], 1).commit();
    assert.equal(absent.ok, true);
  });

  await t.step("sum, min and max on KvU64", async () => {
    const key = [ns, "u64"];
    await kv.set(key, new Deno.KvU64(5n));
    await kv.atomic().sum(key, 10n).commit();
    assert.equal((await kv.get<Deno.KvU64>(key)).value?.value, 15n);
    await kv.atomic().min(key, 7n).commit();
    assert.equal((await kv.get<Deno.KvU64>(key)).value?.value, 7n);
    await kv.atomic().max(key, 100n).commit();
    assert.equal((await kv.get<Deno.KvU64>(key)).value?.value, 100n);
    await kv.set([ns, "not-u64"], "text");
    await assert.rejects(() => kv.atomic().sum([ns, "not-u64"], 1n).commit());
  });

  await t.step(
    "sum, min and max with a wrong-typed value fail at once (a 4xx, never retried)",
    async () => {
      // The client re-sends a write answered 5xx for ever: a wrong type must be a 4xx.
      const soon = <T>(p: Promise<T>) => withTimeout("the answer", 10_000, p);
      const u64 = [ns, "typed-u64"];
      const text = [ns, "typed-text"];
      await kv.set(u64, new Deno.KvU64(1n));
      await kv.set(text, "text");
      for (const type of ["sum", "min", "max"] as const) {
        await assert.rejects(
          () => soon(kv.atomic().mutate({ key: u64, value: 1 as never, type }).commit()),
          (err: Error) => !/timed out after/.test(err.message),
          `${type} with a Number operand`,
        );
        await assert.rejects(
          () => soon(kv.atomic().mutate({ key: text, value: new Deno.KvU64(1n), type }).commit()),
          (err: Error) => !/timed out after/.test(err.message),
          `${type} on a stored string`,
        );
      }
      assert.equal((await kv.get<Deno.KvU64>(u64)).value?.value, 1n);
      assert.equal((await kv.get(text)).value, "text");
    },
  );

  await t.step("expireIn is accepted", async () => {
    const res = await kv.set([ns, "ttl"], "soon gone", { expireIn: 60_000 });
    assert.equal(res.ok, true);
    assert.equal((await kv.get([ns, "ttl"])).value, "soon gone");
  });

  await t.step("versionstamps increase", async () => {
    const a = await kv.set([ns, "vs"], 1);
    const b = await kv.set([ns, "vs"], 2);
    const c = await kv.set([ns, "vs2"], 3);
    assert.ok(a.versionstamp < b.versionstamp, `${a.versionstamp} < ${b.versionstamp}`);
    assert.ok(b.versionstamp < c.versionstamp, `${b.versionstamp} < ${c.versionstamp}`);
  });

  await t.step("a 65,536-byte value is stored; a larger one fails clearly", async () => {
    const max = new Uint8Array(65_536).fill(7);
    assert.equal((await kv.set([ns, "big"], max)).ok, true);
    const got = await kv.get<Uint8Array>([ns, "big"]);
    assert.equal(got.value?.byteLength, 65_536);
    await assert.rejects(
      () => kv.set([ns, "too-big"], new Uint8Array(65_537)),
      /Value too large|value size limit/i,
    );
    assert.equal((await kv.get([ns, "too-big"])).value, null);
    assert.equal((await kv.set([ns, "after-big"], "still serving")).ok, true);
  });
}
