/**
 * The one place that reads `S3_ADDRESSING_STYLE`: whether S3 requests name the
 * bucket in the path (`https://host/bucket/key`) or in the host name
 * (`https://bucket.host/key`). The start-up step hands it to Litestream (as
 * `S3_FORCE_PATH_STYLE`, expanded by litestream.yml); the backup check and the
 * replica lease give it to `@aws-sdk/client-s3`.
 */

/** The two ways an S3 client can address a bucket. */
export type AddressingStyle = "path" | "virtual";

/** The variable a deployment sets; anything but these two values is refused. */
export const ADDRESSING_STYLE_VARIABLE = "S3_ADDRESSING_STYLE";

/**
 * Virtual-hosted by default: Tigris serves buckets created after 2025-02-19
 * only at `https://<bucket>.fly.storage.tigris.dev`, and older buckets answer
 * both styles (tigrisdata.com/blog/virtual-hosted-urls), so this default works
 * for every bucket `fly storage create` makes. Emulators on 127.0.0.1 and
 * MinIO without a wildcard DNS name need `path`.
 */
export const DEFAULT_ADDRESSING_STYLE: AddressingStyle = "virtual";

/**
 * Reads `S3_ADDRESSING_STYLE` (`path` or `virtual`, default virtual).
 *
 * @example
 * ```ts
 * import { s3AddressingStyle } from "./s3_addressing.ts";
 * if (s3AddressingStyle({ S3_ADDRESSING_STYLE: "path" }) !== "path") throw new Error();
 * if (s3AddressingStyle({}) !== "virtual") throw new Error();
 * ```
 */
export function s3AddressingStyle(env: Record<string, string | undefined>): AddressingStyle {
  const raw = (env[ADDRESSING_STYLE_VARIABLE] ?? "").trim().toLowerCase();
  if (raw === "") return DEFAULT_ADDRESSING_STYLE;
  if (raw === "path" || raw === "virtual") return raw;
  throw new RangeError(
    `"${ADDRESSING_STYLE_VARIABLE}" must be "path" or "virtual": got ${
      JSON.stringify(env[ADDRESSING_STYLE_VARIABLE])
    }`,
  );
}

/**
 * The environment litestream.yml expands for the style: Litestream 0.3.13
 * takes `force-path-style` as a boolean and, left empty, forces path style for
 * any explicit endpoint, so the start-up step always sets it.
 */
export function litestreamAddressingEnv(style: AddressingStyle): Record<string, string> {
  return { S3_FORCE_PATH_STYLE: style === "path" ? "true" : "false" };
}
