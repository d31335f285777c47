/**
 * Installs what the tests run for real, once per machine: Debian packages
 * (supervisor, buildah, debootstrap, chromium), the official denokv from
 * crates.io and Supercronic from the Go module proxy, at the Dockerfile's pins.
 * Already-installed parts are reused, so a second run takes seconds.
 */
import { fileURLToPath } from "node:url";
import { join } from "node:path";
import { createHash } from "node:crypto";
import { cacheDir, isFile, loadPins, type Pins, type ToolPaths, toolPaths } from "./tools.ts";

/** Debian packages the test suite needs, by the command each provides. */
export const DEBIAN_PACKAGES: Record<string, string> = {
  supervisord: "supervisor",
  buildah: "buildah",
  debootstrap: "debootstrap",
  chromium: "chromium",
};

async function run(cmd: string, args: string[], env: Record<string, string> = {}): Promise<void> {
  const status = await new Deno.Command(cmd, {
    args,
    env,
    stdout: "inherit",
    stderr: "inherit",
    stdin: "null",
  }).spawn().status;
  if (!status.success) throw new Error(`${cmd} ${args.join(" ")} exited ${status.code}`);
}

async function onPath(command: string): Promise<boolean> {
  const path = Deno.env.get("PATH") ?? "";
  for (const dir of path.split(":")) {
    if (dir && await isFile(join(dir, command))) return true;
  }
  return false;
}

/** sha256 of a file, hex. */
export async function sha256File(path: string): Promise<string> {
  const hash = createHash("sha256");
  using file = await Deno.open(path);
  for await (const chunk of file.readable) hash.update(chunk);
  return hash.digest("hex");
}

async function installDebian(): Promise<void> {
  const missing: string[] = [];
  for (const [command, pkg] of Object.entries(DEBIAN_PACKAGES)) {
    if (!await onPath(command)) missing.push(pkg);
  }
  if (missing.length === 0) return;
  if (Deno.uid() !== 0) {
    throw new Error(`missing Debian packages ${missing.join(", ")}: install them as root`);
  }
  console.log(`install: apt-get install ${missing.join(" ")}`);
  const env = { DEBIAN_FRONTEND: "noninteractive" };
  await run("apt-get", ["update", "-qq"], env);
  await run("apt-get", ["install", "-y", "-qq", "--no-install-recommends", ...missing], env);
}

async function installDenokv(pins: Pins, paths: ToolPaths): Promise<void> {
  const binary = join(paths.denokvBinDir, "denokv");
  if (await isFile(binary) && await isFile(paths.denokvSha256File)) return;
  console.log(`install: cargo install denokv ${pins.denokv} into ${paths.denokvRoot} (minutes)`);
  await run("cargo", [
    "install",
    "denokv",
    "--version",
    pins.denokv,
    "--locked",
    "--root",
    paths.denokvRoot,
  ]);
  await Deno.writeTextFile(paths.denokvSha256File, `${await sha256File(binary)}  denokv\n`);
}

async function installSupercronic(pins: Pins, paths: ToolPaths): Promise<void> {
  if (await isFile(join(paths.supercronicBinDir, "supercronic"))) return;
  console.log(`install: go install supercronic ${pins.supercronic}`);
  await Deno.mkdir(paths.supercronicBinDir, { recursive: true });
  await run("go", ["install", `github.com/aptible/supercronic@${pins.supercronic}`], {
    GOBIN: paths.supercronicBinDir,
  });
}

if (import.meta.main) {
  const root = fileURLToPath(new URL("../..", import.meta.url));
  const pins = await loadPins(root);
  const paths = toolPaths(pins, cacheDir());
  const started = performance.now();
  await installDebian();
  await installDenokv(pins, paths);
  await installSupercronic(pins, paths);
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  console.log(
    `install: denokv ${pins.denokv}, supercronic ${pins.supercronic} ready (${seconds} s)`,
  );
}
