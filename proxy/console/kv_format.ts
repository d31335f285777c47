/**
 * How the console shows and addresses KV data: keys encoded for URLs and
 * forms without losing a part's type, key prefixes parsed from what an
 * operator types, and values printed faithfully (Deno's own inspector, so a
 * bigint, a `Deno.KvU64`, a `Uint8Array`, a `Date`, a `Map` or a `Set` each
 * reads as what it is).
 */

type Tagged = ["s", string] | ["n", string] | ["b", string] | ["t", boolean] | ["u", number[]];

function tag(part: Deno.KvKeyPart): Tagged {
  if (typeof part === "string") return ["s", part];
  if (typeof part === "number") return ["n", String(part)];
  if (typeof part === "bigint") return ["b", part.toString()];
  if (typeof part === "boolean") return ["t", part];
  if (part instanceof Uint8Array) return ["u", [...part]];
  throw new TypeError(`not a KV key part: ${String(part)}`);
}

function untag(t: Tagged): Deno.KvKeyPart {
  switch (t[0]) {
    case "s":
      return String(t[1]);
    case "n":
      return Number(t[1]);
    case "b":
      return BigInt(t[1]);
    case "t":
      return t[1] === true;
    case "u":
      return new Uint8Array(t[1]);
  }
  throw new TypeError(`unknown key part tag: ${JSON.stringify(t)}`);
}

/** A key as one URL-safe string that {@linkcode decodeKey} turns back into the same key. */
export function encodeKey(key: Deno.KvKey): string {
  const bytes = new TextEncoder().encode(JSON.stringify(key.map(tag)));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_")
    .replace(/=+$/, "");
}

/** The key encoded by {@linkcode encodeKey}; throws a TypeError on anything else. */
export function decodeKey(s: string): Deno.KvKey {
  try {
    const b64 = s.replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const parts = JSON.parse(new TextDecoder().decode(bytes));
    if (!Array.isArray(parts)) throw new Error("not a list");
    return parts.map(untag);
  } catch (err) {
    throw new TypeError(`not an encoded key: ${s} (${err instanceof Error ? err.message : err})`);
  }
}

/**
 * Parses a key prefix as typed in the browser: comma-separated parts, each a
 * double-quoted string, a number, a bigint (`12n`) or `true`/`false`, with
 * optional surrounding brackets. `""` or `[]` is the empty prefix.
 *
 * @example
 * ```ts
 * import { parseKeyPrefix } from "./kv_format.ts";
 * const key = parseKeyPrefix(`["users", 42, 7n, true]`);
 * if (key.length !== 4 || key[2] !== 7n) throw new Error(String(key));
 * ```
 */
export function parseKeyPrefix(text: string): Deno.KvKey {
  let rest = text.trim();
  if (rest.startsWith("[") && rest.endsWith("]")) rest = rest.slice(1, -1).trim();
  const parts: Deno.KvKeyPart[] = [];
  const token =
    /^\s*(?:("(?:[^"\\]|\\.)*")|(-?\d+)n|(-?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)|(true|false))\s*(?:,|$)/i;
  while (rest.length > 0) {
    const m = token.exec(rest);
    if (!m) {
      throw new TypeError(
        `a key prefix is a list of "strings", numbers, bigints (12n) or booleans: got ${text}`,
      );
    }
    if (m[1] !== undefined) parts.push(JSON.parse(m[1]));
    else if (m[2] !== undefined) parts.push(BigInt(m[2]));
    else if (m[3] !== undefined) parts.push(Number(m[3]));
    else parts.push(m[4].toLowerCase() === "true");
    rest = rest.slice(m[0].length);
  }
  return parts;
}

const INSPECT: Deno.InspectOptions = {
  colors: false,
  depth: 100,
  iterableLimit: 10_000,
  strAbbreviateSize: 1_000_000,
  breakLength: 80,
  sorted: false,
  trailingComma: false,
};

/** A key as the console prints it, e.g. `["users", 42, 7n]`. */
export function formatKey(key: Deno.KvKey): string {
  return `[${
    key.map((p) => (typeof p === "string" ? JSON.stringify(p) : formatValue(p))).join(", ")
  }]`;
}

/** The kind of a value, as a column of the browser. */
export function valueType(value: unknown): string {
  if (value === null) return "null";
  if (value instanceof Deno.KvU64) return "Deno.KvU64";
  if (value instanceof Uint8Array) return "Uint8Array";
  if (value instanceof Date) return "Date";
  if (value instanceof Map) return "Map";
  if (value instanceof Set) return "Set";
  if (Array.isArray(value)) return "Array";
  if (value instanceof RegExp) return "RegExp";
  if (value instanceof Error) return "Error";
  return typeof value;
}

/** A value printed faithfully; strings are quoted so `"42"` and `42` differ. */
export function formatValue(value: unknown): string {
  if (typeof value === "string") return JSON.stringify(value);
  return Deno.inspect(value, INSPECT);
}
