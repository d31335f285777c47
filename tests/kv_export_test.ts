/**
 * Tests of the NDJSON codec in `scripts/transfer/kv_transfer.ts` and of
 * `scripts/transfer/kv_export.ts` / `scripts/transfer/kv_import.ts` run as real subprocesses.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  decodeValue,
  encodeValue,
  entryToLine,
  lineToEntry,
  MAX_MUTATIONS,
  writeEntries,
} from "../scripts/transfer/kv_transfer.ts";
import { DENO, openRemoteKv, ROOT, startStack } from "./_helpers/processes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
const TOKEN = "export-token-0123456789";

/** Values of every type Deno KV stores, keyed by keys of every key-part type. */
function samples(): [Deno.KvKey, unknown][] {
  return [
    [["v", "string"], 'multi\nline "quoted" \u2028 ✓'],
    [["v", "int"], 42],
    [["v", "-0"], -0],
    [["v", "NaN"], NaN],
    [["v", "Infinity"], Infinity],
    [["v", "bigint"], 12345678901234567890123n],
    [["v", "false"], false],
    [["v", "null"], null],
    [["v", "undefined"], undefined],
    [["v", "KvU64"], new Deno.KvU64(7n)],
    [["v", "Uint8Array"], new Uint8Array([1, 2, 3, 0, 255])],
    [["v", "Uint32Array"], new Uint32Array([1, 4294967295])],
    [["v", "Float32Array"], new Float32Array([0.5, -2])],
    [["v", "Date"], new Date(Date.UTC(1999, 11, 31, 23, 59, 59, 999))],
    [["v", "invalid Date"], new Date(NaN)],
    [["v", "RegExp"], /^x(?<name>\d+)$/giu],
    [["v", "Map"], new Map<unknown, unknown>([[1, "one"], ["nested", new Map([[true, null]])]])],
    [["v", "Set"], new Set(["a", 2, 3n, new Date(5)])],
    [["v", "nested arrays"], [[[[]]], [1, [undefined, null, [new Uint8Array([9])]]]]],
    [["v", "object"], { a: { b: { c: [1, { d: new Set([1]) }] } }, "": "empty key", $x: 1 }],
    [["v", "tag-like object"], { $: "bigint", v: "1" }],
    [["k", 1.5, -3n, true, new Uint8Array([7])], "every key part"],
    [["k", Number.MIN_SAFE_INTEGER], "big negative number key"],
  ];
}

function norm(v: unknown): unknown {
  return v instanceof Deno.KvU64 ? { u64: v.value } : v;
}

Deno.test("encodeValue() and decodeValue() round-trip every value type", () => {
  for (const [key, value] of samples()) {
    const line = entryToLine(key, value);
    assert.ok(!line.includes("\n"), "one line per entry");
    const back = lineToEntry(line);
    assert.deepStrictEqual(back.key, key);
    assert.deepStrictEqual(norm(back.value), norm(value), String(key));
  }
  assert.deepStrictEqual(encodeValue({ a: 1, b: "x" }), { a: 1, b: "x" }, "plain JSON stays plain");
  assert.deepStrictEqual(decodeValue(encodeValue(new Date(0))), new Date(0));
});

Deno.test("encodeValue() refuses values it cannot represent, with the reason", () => {
  const cyclic: Record<string, unknown> = {};
  cyclic.self = cyclic;
  assert.throws(() => encodeValue(cyclic), /circular values cannot be exported/);
  assert.throws(() => encodeValue(() => 1), /unsupported value type: function/);
  assert.throws(() => decodeValue({ $: "Nope" }), /unknown value tag: "Nope"/);
});

Deno.test("writeEntries() splits commits on the 1000-mutation and 800 KiB limits", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    const commits: { count: number; bytes: number }[] = [];
    const counting = new Proxy(kv, {
      get(target, prop) {
        if (prop !== "atomic") return Reflect.get(target, prop).bind(target);
        return () => {
          const op = target.atomic();
          const stat = { count: 0, bytes: 0 };
          return {
            set(key: Deno.KvKey, value: unknown) {
              stat.count++;
              stat.bytes += value instanceof Uint8Array ? value.byteLength : 16;
              op.set(key, value);
              return this;
            },
            commit() {
              commits.push(stat);
              return op.commit();
            },
          };
        };
      },
    });
    const big = Array.from({ length: 30 }, (_, i) => ({
      key: ["big", i],
      value: new Uint8Array(64 * 1024).fill(i),
    }));
    const res = await writeEntries(counting, big, { overwrite: true });
    assert.equal(res.written, 30);
    assert.ok(commits.length >= 3, `${commits.length} commits for 1.9 MiB`);
    for (const c of commits) assert.ok(c.bytes <= 800 * 1024, `commit of ${c.bytes} bytes`);

    commits.length = 0;
    const small = Array.from({ length: 2_500 }, (_, i) => ({ key: ["s", i], value: i }));
    await writeEntries(counting, small, { overwrite: true });
    assert.deepStrictEqual(commits.map((c) => c.count), [MAX_MUTATIONS, MAX_MUTATIONS, 500]);
    assert.equal((await kv.get(["big", 29])).value instanceof Uint8Array, true);
  } finally {
    kv.close();
  }
});

Deno.test("writeEntries() splits a batch the server finds too big and fails at once on a too-large value", async () => {
  const kv = await Deno.openKv(":memory:");
  try {
    let attempts = 0;
    const strict = new Proxy(kv, {
      get(target, prop) {
        if (prop !== "atomic") return Reflect.get(target, prop).bind(target);
        return () => {
          const op = target.atomic();
          let n = 0;
          return {
            set(key: Deno.KvKey, value: unknown) {
              n++;
              op.set(key, value);
              return this;
            },
            commit() {
              attempts++;
              // A server stricter than our estimate.
              if (n > 300) throw new TypeError("Too many mutations (max 300)");
              return op.commit();
            },
          };
        };
      },
    });
    const entries = Array.from({ length: 1000 }, (_, i) => ({ key: ["e", i], value: i }));
    const res = await writeEntries(strict, entries, { overwrite: true });
    assert.equal(res.written, 1000);
    let count = 0;
    for await (const _ of kv.list({ prefix: ["e"] })) count++;
    assert.equal(count, 1000);

    attempts = 0;
    const tooBig = [{ key: ["big"], value: new Uint8Array(64 * 1024 + 1) }];
    await assert.rejects(writeEntries(strict, tooBig, { overwrite: true }), /Value too large/);
    assert.equal(attempts, 1, "no retries for an error a retry cannot fix");
  } finally {
    kv.close();
  }
});

async function run(
  script: string,
  args: string[],
  stdin?: Uint8Array,
  env: Record<string, string> = {},
): Promise<{ code: number; stdout: Uint8Array; stderr: string }> {
  const child = new Deno.Command(DENO, {
    args: ["run", "-A", "--unstable-kv", join(ROOT, "scripts/transfer", script), ...args],
    cwd: ROOT,
    env: { DENO_KV_ACCESS_TOKEN: TOKEN, ...env },
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const writer = child.stdin.getWriter();
  if (stdin) await writer.write(stdin);
  await writer.close();
  const out = await child.output();
  return { code: out.code, stdout: out.stdout, stderr: new TextDecoder().decode(out.stderr) };
}

async function dump(kv: Deno.Kv): Promise<[Deno.KvKey, unknown][]> {
  const out: [Deno.KvKey, unknown][] = [];
  for await (const e of kv.list({ prefix: [] })) out.push([e.key, norm(e.value)]);
  return out;
}

async function seed(kv: Deno.Kv, entries: [Deno.KvKey, unknown][]): Promise<void> {
  for (let i = 0; i < entries.length; i += 500) {
    const op = kv.atomic();
    for (const [key, value] of entries.slice(i, i + 500)) op.set(key, value);
    assert.ok((await op.commit()).ok);
  }
}

Deno.test(
  "kv-export then kv-import into an empty database gives identical data (remote and local)",
  opts,
  async () => {
    await using a = await startStack({ token: TOKEN });
    await using b = await startStack({ token: TOKEN });
    const dir = await Deno.makeTempDir({ prefix: "kv-export-test-" });
    const src = await openRemoteKv(a.proxy.url, TOKEN);
    const dst = await openRemoteKv(b.proxy.url, TOKEN);
    try {
      const many: [Deno.KvKey, unknown][] = [];
      for (let i = 0; i < 2_500; i++) many.push([["n", i], { i, s: `s${i}` }]);
      many.push([["big"], new Uint8Array(64 * 1024).fill(3)]);
      await seed(src, [...samples(), ...many]);
      const expected = await dump(src);

      const exp = await run("kv_export.ts", [a.proxy.url]);
      assert.equal(exp.code, 0, exp.stderr);
      const text = new TextDecoder().decode(exp.stdout);
      assert.equal(text.trimEnd().split("\n").length, expected.length, "one line per entry");
      const sha = exp.stderr.match(/kv-export: (\d+) entries, sha256 ([0-9a-f]{64})/);
      assert.ok(sha, exp.stderr);
      assert.equal(Number(sha[1]), expected.length);

      // remote -> dump -> remote
      const imp = await run("kv_import.ts", [b.proxy.url], exp.stdout);
      assert.equal(imp.code, 0, imp.stderr);
      assert.match(
        imp.stderr,
        new RegExp(`read ${expected.length} entries \\(sha256 ${sha[2]}\\)`),
      );
      assert.match(imp.stderr, new RegExp(`wrote ${expected.length};`));
      assert.match(imp.stderr, /verify ok/);
      assert.deepStrictEqual(await dump(dst), expected);

      // dump -> local file (from --input) and local file -> dump gives the same bytes
      const file = join(dir, "dump.ndjson");
      await Deno.writeFile(file, exp.stdout);
      const local = join(dir, "local.sqlite");
      const impLocal = await run("kv_import.ts", ["--input", file, local]);
      assert.equal(impLocal.code, 0, impLocal.stderr);
      const kv = await Deno.openKv(local);
      assert.deepStrictEqual(await dump(kv), expected);
      kv.close();
      const again = await run("kv_export.ts", [local]);
      assert.equal(again.code, 0, again.stderr);
      assert.deepStrictEqual(again.stdout, exp.stdout);

      // A second import keeps what is there and says so.
      const twice = await run("kv_import.ts", [b.proxy.url], exp.stdout);
      assert.equal(twice.code, 0, twice.stderr);
      assert.match(
        twice.stderr,
        new RegExp(`wrote 0; ${expected.length} already identical; 0 skipped`),
      );

      // A wrong token: one line, non-zero, nothing read from stdin is written.
      const wrong = { BAD_TOKEN: "wrong-token-0123456789" };
      const line = new TextEncoder().encode(entryToLine(["not", "written"], 1) + "\n");
      const badImport = await run(
        "kv_import.ts",
        ["--token-env", "BAD_TOKEN", b.proxy.url],
        line,
        wrong,
      );
      assert.equal(badImport.code, 1);
      assert.match(badImport.stderr.trim(), /^kv-import: error: cannot open http[^\n]*401[^\n]*$/);
      assert.equal((await dst.get(["not", "written"])).versionstamp, null);
      const badExport = await run(
        "kv_export.ts",
        ["--token-env", "BAD_TOKEN", a.proxy.url],
        undefined,
        wrong,
      );
      assert.equal(badExport.code, 1);
      assert.equal(badExport.stdout.byteLength, 0);
      assert.match(badExport.stderr.trim(), /^kv-export: error: cannot open http[^\n]*401[^\n]*$/);
    } finally {
      src.close();
      dst.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test(
  "kv-import keeps existing keys unless --overwrite, --dry-run writes nothing, bad input fails on one line",
  opts,
  async () => {
    const dir = await Deno.makeTempDir({ prefix: "kv-import-test-" });
    try {
      const path = join(dir, "db.sqlite");
      const kv = await Deno.openKv(path);
      await kv.set(["a"], "old");
      const enc = new TextEncoder();
      const input = enc.encode(
        [entryToLine(["a"], "new"), entryToLine(["b"], new Set([1]))].join("\n") + "\n",
      );

      const dry = await run("kv_import.ts", ["--dry-run", path], input);
      assert.equal(dry.code, 0, dry.stderr);
      assert.match(dry.stderr, /would write 1; 0 already identical; 1 skipped/);
      assert.deepStrictEqual(await dump(kv), [[["a"], "old"]]);

      const keep = await run("kv_import.ts", [path], input);
      assert.equal(keep.code, 0, keep.stderr);
      assert.match(keep.stderr, /wrote 1; 0 already identical; 1 skipped/);
      assert.deepStrictEqual(await dump(kv), [[["a"], "old"], [["b"], new Set([1])]]);

      const over = await run("kv_import.ts", ["--overwrite", path], input);
      assert.equal(over.code, 0, over.stderr);
      assert.deepStrictEqual(await dump(kv), [[["a"], "new"], [["b"], new Set([1])]]);

      const bad = await run(
        "kv_import.ts",
        [path],
        enc.encode('{"key":["c"],"value":1}\nnot json\n'),
      );
      assert.equal(bad.code, 1);
      assert.match(bad.stderr.trim(), /^kv-import: error: line 2: [^\n]+$/);
      assert.deepStrictEqual((await kv.get(["c"])).versionstamp, null, "nothing written");

      const missing = await run("kv_import.ts", ["--input", join(dir, "nope.ndjson"), path]);
      assert.equal(missing.code, 1);
      assert.match(missing.stderr.trim(), /^kv-import: error: cannot read .*nope\.ndjson[^\n]*$/);

      const noSource = await run("kv_export.ts", [join(dir, "nope.sqlite")]);
      assert.equal(noSource.code, 1);
      assert.match(noSource.stderr.trim(), /^kv-export: error: cannot open .*nope\.sqlite[^\n]*$/);
      await assert.rejects(Deno.stat(join(dir, "nope.sqlite")), Deno.errors.NotFound);
      kv.close();
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);
