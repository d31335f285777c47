/**
 * Shared engine of kv-copy, kv-export and kv-import: opens a database by KV
 * Connect URL or local path, reads it in pages, writes atomic batches within
 * the server's limits, and encodes entries as NDJSON that round-trips every
 * Deno KV value type.
 */
import { createHash } from "node:crypto";
import { Buffer } from "node:buffer";
import { serialize } from "node:v8";

// Limits enforced by denokv and Deno's KV client (ext/kv in the Deno repo).
/** Mutations per atomic commit. */
export const MAX_MUTATIONS = 1000;
/** Keys plus values per atomic commit: 800 KiB, with headroom for encoding overhead. */
export const MAX_COMMIT_BYTES = 800 * 1024 - 16 * 1024;
/** Total key bytes per atomic commit: 80 KiB, with headroom. */
export const MAX_COMMIT_KEY_BYTES = 80 * 1024 - 2 * 1024;
/** Keys per getMany(). */
export const MAX_GET_MANY = 10;
/** Default entries per list page. */
export const DEFAULT_PAGE_SIZE = 1000;

/** A database to read from or write to, as given on the command line. */
export interface KvLocation {
  /** The URL or path as given. */
  spec: string;
  /** True for http(s) KV Connect URLs. */
  remote: boolean;
}

/** Classifies a command-line database argument. */
export function parseLocation(spec: string): KvLocation {
  if (spec.trim() === "") throw new TypeError(`a database must be a URL or a path: got ""`);
  const remote = /^https?:\/\//i.test(spec);
  if (remote) new URL(spec); // throws a clear TypeError on a malformed URL
  return { spec, remote };
}

/** Options for {@linkcode openLocation}. */
export interface OpenOptions {
  /** Access token for a remote database. */
  token?: string;
  /** The database must already exist (sources); a path is never created. */
  mustExist?: boolean;
}

/**
 * Opens `loc` and proves it answers (one read) so that a wrong token, an
 * unreachable server or an unreadable file fails here, before any write.
 */
export async function openLocation(loc: KvLocation, opts: OpenOptions = {}): Promise<Deno.Kv> {
  if (!loc.remote && opts.mustExist) {
    // Deno.openKv() would silently create a missing file.
    const file = await Deno.open(loc.spec, { read: true });
    const head = new Uint8Array(16);
    const n = await file.read(head);
    file.close();
    const magic = new TextDecoder().decode(head.subarray(0, n ?? 0));
    if (magic !== "SQLite format 3\0") {
      throw new TypeError(`not a SQLite database: ${loc.spec}`);
    }
  }
  if (loc.remote) {
    if (!opts.token) throw new TypeError(`no access token for ${loc.spec}`);
    // The KV client reads the token from the environment when the database is opened.
    Deno.env.set("DENO_KV_ACCESS_TOKEN", opts.token);
  }
  const kv = await Deno.openKv(loc.spec);
  try {
    await kv.get(["__kv_transfer_probe__"]);
  } catch (err) {
    kv.close();
    throw err;
  }
  return kv;
}

/** Turns an error into one line for the terminal. */
export function oneLine(err: unknown): string {
  const text = err instanceof Error ? err.message : String(err);
  return text.replace(/\s+/g, " ").trim();
}

// ---------------------------------------------------------------------------
// NDJSON codec

/** A JSON value. */
export type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

const TYPED_ARRAYS = {
  Int8Array,
  Uint8Array,
  Uint8ClampedArray,
  Int16Array,
  Uint16Array,
  Int32Array,
  Uint32Array,
  Float32Array,
  Float64Array,
  BigInt64Array,
  BigUint64Array,
} as const;
type TypedArrayName = keyof typeof TYPED_ARRAYS;

function b64(bytes: Uint8Array): string {
  return Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");
}
function unb64(text: string): Uint8Array<ArrayBuffer> {
  const buf = Buffer.from(text, "base64");
  const out = new Uint8Array(buf.byteLength);
  out.set(buf);
  return out;
}

function encodeNumber(n: number): Json {
  if (Number.isFinite(n) && !Object.is(n, -0)) return n;
  return { $: "number", v: Object.is(n, -0) ? "-0" : String(n) };
}
function decodeNumber(v: string): number {
  return v === "-0" ? -0 : Number(v);
}

/**
 * Encodes a Deno KV value as JSON. Plain JSON values stay as they are; every
 * other type becomes an object tagged `$` (a plain object that itself has a
 * `$` property is wrapped as `{"$":"Object","v":{...}}`).
 *
 * The dump format (one line per entry, `{"key":[...],"value":...}`):
 *
 * | value | JSON |
 * | --- | --- |
 * | string, boolean, null, finite number | itself |
 * | NaN, ±Infinity, -0 | `{"$":"number","v":"NaN"}` |
 * | bigint | `{"$":"bigint","v":"123"}` |
 * | undefined | `{"$":"undefined"}` |
 * | Deno.KvU64 | `{"$":"KvU64","v":"123"}` |
 * | Date | `{"$":"Date","v":"2024-01-01T00:00:00.000Z"}` (`null` if invalid) |
 * | RegExp | `{"$":"RegExp","source":"a+","flags":"gi"}` |
 * | Uint8Array and every other typed array, ArrayBuffer, DataView | `{"$":"Float64Array","v":"<base64 of the bytes>"}` |
 * | Map | `{"$":"Map","v":[[k, v], ...]}` |
 * | Set | `{"$":"Set","v":[...]}` |
 * | Error | `{"$":"Error","name":"RangeError","message":"...","stack":...,"cause":...}` |
 * | boxed primitive | `{"$":"Boxed","v":...}` |
 * | array | an array of encoded values |
 * | plain object | an object of encoded values |
 *
 * Key parts: strings, booleans and finite numbers as themselves; other numbers,
 * bigints and Uint8Arrays tagged as above.
 */
export function encodeValue(value: unknown): Json {
  return encodeInner(value, new Set());
}

function encodeInner(value: unknown, seen: Set<object>): Json {
  switch (typeof value) {
    case "string":
    case "boolean":
      return value;
    case "number":
      return encodeNumber(value);
    case "bigint":
      return { $: "bigint", v: value.toString() };
    case "undefined":
      return { $: "undefined" };
    case "object":
      break;
    default:
      throw new TypeError(`unsupported value type: ${typeof value}`);
  }
  if (value === null) return null;
  if (value instanceof Deno.KvU64) return { $: "KvU64", v: value.value.toString() };
  if (value instanceof Date) {
    const t = value.getTime();
    return { $: "Date", v: Number.isNaN(t) ? null : value.toISOString() };
  }
  if (value instanceof RegExp) return { $: "RegExp", source: value.source, flags: value.flags };
  if (value instanceof ArrayBuffer) return { $: "ArrayBuffer", v: b64(new Uint8Array(value)) };
  if (ArrayBuffer.isView(value)) {
    const bytes = new Uint8Array(value.buffer, value.byteOffset, value.byteLength);
    const name = value.constructor.name;
    if (value instanceof DataView) return { $: "DataView", v: b64(bytes) };
    if (!(name in TYPED_ARRAYS)) throw new TypeError(`unsupported typed array: ${name}`);
    return { $: name, v: b64(bytes) };
  }
  if (seen.has(value)) throw new TypeError("circular values cannot be exported");
  seen.add(value);
  try {
    if (Array.isArray(value)) {
      const out: Json[] = [];
      for (let i = 0; i < value.length; i++) {
        if (!(i in value)) throw new TypeError("sparse arrays cannot be exported");
        out.push(encodeInner(value[i], seen));
      }
      return out;
    }
    if (value instanceof Map) {
      return {
        $: "Map",
        v: [...value].map(([k, v]) => [encodeInner(k, seen), encodeInner(v, seen)]),
      };
    }
    if (value instanceof Set) return { $: "Set", v: [...value].map((v) => encodeInner(v, seen)) };
    if (value instanceof Error) {
      return {
        $: "Error",
        name: value.name,
        message: value.message,
        stack: value.stack ?? null,
        cause: "cause" in value ? encodeInner(value.cause, seen) : null,
      };
    }
    if (
      value instanceof String || value instanceof Number || value instanceof Boolean ||
      value instanceof BigInt
    ) {
      return { $: "Boxed", v: encodeInner(value.valueOf(), seen) };
    }
    const obj: Record<string, Json> = {};
    for (const [k, v] of Object.entries(value)) obj[k] = encodeInner(v, seen);
    return Object.hasOwn(obj, "$") ? { $: "Object", v: obj } : obj;
  } finally {
    seen.delete(value);
  }
}

/** Inverse of {@linkcode encodeValue}. */
export function decodeValue(json: Json): unknown {
  if (json === null || typeof json !== "object") return json;
  if (Array.isArray(json)) return json.map(decodeValue);
  if (!Object.hasOwn(json, "$")) {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(json)) out[k] = decodeValue(v);
    return out;
  }
  const tag = json.$;
  const v = json.v;
  switch (tag) {
    case "number":
      return decodeNumber(v as string);
    case "bigint":
      return BigInt(v as string);
    case "undefined":
      return undefined;
    case "KvU64":
      return new Deno.KvU64(BigInt(v as string));
    case "Date":
      return new Date(v === null ? NaN : v as string);
    case "RegExp":
      return new RegExp(json.source as string, json.flags as string);
    case "ArrayBuffer":
      return unb64(v as string).buffer;
    case "DataView":
      return new DataView(unb64(v as string).buffer);
    case "Map":
      return new Map((v as Json[][]).map(([k, x]) => [decodeValue(k), decodeValue(x)]));
    case "Set":
      return new Set((v as Json[]).map(decodeValue));
    case "Error": {
      const err = new Error(json.message as string);
      err.name = json.name as string;
      if (json.stack !== null) err.stack = json.stack as string;
      if (json.cause !== null) err.cause = decodeValue(json.cause);
      return err;
    }
    case "Boxed":
      return Object(decodeValue(v));
    case "Object": {
      const out: Record<string, unknown> = {};
      for (const [k, x] of Object.entries(v as Record<string, Json>)) out[k] = decodeValue(x);
      return out;
    }
  }
  if (typeof tag === "string" && tag in TYPED_ARRAYS) {
    const bytes = unb64(v as string);
    const Ctor = TYPED_ARRAYS[tag as TypedArrayName];
    return new Ctor(bytes.buffer, 0, bytes.byteLength / Ctor.BYTES_PER_ELEMENT);
  }
  throw new TypeError(`unknown value tag: ${JSON.stringify(tag)}`);
}

/** Encodes a key: strings and finite numbers as themselves, other parts tagged. */
export function encodeKey(key: Deno.KvKey): Json[] {
  return key.map((part): Json => {
    if (typeof part === "string" || typeof part === "boolean") return part;
    if (typeof part === "number") return encodeNumber(part);
    if (typeof part === "bigint") return { $: "bigint", v: part.toString() };
    if (part instanceof Uint8Array) return { $: "Uint8Array", v: b64(part) };
    throw new TypeError(`unsupported key part: ${String(part)}`);
  });
}

/** Inverse of {@linkcode encodeKey}. */
export function decodeKey(json: Json): Deno.KvKey {
  if (!Array.isArray(json)) {
    throw new TypeError(`a key must be an array: got ${JSON.stringify(json)}`);
  }
  return json.map((part): Deno.KvKeyPart => {
    if (typeof part === "string" || typeof part === "boolean" || typeof part === "number") {
      return part;
    }
    if (part && typeof part === "object" && !Array.isArray(part)) {
      if (part.$ === "number") return decodeNumber(part.v as string);
      if (part.$ === "bigint") return BigInt(part.v as string);
      if (part.$ === "Uint8Array") return unb64(part.v as string);
    }
    throw new TypeError(`unsupported key part: ${JSON.stringify(part)}`);
  });
}

/** One NDJSON line: `{"key":[...],"value":...}` with no trailing newline. */
export function entryToLine(key: Deno.KvKey, value: unknown): string {
  return JSON.stringify({ key: encodeKey(key), value: encodeValue(value) });
}

/** Parses one NDJSON line back into a key and a value. */
export function lineToEntry(line: string): { key: Deno.KvKey; value: unknown } {
  const obj = JSON.parse(line) as { [k: string]: Json };
  if (!obj || typeof obj !== "object" || !("key" in obj) || !("value" in obj)) {
    throw new TypeError(`expected {"key":[...],"value":...}`);
  }
  return { key: decodeKey(obj.key), value: decodeValue(obj.value) };
}

/** A stable identity for a key (for sets and maps). */
export function keyId(key: Deno.KvKey): string {
  return JSON.stringify(encodeKey(key));
}

// ---------------------------------------------------------------------------
// Reading

/** Parses an integer option `--name`; `fallback` when absent, a RangeError below `min`. */
export function intOption(
  name: string,
  text: string | undefined,
  fallback: number,
  min: number,
): number {
  if (text === undefined) return fallback;
  const n = Number(text);
  if (!Number.isInteger(n) || n < min) {
    throw new RangeError(`"--${name}" must be an integer >= ${min}: got ${text}`);
  }
  return n;
}

/** The token for `loc` from the variable `varName`: undefined for a local file, a TypeError when unset. */
export function tokenFor(
  loc: KvLocation,
  env: Record<string, string>,
  varName: string,
): string | undefined {
  if (!loc.remote) return undefined;
  const token = env[varName];
  if (!token) {
    throw new TypeError(`${loc.spec} needs a token: environment variable ${varName} is unset`);
  }
  return token;
}

/** The one database a single-database command (kv-export, kv-import) names, and its token. */
export function onlyLocation(
  positionals: string[],
  env: Record<string, string>,
  tokenEnv: string,
): { location: KvLocation; token: string | undefined } {
  if (positionals.length !== 1) {
    throw new TypeError(
      `expected one database (URL or path): got ${positionals.length}; see --help`,
    );
  }
  const location = parseLocation(positionals[0]);
  return { location, token: tokenFor(location, env, tokenEnv) };
}

/** Parses a `--prefix` value: a JSON array, or comma-separated string parts. */
export function parsePrefix(text: string): Deno.KvKey {
  if (text.trim().startsWith("[")) {
    let json: Json;
    try {
      json = JSON.parse(text);
    } catch {
      throw new TypeError(`"--prefix" is not valid JSON: got ${text}`);
    }
    return decodeKey(json);
  }
  if (text === "") return [];
  return text.split(",");
}

/** Lists `prefix` page by page from `cursor`, yielding each page with the cursor after it. */
export async function* readPages(
  kv: Deno.Kv,
  prefix: Deno.KvKey,
  opts: { cursor?: string; pageSize?: number } = {},
): AsyncGenerator<{ entries: Deno.KvEntry<unknown>[]; cursor: string }> {
  const pageSize = opts.pageSize ?? DEFAULT_PAGE_SIZE;
  let cursor = opts.cursor;
  while (true) {
    const iter = kv.list({ prefix }, { limit: pageSize, batchSize: pageSize, cursor });
    const entries: Deno.KvEntry<unknown>[] = [];
    for await (const entry of iter) entries.push(entry);
    if (entries.length === 0) return;
    cursor = iter.cursor;
    yield { entries, cursor };
    if (entries.length < pageSize) return;
  }
}

/** Number of entries under `prefixes` (reads them all: Deno KV has no count). */
export async function countEntries(kv: Deno.Kv, prefixes: Deno.KvKey[]): Promise<number> {
  let count = 0;
  for (const prefix of prefixes) {
    for await (const page of readPages(kv, prefix)) count += page.entries.length;
  }
  return count;
}

/** Size of a key as stored, close to Deno's own accounting. */
export function keySize(key: Deno.KvKey): number {
  let n = 0;
  for (const part of key) {
    if (typeof part === "string") n += Buffer.byteLength(part) + 2;
    else if (part instanceof Uint8Array) n += part.byteLength + 2;
    else n += 10;
  }
  return n;
}

/** Size of a value as stored: raw bytes, 8 for KvU64, V8 serialization otherwise. */
export function valueSize(value: unknown): number {
  if (value instanceof Uint8Array) return value.byteLength;
  if (value instanceof Deno.KvU64) return 8;
  return serialize(value).byteLength;
}

// ---------------------------------------------------------------------------
// Writing

/** Result of {@linkcode writeEntries}. */
export interface WriteResult {
  written: number;
  /** Existing keys whose value already equals the source. */
  identical: number;
  /** Existing keys left as they are with a different value (no --overwrite). */
  skipped: number;
  bytes: number;
}

/** Options for {@linkcode writeEntries}. */
export interface WriteOptions {
  overwrite?: boolean;
  dryRun?: boolean;
  /** Entries are sorted by key (a list page): existence is checked with one range read. */
  sorted?: boolean;
  /** Attempts per commit on transient failures. */
  attempts?: number;
}

/** Keys of `entries` that exist in `kv`, with their current values' encoding. */
async function existing(
  kv: Deno.Kv,
  entries: { key: Deno.KvKey }[],
  sorted: boolean,
): Promise<Map<string, string>> {
  const found = new Map<string, string>();
  if (entries.length === 0) return found;
  const add = (e: Deno.KvEntryMaybe<unknown>) => {
    if (e.versionstamp !== null) found.set(keyId(e.key), JSON.stringify(encodeValue(e.value)));
  };
  if (sorted) {
    const first = entries[0].key;
    const last = entries[entries.length - 1].key;
    const wanted = new Set(entries.map((e) => keyId(e.key)));
    const range = async () => {
      if (entries.length < 2) return;
      for await (const e of kv.list({ start: first, end: last }, { batchSize: 1000 })) {
        if (wanted.has(keyId(e.key))) add(e);
      }
    };
    // The range end is exclusive: the last key is read on its own, at the same time.
    const [, tail] = await Promise.all([range(), kv.get(last)]);
    add(tail);
    return found;
  }
  const chunks: Deno.KvKey[][] = [];
  for (let i = 0; i < entries.length; i += MAX_GET_MANY) {
    chunks.push(entries.slice(i, i + MAX_GET_MANY).map((e) => e.key));
  }
  const results = await Promise.all(chunks.map((keys) => kv.getMany(keys)));
  for (const list of results) for (const e of list) add(e);
  return found;
}

// Deno's client checks the per-commit limits itself: "Total mutation size too
// large", "Total key size too large", "Too many mutations". A smaller batch fixes these.
const BATCH_TOO_BIG =
  /^(Total mutation size too large|Total key size too large|Too many mutations)/;
// Errors no retry can fix: a single oversized key or value, bad data, refused access.
const PERMANENT = /too large|invalid|unsupported|unauthori[sz]ed|forbidden|\b40[13]\b/i;

async function commitBatch(
  kv: Deno.Kv,
  batch: { key: Deno.KvKey; value: unknown }[],
  attempts: number,
): Promise<void> {
  for (let attempt = 1;; attempt++) {
    const op = kv.atomic();
    for (const e of batch) op.set(e.key, e.value);
    try {
      const res = await op.commit();
      if (!res.ok) throw new Error("atomic commit was rejected");
      return;
    } catch (err) {
      const text = oneLine(err);
      if (BATCH_TOO_BIG.test(text) && batch.length > 1) {
        // Our size estimate was short for this batch: split it.
        const half = Math.ceil(batch.length / 2);
        await commitBatch(kv, batch.slice(0, half), attempts);
        await commitBatch(kv, batch.slice(half), attempts);
        return;
      }
      if (PERMANENT.test(text) || attempt >= attempts) throw err;
      // The client already retries 5xx; this covers dropped connections and the like.
      await new Promise((r) => setTimeout(r, 200 * 2 ** attempt));
    }
  }
}

/**
 * Writes `entries` to `kv` in atomic batches within the commit limits. Keys
 * that already exist are kept unless `overwrite`; nothing is written on `dryRun`.
 */
export async function writeEntries(
  kv: Deno.Kv,
  entries: { key: Deno.KvKey; value: unknown }[],
  opts: WriteOptions = {},
): Promise<WriteResult> {
  const result: WriteResult = { written: 0, identical: 0, skipped: 0, bytes: 0 };
  let todo = entries;
  if (!opts.overwrite) {
    const found = await existing(kv, entries, opts.sorted ?? false);
    todo = [];
    for (const e of entries) {
      const current = found.get(keyId(e.key));
      if (current === undefined) todo.push(e);
      else if (current === JSON.stringify(encodeValue(e.value))) result.identical++;
      else result.skipped++;
    }
  }
  let batch: { key: Deno.KvKey; value: unknown }[] = [];
  let bytes = 0;
  let keyBytes = 0;
  const flush = async () => {
    if (batch.length === 0) return;
    if (!opts.dryRun) await commitBatch(kv, batch, opts.attempts ?? 5);
    result.written += batch.length;
    result.bytes += bytes;
    batch = [];
    bytes = 0;
    keyBytes = 0;
  };
  for (const e of todo) {
    const k = keySize(e.key);
    const size = k + valueSize(e.value);
    if (
      batch.length + 1 > MAX_MUTATIONS || bytes + size > MAX_COMMIT_BYTES ||
      keyBytes + k > MAX_COMMIT_KEY_BYTES
    ) {
      await flush();
    }
    batch.push(e);
    bytes += size;
    keyBytes += k;
  }
  await flush();
  return result;
}

// ---------------------------------------------------------------------------
// Verifying

/** Count and SHA-256 of every entry under the prefixes, in key order. */
export interface Digest {
  count: number;
  sha256: string;
}

/** Computes a {@linkcode Digest} of `kv` under `prefixes`. */
export async function digest(
  kv: Deno.Kv,
  prefixes: Deno.KvKey[],
  pageSize = DEFAULT_PAGE_SIZE,
): Promise<Digest> {
  const hash = createHash("sha256");
  let count = 0;
  for (const prefix of prefixes) {
    for await (const page of readPages(kv, prefix, { pageSize })) {
      for (const e of page.entries) {
        hash.update(entryToLine(e.key, e.value));
        hash.update("\n");
        count++;
      }
    }
  }
  return { count, sha256: hash.digest("hex") };
}

// ---------------------------------------------------------------------------
// Progress

/** Prints progress: a live line on a terminal, plain periodic lines otherwise. */
export class Progress {
  #start = performance.now();
  #last = 0;
  #tty: boolean;
  constructor(
    readonly label: string,
    readonly intervalMs: number,
    readonly total?: number,
  ) {
    this.#tty = Deno.stderr.isTerminal();
  }
  /** Reports `entries` and `bytes` done so far; `force` prints regardless of the interval. */
  update(entries: number, bytes: number, force = false): void {
    const now = performance.now();
    if (!force && now - this.#last < (this.#tty ? 200 : this.intervalMs)) return;
    this.#last = now;
    const secs = (now - this.#start) / 1000;
    const rate = secs > 0 ? entries / secs : 0;
    let line = `${this.label}: ${entries} entries, ${formatBytes(bytes)}, ${rate.toFixed(0)}/s`;
    if (this.total !== undefined && rate > 0) {
      const eta = Math.max(0, (this.total - entries) / rate);
      line += `, ${entries}/${this.total}, ETA ${eta.toFixed(0)} s`;
    }
    const text = this.#tty ? `\r\x1b[2K${line}` : `${line}\n`;
    Deno.stderr.writeSync(new TextEncoder().encode(text));
  }
  /** Ends a live line. */
  done(): void {
    if (this.#tty) Deno.stderr.writeSync(new TextEncoder().encode("\n"));
  }
}

/** 1536 -> "1.5 KiB". */
export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

/** Prints a one-line error and exits non-zero. */
export function fail(program: string, err: unknown, code = 1): never {
  console.error(`${program}: error: ${oneLine(err)}`);
  Deno.exit(code);
}
