/**
 * Boots the built image as a machine would: `buildah run` (chroot isolation,
 * host network) of the image's own entry point, a host folder as /data, and the
 * process tree it starts, for health waits, memory figures and SIGKILL.
 */
import { existsSync } from "node:fs";
import { Running, waitFor } from "../_helpers/processes.ts";
import { buildah, BUILDAH_GLOBAL } from "./buildah.ts";

/** One boot of the image. */
export interface Boot {
  container: string;
  runner: Running;
  url: string;
  /** performance.now() when `buildah run` was spawned. */
  startedAt: number;
  /** ms from `buildah run` to the first 200 from /healthz. */
  readyMs: number;
  /** What it was booted with: {@linkcode execInBoot} repeats its volumes and environment. */
  opts: BootOptions;
}

/** Options for {@linkcode bootImage}. */
export interface BootOptions {
  image: string;
  dataDir: string;
  port: number;
  env: Record<string, string>;
  /** Extra bind mounts, `host:container[:opts]`. */
  volumes?: string[];
  timeoutMs?: number;
}

/** The image's ENTRYPOINT followed by its CMD, as a runtime would start it. */
export async function entryPoint(image: string): Promise<string[]> {
  const info = JSON.parse((await buildah(["inspect", "--type", "image", image])).stdout);
  const config = info.OCIv1?.config ?? {};
  const argv = [...(config.Entrypoint ?? []), ...(config.Cmd ?? [])];
  if (argv.length === 0) throw new Error(`${image} has neither ENTRYPOINT nor CMD`);
  return argv;
}

async function healthz(url: string): Promise<number> {
  const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(5_000) });
  await res.body?.cancel();
  return res.status;
}

/**
 * `buildah run` of `argv` in `container`. Each run gets only the image's own ENV,
 * so the machine's environment (Fly's secrets) and its /data volume are given each time.
 */
function runArgs(container: string, opts: BootOptions, argv: string[]): string[] {
  return [
    "run",
    "--isolation",
    "chroot",
    "--network",
    "host",
    "-v",
    `${opts.dataDir}:/data`,
    ...(opts.volumes ?? []).flatMap((v) => ["-v", v]),
    ...Object.entries(opts.env).flatMap(([k, v]) => ["--env", `${k}=${v}`]),
    container,
    "--",
    ...argv,
  ];
}

/**
 * Runs a command inside a booted machine, beside its running supervisord, as
 * `fly ssh console -C` would: same root file system, /data and environment.
 */
export async function execInBoot(
  boot: Boot,
  argv: string[],
  opts: { timeoutMs?: number } = {},
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command("buildah", {
    args: [...BUILDAH_GLOBAL, ...runArgs(boot.container, boot.opts, argv)],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(opts.timeoutMs ?? 180_000),
  }).output();
  const decoder = new TextDecoder();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** Makes a fresh container from the image (a new machine's root file system) and boots it. */
export async function bootImage(opts: BootOptions): Promise<Boot> {
  const container = (await buildah(["from", "--pull-never", opts.image])).stdout.trim();
  const argv = await entryPoint(opts.image);
  const args = runArgs(container, opts, argv);
  const startedAt = performance.now();
  const child = new Deno.Command("buildah", {
    args: [...BUILDAH_GLOBAL, ...args],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const runner = new Running("image", child, opts.port);
  const url = `http://127.0.0.1:${opts.port}`;
  const boot: Boot = { container, runner, url, startedAt, readyMs: 0, opts };
  try {
    await waitFor("the image to answer /healthz with 200", async () => {
      if (runner.exited) throw new Error(`buildah run exited ${runner.exited.code}`);
      return (await healthz(url)) === 200;
    }, { timeoutMs: opts.timeoutMs ?? 120_000, intervalMs: 100 });
  } catch (err) {
    await stopBoot(boot);
    throw new Error(`${(err as Error).message}\n--- image output ---\n${runner.output}`);
  }
  boot.readyMs = performance.now() - startedAt;
  return boot;
}

/** Every process below `pid` (from /proc), parents before children. */
export function descendants(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry.name)]);
    } catch { /* exited meanwhile */ }
  }
  const out: number[] = [];
  const walk = (p: number) => {
    for (const c of children.get(p) ?? []) {
      out.push(c);
      walk(c);
    }
  };
  walk(pid);
  return out;
}

/** A process's command line, or "" once it is gone. */
export function cmdline(pid: number): string {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/cmdline`).replaceAll("\0", " ").trim();
  } catch {
    return "";
  }
}

/** Resident and proportional set size of a process, KiB. */
export function memoryKiB(pid: number): { rss: number; pss: number } {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const rollup = Deno.readTextFileSync(`/proc/${pid}/smaps_rollup`);
  return {
    rss: Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0),
    pss: Number(/^Pss:\s+(\d+)/m.exec(rollup)?.[1] ?? 0),
  };
}

/** The image's own processes: below `buildah run`, minus buildah's chroot helper. */
export function imageProcesses(boot: Boot): { pid: number; cmd: string }[] {
  return descendants(boot.runner.child.pid)
    .map((pid) => ({ pid, cmd: cmdline(pid) }))
    .filter((p) => p.cmd !== "" && !p.cmd.startsWith("buildah"));
}

/** SIGKILLs `buildah run` and every process of the image at once, as a machine crash would. */
export async function killBoot(boot: Boot): Promise<void> {
  const all = [boot.runner.child.pid, ...descendants(boot.runner.child.pid)];
  for (const pid of all) {
    try {
      Deno.kill(pid, "SIGKILL");
    } catch { /* already gone */ }
  }
  await boot.runner.done;
  await waitFor("every process of the image to be gone", () => {
    return all.every((p) => !existsSync(`/proc/${p}`));
  }, { timeoutMs: 30_000 });
}

/** Kills whatever is left of a boot and removes its container. */
export async function stopBoot(boot: Boot): Promise<void> {
  await killBoot(boot).catch(() => {});
  await buildah(["rm", boot.container], { allowFail: true });
}
