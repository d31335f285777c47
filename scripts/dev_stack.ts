/**
 * `npm start`: runs denokv (the real binary when one is on PATH, else the
 * test stand-in) and the proxy on localhost with embedded defaults, data under
 * `./.data`, and prints how to connect. Ctrl-C stops both.
 */
import { fileURLToPath } from "node:url";
import { join } from "node:path";

/** The local stack's settings, from the environment with embedded defaults. */
export interface DevConfig {
  root: string;
  dataDir: string;
  port: number;
  denokvPort: number;
  token: string;
  tokenGenerated: boolean;
}

/** Reads the environment once; generates a token (kept in `.data/token`) when none is set. */
export async function loadConfig(env: Record<string, string | undefined>): Promise<DevConfig> {
  const root = fileURLToPath(new URL("..", import.meta.url));
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
  return { root, dataDir, port, denokvPort, token, tokenGenerated };
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

if (import.meta.main) {
  const config = await loadConfig(Deno.env.toObject());
  const basePath = Deno.env.get("PATH") ?? "";
  const realDenokv = await onPath("denokv", basePath);
  const path = [
    ...(realDenokv ? [] : [join(config.root, "tests/bin")]),
    join(config.root, "node_modules/.bin"),
    basePath,
  ].join(":");
  const env = {
    PATH: path,
    DENO_BIN: Deno.execPath(),
    DENO_KV_ACCESS_TOKEN: config.token,
    DATA_DIR: config.dataDir,
    PORT: String(config.port),
    DENOKV_URL: `http://127.0.0.1:${config.denokvPort}`,
  };
  const dbPath = join(config.dataDir, "denokv.sqlite");
  const denokv = new Deno.Command("denokv", {
    args: ["--sqlite-path", dbPath, "serve", "--addr", `127.0.0.1:${config.denokvPort}`],
    env,
  }).spawn();
  const proxy = new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-net", "--allow-env", "--allow-read", join(config.root, "proxy/main.ts")],
    env,
  }).spawn();
  console.log(`
denokv on Fly, local stack (${realDenokv ? "denokv from PATH" : "denokv stand-in"})
  data:   ${dbPath}
  url:    http://localhost:${config.port}
  token:  ${
    config.tokenGenerated
      ? config.token + "   (generated, saved in .data/token)"
      : "(from DENO_KV_ACCESS_TOKEN or .data/token)"
  }

Connect:
  DENO_KV_ACCESS_TOKEN=<token> deno run --unstable-kv -A app.ts
  const kv = await Deno.openKv("http://localhost:${config.port}");
`);
  const stop = () => {
    for (const child of [proxy, denokv]) {
      try {
        child.kill("SIGTERM");
      } catch { /* gone */ }
    }
  };
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  const first = await Promise.race([denokv.status, proxy.status]);
  stop();
  await Promise.allSettled([denokv.status, proxy.status]);
  Deno.exit(first.success ? 0 : 1);
}
