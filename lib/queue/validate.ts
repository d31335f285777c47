/**
 * Option checks shared by the faces: errors name the option and the value given.
 *
 * @module
 */
import { MAX_KEY_BYTES, MAX_NAME_BYTES } from "./limits.ts";
import { keyBytes, textBytes } from "./envelope.ts";

export function describe(value: unknown): string {
  try {
    return typeof value === "string" ? JSON.stringify(value) : String(value);
  } catch {
    return typeof value;
  }
}

export function checkInteger(name: string, value: unknown, min: number, max: number): number {
  if (typeof value !== "number" || !Number.isInteger(value)) {
    throw new TypeError(`"${name}" must be an integer: got ${describe(value)}`);
  }
  if (value < min) throw new RangeError(`"${name}" must be >= ${min}: got ${value}`);
  if (value > max) throw new RangeError(`"${name}" must be <= ${max}: got ${value}`);
  return value;
}

export function checkKey(name: string, key: unknown): Deno.KvKey {
  if (!Array.isArray(key)) {
    throw new TypeError(`"${name}" must be a KV key array: got ${describe(key)}`);
  }
  for (const part of key) {
    const t = typeof part;
    if (
      t !== "string" && t !== "number" && t !== "bigint" && t !== "boolean" &&
      !(part instanceof Uint8Array)
    ) {
      throw new TypeError(`"${name}" has a part that is not a KV key part: got ${describe(part)}`);
    }
  }
  const bytes = keyBytes(key as Deno.KvKey);
  if (bytes > MAX_KEY_BYTES) {
    throw new RangeError(`"${name}" must be at most ${MAX_KEY_BYTES} bytes: got about ${bytes}`);
  }
  return key as Deno.KvKey;
}

export function checkName(name: string, value: unknown): string | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== "string" || value.length === 0) {
    throw new TypeError(`"${name}" must be a non-empty string: got ${describe(value)}`);
  }
  if (textBytes(value) > MAX_NAME_BYTES) {
    throw new RangeError(
      `"${name}" must be at most ${MAX_NAME_BYTES} bytes: got ${value.length} characters`,
    );
  }
  return value;
}

export function errorText(err: unknown): string {
  if (err instanceof Error) return `${err.name}: ${err.message}`;
  return describe(err);
}
