/**
 * `npm start`: runs the programs of supervisord.conf (the start-up/restore step
 * with Litestream and denokv, and the proxy) on localhost with embedded
 * defaults: data under `./.data`, a generated token, and a local-folder
 * Litestream replica when no bucket is configured. No supervisord needed;
 * Ctrl-C stops everything (Litestream makes its final sync first).
 */
import { fileURLToPath } from "node:url";
import { join } from "node:path";
import { cacheDir, isFile, loadPins, toolPaths } from "./tools.ts";

/** The local stack's settings, from the environment with embedded defaults. */
export interface DevConfig {
  root: string;
  dataDir: string;
  port: number;
  denokvPort: number;
  token: string;
  tokenGenerated: boolean;
  /** Local Litestream replica folder, or null when a bucket is configured. */
  localReplicaDir: string | null;
}

/** Reads the environment once; generates a token (kept in `.data/token`) when none is set. */
export async function loadConfig(env: Record<string, string | undefined>): Promise<DevConfig> {
  const root = fileURLToPath(new URL("../..", import.meta.url));
  const dataDir = env.DATA_DIR ?? join(root, ".data");
  await Deno.mkdir(dataDir, { recursive: true });
  let token = env.DENO_KV_ACCESS_TOKEN ?? "";
  let tokenGenerated = false;
  const tokenFile = join(dataDir, "token");
  if (!token) {
    token = await Deno.readTextFile(tokenFile).then((t) => t.trim()).catch(() => "");
    if (!token) {
      token = crypto.randomUUID().replaceAll("-", "");
      await Deno.writeTextFile(tokenFile, token + "\n", { mode: 0o600 });
      tokenGenerated = true;
    }
  }
  if (token.length < 12) {
    throw new Error(`DENO_KV_ACCESS_TOKEN must be at least 12 characters: got ${token.length}`);
  }
  const port = Number(env.PORT ?? "4512");
  const denokvPort = Number(env.DENOKV_PORT ?? "4513");
  for (const [name, value] of [["PORT", port], ["DENOKV_PORT", denokvPort]] as const) {
    if (!Number.isInteger(value) || value <= 0 || value > 65535) {
      throw new Error(`${name} must be a port number: got ${value}`);
    }
  }
  const localReplicaDir = env.BUCKET_NAME
    ? null
    : (env.LOCAL_REPLICA_DIR ?? join(dataDir, "replica"));
  return { root, dataDir, port, denokvPort, token, tokenGenerated, localReplicaDir };
}

/** One `[program:x]` of supervisord.conf, with `%(ENV_X)s` expanded. */
export interface Program {
  name: string;
  command: string;
  directory: string | undefined;
  autostart: boolean;
}

/** The `[program:x]` sections of a supervisord.conf: name to raw `key = value` settings. */
export function programSections(conf: string): Map<string, Record<string, string>> {
  const sections = new Map<string, Record<string, string>>();
  let current: Record<string, string> | null = null;
  for (const line of conf.split("\n")) {
    const section = /^\[(?:program:(\w+)|.*)\]/.exec(line);
    if (section) {
      current = section[1] ? {} : null;
      if (section[1]) sections.set(section[1], current!);
      continue;
    }
    const kv = /^(\w+)\s*=\s*(.*)$/.exec(line);
    if (kv && current) current[kv[1]] = kv[2].trim();
  }
  return sections;
}

/** Reads the programs of a supervisord.conf, expanding `%(ENV_X)s` from `env`. */
export function parsePrograms(conf: string, env: Record<string, string>): Program[] {
  const expand = (value: string) =>
    value.replace(/%\(ENV_(\w+)\)s/g, (_, name: string) => {
      if (!(name in env)) throw new Error(`supervisord.conf needs ${name} in the environment`);
      return env[name];
    });
  return [...programSections(conf)]
    .filter(([, settings]) => settings.command)
    .map(([name, settings]) => ({
      name,
      command: expand(settings.command),
      directory: settings.directory ? expand(settings.directory) : undefined,
      autostart: expand(settings.autostart ?? "true") === "true",
    }));
}

async function onPath(name: string, path: string): Promise<boolean> {
  for (const dir of path.split(":")) {
    try {
      const info = await Deno.stat(join(dir, name));
      if (info.isFile) return true;
    } catch { /* keep looking */ }
  }
  return false;
}

/** npm's Litestream launcher does not forward signals; its binary does. */
function litestreamBinDir(root: string): string {
  const arch = Deno.build.arch === "aarch64" ? "arm64" : "x64";
  return join(root, `node_modules/@flydotio/litestream-${Deno.build.os}-${arch}`);
}

if (import.meta.main) {
  const config = await loadConfig(Deno.env.toObject());
  // The pinned binaries `deno task setup` built come first, then the caller's PATH.
  const tools = toolPaths(await loadPins(config.root), cacheDir());
  const cached = [
    ...(await isFile(join(tools.denokvBinDir, "denokv")) ? [tools.denokvBinDir] : []),
    ...(await isFile(join(tools.supercronicBinDir, "supercronic"))
      ? [tools.supercronicBinDir]
      : []),
  ];
  const basePath = [...cached, Deno.env.get("PATH") ?? ""].join(":");
  const realDenokv = await onPath("denokv", basePath);
  const supercronic = await onPath("supercronic", basePath);
  const path = [
    ...(realDenokv ? [] : [join(config.root, "tests/bin")]),
    litestreamBinDir(config.root),
    join(config.root, "node_modules/.bin"),
    basePath,
  ].join(":");
  const env: Record<string, string> = {
    ...Deno.env.toObject(),
    PATH: path,
    DENO_BIN: Deno.execPath(),
    DENO_KV_ACCESS_TOKEN: config.token,
    APP_DIR: config.root.replace(/\/$/, ""),
    DATA_DIR: config.dataDir,
    PORT: String(config.port),
    DENOKV_URL: `http://127.0.0.1:${config.denokvPort}`,
  };
  if (config.localReplicaDir) env.LOCAL_REPLICA_DIR = config.localReplicaDir;
  const conf = await Deno.readTextFile(join(config.root, "supervisord.conf"));
  // Supercronic always starts under supervisord; a laptop without it runs the rest.
  const programs = parsePrograms(conf, env).filter((p) =>
    p.autostart && (p.name !== "supercronic" || supercronic)
  );
  const children = programs.map((p) => ({
    program: p,
    child: new Deno.Command("bash", {
      args: ["-c", `exec ${p.command}`],
      cwd: p.directory,
      env,
    }).spawn(),
  }));
  console.log(`
denokv on Fly, local stack (${
    realDenokv
      ? "official denokv"
      : "denokv stand-in: no denokv installed; `deno task setup` builds the official one"
  })
  programs: ${programs.map((p) => p.name).join(", ")} (from supervisord.conf${
    supercronic ? "" : "; supercronic not on PATH, nightly check not scheduled"
  })
  data:     ${join(config.dataDir, "denokv.sqlite")}
  replica:  ${
    config.localReplicaDir
      ? `${config.localReplicaDir} (local folder: no BUCKET_NAME set)`
      : `s3://${env.BUCKET_NAME}/${env.REPLICA_PATH ?? "denokv"}`
  }
  url:      http://localhost:${config.port}
  token:    ${
    config.tokenGenerated
      ? `${config.token}   (generated, saved in ${join(config.dataDir, "token")})`
      : "(from DENO_KV_ACCESS_TOKEN or .data/token)"
  }

Connect:
  DENO_KV_ACCESS_TOKEN=<token> deno run --unstable-kv -A app.ts
  const kv = await Deno.openKv("http://localhost:${config.port}");
`);
  const stop = () => {
    for (const { child } of children) {
      try {
        child.kill("SIGTERM");
      } catch { /* gone */ }
    }
  };
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  const first = await Promise.race(
    children.map(({ program, child }) => child.status.then((s) => ({ program, s }))),
  );
  if (!first.s.success) console.error(`${first.program.name} exited with ${first.s.code}`);
  stop();
  await Promise.allSettled(children.map(({ child }) => child.status));
  Deno.exit(first.s.success ? 0 : 1);
}
