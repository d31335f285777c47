/**
 * buildah as the image test calls it: vfs storage kept in a machine-level cache
 * (base images are slow to make and outlive the checkout), and a runner that
 * returns output or fails with it.
 */
import { join } from "node:path";
import { cacheDir } from "../../scripts/dev/tools.ts";

/** The machine-level cache shared with the installer (denokv, Supercronic, images). */
export const CACHE_DIR: string = cacheDir();

/** buildah's own storage: vfs works on any file system and needs no kernel overlay support. */
export const BUILDAH_ROOT: string = join(CACHE_DIR, "buildah");

/** Global options for every buildah call. */
export const BUILDAH_GLOBAL: string[] = [
  "--root",
  join(BUILDAH_ROOT, "storage"),
  "--runroot",
  join(BUILDAH_ROOT, "run"),
  "--storage-driver",
  "vfs",
];

/** What a finished command printed. */
export interface Ran {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion; throws with its output unless it exits 0 (or `allowFail`). */
export async function run(
  cmd: string,
  args: string[],
  opts: { allowFail?: boolean; env?: Record<string, string>; cwd?: string } = {},
): Promise<Ran> {
  const out = await new Deno.Command(cmd, {
    args,
    env: opts.env,
    cwd: opts.cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  const ran = {
    code: out.code,
    stdout: decoder.decode(out.stdout),
    stderr: decoder.decode(out.stderr),
  };
  if (ran.code !== 0 && !opts.allowFail) {
    throw new Error(
      `${cmd} ${args.join(" ")} exited ${ran.code}\n${ran.stdout.slice(-4000)}\n${
        ran.stderr.slice(-4000)
      }`,
    );
  }
  return ran;
}

/** `buildah <global options> ...args`. */
export function buildah(args: string[], opts: { allowFail?: boolean } = {}): Promise<Ran> {
  return run("buildah", [...BUILDAH_GLOBAL, ...args], opts);
}

/** Whether an image of that name is in the store. */
export async function imageExists(name: string): Promise<boolean> {
  const res = await buildah(["inspect", "--type", "image", name], { allowFail: true });
  return res.code === 0;
}

/** A label of a stored image, or undefined. */
export async function imageLabel(name: string, label: string): Promise<string | undefined> {
  const res = await buildah(["inspect", "--type", "image", name], { allowFail: true });
  if (res.code !== 0) return undefined;
  const info = JSON.parse(res.stdout);
  return info?.OCIv1?.config?.Labels?.[label];
}

/** The sha256 of a file, hex. */
export async function sha256File(path: string): Promise<string> {
  return (await run("sha256sum", [path])).stdout.split(" ")[0];
}
