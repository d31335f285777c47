/**
 * End-to-end tests of `scripts/transfer/kv_copy.ts`, run as a real subprocess between
 * stand-in servers (through their proxies) and local SQLite files.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { DENO, openRemoteKv, ROOT, startStack, waitFor } from "./_helpers/processes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };
const SCRIPT = join(ROOT, "scripts/transfer/kv_copy.ts");
const SRC_TOKEN = "source-token-0123456789";
const DST_TOKEN = "destination-token-0123456789";

/** One entry of every value type Deno KV stores, under keys of every key-part type. */
function everyType(): [Deno.KvKey, unknown][] {
  return [
    [["t", "string"], "héllo \u0000 wörld"],
    [["t", "empty string"], ""],
    [["t", "number"], 3.25],
    [["t", "negative zero"], -0],
    [["t", "nan"], NaN],
    [["t", "infinity"], -Infinity],
    [["t", "bigint"], -(2n ** 100n)],
    [["t", "true"], true],
    [["t", "null"], null],
    [["t", "undefined"], undefined],
    [["t", "u64"], new Deno.KvU64(18446744073709551615n)],
    [["t", "bytes"], new Uint8Array([0, 1, 2, 255])],
    [["t", "int16"], new Int16Array([-1, 2, -300])],
    [["t", "float64"], new Float64Array([1.5, -0, NaN])],
    [["t", "bigint64"], new BigInt64Array([-5n, 9n])],
    [["t", "arraybuffer"], new Uint8Array([9, 8, 7]).buffer],
    [["t", "date"], new Date("2024-02-29T12:34:56.789Z")],
    [["t", "regexp"], /a+b?[c-z]$/gimsu],
    [["t", "map"], new Map<unknown, unknown>([["a", 1], [2n, new Set([1, "x"])]])],
    [["t", "set"], new Set([1, "two", null])],
    [["t", "array"], [1, [2, [3, [new Date(0), undefined]]], { deep: [null] }]],
    [["t", "object"], { a: 1, nested: { b: [true, "x"], m: new Map([["k", "v"]]) }, u: undefined }],
    [["t", "dollar object"], { $: "Date", v: "not a date" }],
    [["t", "error"], new RangeError("out of range")],
    [["k", 42], "number key"],
    [["k", -1.5], "float key"],
    [["k", 7n], "bigint key"],
    [["k", true], "boolean key"],
    [["k", new Uint8Array([1, 2, 3])], "bytes key"],
    [["k", "nested", 1, 2n, false, new Uint8Array([0])], "mixed key"],
  ];
}

async function seed(kv: Deno.Kv, entries: [Deno.KvKey, unknown][]): Promise<void> {
  for (let i = 0; i < entries.length; i += 10) {
    const op = kv.atomic();
    for (const [key, value] of entries.slice(i, i + 10)) op.set(key, value);
    assert.ok((await op.commit()).ok);
  }
}

/** Every entry of `kv` as [key, value] pairs, in key order. */
async function dump(kv: Deno.Kv, prefix: Deno.KvKey = []): Promise<[Deno.KvKey, unknown][]> {
  const out: [Deno.KvKey, unknown][] = [];
  for await (const e of kv.list({ prefix })) out.push([e.key, e.value]);
  return out;
}

/** Compares values including the ones deepStrictEqual cannot see into. */
function assertSameData(actual: [Deno.KvKey, unknown][], expected: [Deno.KvKey, unknown][]) {
  assert.equal(actual.length, expected.length, "entry count");
  const norm = (v: unknown): unknown => v instanceof Deno.KvU64 ? { u64: v.value } : v;
  for (let i = 0; i < expected.length; i++) {
    assert.deepStrictEqual(actual[i][0], expected[i][0]);
    const [a, e] = [norm(actual[i][1]), norm(expected[i][1])];
    assert.deepStrictEqual(a, e, `value of ${String(expected[i][0])}`);
    if (e instanceof Error) assert.equal((a as Error).message, e.message);
    if (e instanceof ArrayBuffer) {
      assert.deepStrictEqual(new Uint8Array(a as ArrayBuffer), new Uint8Array(e));
    }
  }
}

interface Result {
  code: number;
  stderr: string;
  stdout: string;
}

function copyCommand(args: string[], env: Record<string, string> = {}): Deno.Command {
  return new Deno.Command(DENO, {
    args: ["run", "-A", "--unstable-kv", SCRIPT, ...args],
    cwd: ROOT,
    env: { SRC_TOKEN, DST_TOKEN, ...env },
    stdout: "piped",
    stderr: "piped",
  });
}

async function runCopy(args: string[], env: Record<string, string> = {}): Promise<Result> {
  const out = await copyCommand(args, env).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

async function tempDir(): Promise<string> {
  return await Deno.makeTempDir({ prefix: "kv-copy-test-" });
}

const tokens = ["--from-token-env", "SRC_TOKEN", "--to-token-env", "DST_TOKEN"];

Deno.test(
  "kv-copy copies every value type remote -> remote through two proxies",
  opts,
  async () => {
    await using a = await startStack({ token: SRC_TOKEN });
    await using b = await startStack({ token: DST_TOKEN });
    const src = await openRemoteKv(a.proxy.url, SRC_TOKEN);
    const dst = await openRemoteKv(b.proxy.url, DST_TOKEN);
    try {
      await seed(src, everyType());
      const cp = join(a.dir, "cp.json");
      const res = await runCopy([
        "--from",
        a.proxy.url,
        "--to",
        b.proxy.url,
        ...tokens,
        "--checkpoint",
        cp,
      ]);
      assert.equal(res.code, 0, res.stderr);
      assert.match(res.stderr, /wrote 30 entries/);
      assert.match(res.stderr, /verify ok: source 30 entries/);
      assertSameData(await dump(dst), await dump(src));
      assert.equal((await dump(src)).length, everyType().length);
    } finally {
      src.close();
      dst.close();
    }
  },
);

Deno.test("kv-copy copies every value type local file -> remote", opts, async () => {
  await using b = await startStack({ token: DST_TOKEN });
  const dir = await tempDir();
  const path = join(dir, "src.sqlite");
  const src = await Deno.openKv(path);
  await seed(src, everyType());
  const dst = await openRemoteKv(b.proxy.url, DST_TOKEN);
  try {
    const res = await runCopy([
      "--from",
      path,
      "--to",
      b.proxy.url,
      ...tokens,
      "--checkpoint",
      join(dir, "cp.json"),
    ]);
    assert.equal(res.code, 0, res.stderr);
    assertSameData(await dump(dst), await dump(src));
  } finally {
    src.close();
    dst.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("kv-copy copies every value type remote -> local file", opts, async () => {
  await using a = await startStack({ token: SRC_TOKEN });
  const dir = await tempDir();
  const path = join(dir, "dst.sqlite");
  const src = await openRemoteKv(a.proxy.url, SRC_TOKEN);
  try {
    await seed(src, everyType());
    const res = await runCopy([
      "--from",
      a.proxy.url,
      "--to",
      path,
      ...tokens,
      "--checkpoint",
      join(dir, "cp.json"),
    ]);
    assert.equal(res.code, 0, res.stderr);
    const dst = await Deno.openKv(path);
    try {
      assertSameData(await dump(dst), await dump(src));
    } finally {
      dst.close();
    }
  } finally {
    src.close();
    await Deno.remove(dir, { recursive: true });
  }
});

/**
 * Entries whose sizes force commits to split on bytes as well as on count: a run
 * of 30 values of exactly 64 KiB (1.9 MiB) cannot fit one 800 KiB commit.
 */
function manyEntries(n: number): [Deno.KvKey, unknown][] {
  const out: [Deno.KvKey, unknown][] = [];
  for (let i = 0; i < n; i++) {
    let value: unknown;
    if (i % 500 === 7 || (i >= 5000 && i < 5030)) value = new Uint8Array(64 * 1024).fill(i % 251); // exactly 64 KiB
    else if (i % 3 === 0) value = { i, name: `entry ${i}`, at: new Date(i) };
    else value = `v${i}`;
    out.push([["many", i], value]);
  }
  // Keys near the 2 KiB limit: 200 of them exceed the 80 KiB of keys one commit may carry.
  // (String parts sort before numbers, so these come first in key order.)
  const long: [Deno.KvKey, unknown][] = [];
  for (let i = 0; i < 200; i++) long.push([["many", "long", "k".repeat(1900), i], i]);
  return [...long, ...out];
}

async function seedLocal(path: string, entries: [Deno.KvKey, unknown][]): Promise<void> {
  // Seeds in small commits (a few big values, or 20 entries) to stay far from the limits.
  const kv = await Deno.openKv(path);
  try {
    let op = kv.atomic();
    let n = 0;
    let bytes = 0;
    for (const [key, value] of entries) {
      const size = value instanceof Uint8Array ? value.byteLength : 64;
      if (n === 20 || bytes + size > 600 * 1024) {
        assert.ok((await op.commit()).ok);
        op = kv.atomic();
        n = 0;
        bytes = 0;
      }
      op.set(key, value);
      n++;
      bytes += size;
    }
    assert.ok((await op.commit()).ok);
  } finally {
    kv.close();
  }
}

Deno.test(
  "kv-copy copies 10,000 entries across batch boundaries, including 64 KiB values",
  opts,
  async () => {
    await using b = await startStack({ token: DST_TOKEN });
    const dir = await tempDir();
    const path = join(dir, "src.sqlite");
    const entries = manyEntries(10_000);
    await seedLocal(path, entries);
    const dst = await openRemoteKv(b.proxy.url, DST_TOKEN);
    try {
      const res = await runCopy([
        "--from",
        path,
        "--to",
        b.proxy.url,
        ...tokens,
        "--page-size",
        "1000",
        "--checkpoint",
        join(dir, "cp.json"),
      ]);
      assert.equal(res.code, 0, res.stderr);
      assert.match(res.stderr, /wrote 10200 entries/);
      assert.match(res.stderr, /verify ok: source 10200 entries/);
      assert.match(res.stderr, /kv-copy: \d+ entries, [\d.]+ \w+, \d+\/s/, "progress line");
      assertSameData(await dump(dst), entries);
    } finally {
      dst.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test("kv-copy killed half-way with SIGKILL resumes with --resume", opts, async () => {
  await using b = await startStack({ token: DST_TOKEN });
  const dir = await tempDir();
  const path = join(dir, "src.sqlite");
  const entries = manyEntries(10_000);
  await seedLocal(path, entries);
  const cp = join(dir, "cp.json");
  const args = [
    "--from",
    path,
    "--to",
    b.proxy.url,
    ...tokens,
    "--page-size",
    "100",
    "--progress-ms",
    "0",
    "--checkpoint",
    cp,
  ];
  const child = copyCommand(args).spawn();
  let seen = "";
  const reader = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  await waitFor("the copy to pass 2000 entries", async () => {
    const { value } = await reader.read();
    seen += value ?? "";
    const counts = [...seen.matchAll(/kv-copy: (\d+) entries/g)].map((m) => Number(m[1]));
    return counts.some((n) => n >= 2000);
  }, { timeoutMs: 60_000, intervalMs: 0 });
  child.kill("SIGKILL");
  const status = await child.status;
  reader.releaseLock();
  await child.stderr.cancel().catch(() => {});
  await child.stdout.cancel().catch(() => {});
  assert.equal(status.signal, "SIGKILL");
  const dst = await openRemoteKv(b.proxy.url, DST_TOKEN);
  try {
    const partial = (await dump(dst)).length;
    assert.ok(partial >= 2000 && partial < 10_200, `partial copy has ${partial} entries`);
    const checkpoint = JSON.parse(await Deno.readTextFile(cp));
    assert.ok(checkpoint.written >= 2000);

    const res = await runCopy([...args, "--resume"]);
    assert.equal(res.code, 0, res.stderr);
    assert.match(res.stderr, /resuming after \d+ entries/);
    assert.match(res.stderr, /verify ok: source 10200 entries/);
    assertSameData(await dump(dst), entries);
    await assert.rejects(Deno.stat(cp), Deno.errors.NotFound, "checkpoint removed when done");
  } finally {
    dst.close();
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test(
  "kv-copy fails with one clear line and writes nothing on a wrong token, an unreachable server or an unreadable file",
  opts,
  async () => {
    await using a = await startStack({ token: SRC_TOKEN });
    await using b = await startStack({ token: DST_TOKEN });
    const src = await openRemoteKv(a.proxy.url, SRC_TOKEN);
    const dst = await openRemoteKv(b.proxy.url, DST_TOKEN);
    const dir = await tempDir();
    try {
      await seed(src, everyType());
      const cp = ["--checkpoint", join(dir, "cp.json")];
      const cases: [string, string[], Record<string, string>, RegExp][] = [
        [
          "wrong source token",
          ["--from", a.proxy.url, "--to", b.proxy.url, ...tokens],
          { SRC_TOKEN: "wrong-token-0123456789" },
          /cannot open source .*401|cannot open source .*[Uu]nauthorized/,
        ],
        [
          "wrong destination token",
          ["--from", a.proxy.url, "--to", b.proxy.url, ...tokens],
          { DST_TOKEN: "wrong-token-0123456789" },
          /cannot open destination .*(401|[Uu]nauthorized)/,
        ],
        [
          "unreachable destination",
          ["--from", a.proxy.url, "--to", "http://127.0.0.1:9", ...tokens],
          {},
          /cannot open destination http:\/\/127\.0\.0\.1:9.*(connect|refused)/i,
        ],
        [
          "unreachable source",
          ["--from", "http://127.0.0.1:9", "--to", join(dir, "out.sqlite"), ...tokens],
          {},
          /cannot open source http:\/\/127\.0\.0\.1:9.*(connect|refused)/i,
        ],
        [
          "missing source file",
          ["--from", join(dir, "missing.sqlite"), "--to", b.proxy.url, ...tokens],
          {},
          /cannot open source .*missing\.sqlite/,
        ],
        [
          "source file that is not a database",
          ["--from", join(ROOT, "deno.json"), "--to", b.proxy.url, ...tokens],
          {},
          /cannot open source .*not a SQLite database/,
        ],
        [
          "source path that cannot be read as a file",
          ["--from", dir, "--to", b.proxy.url, ...tokens],
          {},
          /cannot open source .*(directory|Is a directory)/i,
        ],
        [
          "unset token variable",
          ["--from", a.proxy.url, "--to", b.proxy.url, "--from-token-env", "NO_SUCH_VAR_XYZ"],
          {},
          /NO_SUCH_VAR_XYZ is unset/,
        ],
      ];
      for (const [name, args, env, pattern] of cases) {
        const res = await runCopy([...args, ...cp], env);
        assert.notEqual(res.code, 0, name);
        const lines = res.stderr.trim().split("\n");
        assert.equal(lines.length, 1, `${name}: one line, got ${res.stderr}`);
        assert.match(lines[0], /^kv-copy: error: /, name);
        assert.match(lines[0], pattern, name);
      }
      assert.equal((await dump(dst)).length, 0, "nothing written at the destination");
      await assert.rejects(Deno.stat(join(dir, "missing.sqlite")), Deno.errors.NotFound);
      await assert.rejects(Deno.stat(join(dir, "out.sqlite")), Deno.errors.NotFound);
    } finally {
      src.close();
      dst.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test(
  "kv-copy keeps existing destination keys unless --overwrite, and --dry-run writes nothing",
  opts,
  async () => {
    const dir = await tempDir();
    try {
      const from = join(dir, "src.sqlite");
      const to = join(dir, "dst.sqlite");
      const cp = ["--checkpoint", join(dir, "cp.json")];
      const src = await Deno.openKv(from);
      await seed(src, [[["a"], 1], [["b"], 2], [["c"], 3], [["d"], 4]]);
      src.close();
      const dst = await Deno.openKv(to);
      await seed(dst, [[["b"], 2], [["c"], "kept"]]);

      const dry = await runCopy(["--from", from, "--to", to, "--dry-run", ...cp]);
      assert.equal(dry.code, 0, dry.stderr);
      assert.match(dry.stderr, /would write 2 entries; 1 already identical; 1 skipped/);
      assertSameData(await dump(dst), [[["b"], 2], [["c"], "kept"]]);

      const keep = await runCopy(["--from", from, "--to", to, ...cp]);
      assert.equal(keep.code, 3, "verify reports the kept difference");
      assert.match(keep.stderr, /wrote 2 entries; 1 already identical; 1 skipped/);
      assert.match(keep.stderr, /verify MISMATCH/);
      assertSameData(await dump(dst), [[["a"], 1], [["b"], 2], [["c"], "kept"], [["d"], 4]]);

      const over = await runCopy(["--from", from, "--to", to, "--overwrite", ...cp]);
      assert.equal(over.code, 0, over.stderr);
      assert.match(over.stderr, /verify ok: source 4 entries/);
      assertSameData(await dump(dst), [[["a"], 1], [["b"], 2], [["c"], 3], [["d"], 4]]);
      dst.close();
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test("kv-copy --prefix copies only the selected keys", opts, async () => {
  const dir = await tempDir();
  try {
    const from = join(dir, "src.sqlite");
    const to = join(dir, "dst.sqlite");
    const src = await Deno.openKv(from);
    await seed(src, [[["users", "a"], 1], [["users", "b"], 2], [["posts", 1], 3], [
      ["x", 5n, "y"],
      4,
    ]]);
    src.close();
    const res = await runCopy([
      "--from",
      from,
      "--to",
      to,
      "--prefix",
      "users",
      "--prefix",
      '["x", {"$": "bigint", "v": "5"}]',
      "--checkpoint",
      join(dir, "cp.json"),
    ]);
    assert.equal(res.code, 0, res.stderr);
    const dst = await Deno.openKv(to);
    assertSameData(await dump(dst), [[["users", "a"], 1], [["users", "b"], 2], [
      ["x", 5n, "y"],
      4,
    ]]);
    dst.close();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("kv-copy rejects bad options with a clear message", async () => {
  const res = await runCopy(["--from", "x.sqlite", "--to", "y.sqlite", "--page-size", "0"]);
  assert.equal(res.code, 2);
  assert.equal(res.stderr.trim(), 'kv-copy: error: "--page-size" must be an integer >= 1: got 0');
  const missing = await runCopy(["--to", "y.sqlite"]);
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /"--from" is required/);
});
