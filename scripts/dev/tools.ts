/**
 * Where the real third-party binaries live on a developer or CI machine: the
 * official denokv (built by cargo) and Supercronic (built by go), each at the
 * version the Dockerfile pins, in a machine-level cache keyed by version so a
 * fresh clone in another folder reuses them.
 */
import { join } from "node:path";
import { homedir } from "node:os";

/** The versions the image ships, read from the Dockerfile's ARG lines. */
export interface Pins {
  denokv: string;
  supercronic: string;
}

/** Reads `ARG NAME=value` defaults from a Dockerfile's text. */
export function dockerfileArgs(text: string): Record<string, string> {
  const args: Record<string, string> = {};
  for (const match of text.matchAll(/^ARG\s+([A-Z0-9_]+)=(\S+)\s*$/gm)) {
    args[match[1]] ??= match[2];
  }
  return args;
}

/** The pinned versions; the Dockerfile is the one place they are written. */
export function pinsFrom(dockerfile: string): Pins {
  const args = dockerfileArgs(dockerfile);
  const denokv = args.DENOKV_VERSION;
  const supercronic = args.SUPERCRONIC_VERSION;
  if (!denokv || !supercronic) {
    throw new Error(
      `Dockerfile must pin ARG DENOKV_VERSION and ARG SUPERCRONIC_VERSION: got ${
        JSON.stringify({ denokv, supercronic })
      }`,
    );
  }
  return { denokv, supercronic };
}

/** Reads the pins from the repository's Dockerfile. */
export async function loadPins(root: string): Promise<Pins> {
  return pinsFrom(await Deno.readTextFile(join(root, "Dockerfile")));
}

/** The machine-level cache (`$DENOKV_ON_FLY_CACHE`, else `~/.cache/denokv-on-fly`). */
export function cacheDir(env: Record<string, string | undefined> = Deno.env.toObject()): string {
  return env.DENOKV_ON_FLY_CACHE ?? join(env.HOME ?? homedir(), ".cache", "denokv-on-fly");
}

/** Paths of one version of each tool inside the cache. */
export interface ToolPaths {
  /** `cargo install --root` of the pinned denokv. */
  denokvRoot: string;
  /** Folder holding the `denokv` binary (goes first on PATH). */
  denokvBinDir: string;
  /** The sha256 recorded when this binary was installed. */
  denokvSha256File: string;
  /** Folder holding the `supercronic` binary (goes first on PATH). */
  supercronicBinDir: string;
}

/** Where the pinned versions are (or will be) installed. */
export function toolPaths(pins: Pins, cache: string = cacheDir()): ToolPaths {
  const denokvRoot = join(cache, `denokv-${pins.denokv}`);
  return {
    denokvRoot,
    denokvBinDir: join(denokvRoot, "bin"),
    denokvSha256File: join(denokvRoot, "denokv.sha256"),
    supercronicBinDir: join(cache, `supercronic-${pins.supercronic}`),
  };
}

/** True when `path` is an existing file. */
export async function isFile(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch {
    return false;
  }
}
