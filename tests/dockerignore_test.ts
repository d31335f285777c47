/**
 * What a real image build receives: a copy of the repository with the local
 * state a developer has (`.data/` with the database and token, `node_modules/`,
 * env files, stray SQLite files) goes through buildah with `FROM scratch` and
 * `COPY . /ctx`, honouring the repository's .dockerignore; the copied tree is
 * then the build context as the builder saw it.
 */
import assert from "node:assert/strict";
import { dirname, join } from "node:path";
import { ROOT } from "./_helpers/processes.ts";

/** Local files that must never reach a builder (Fly's remote builder included). */
const PLANTED = [
  ".data/denokv.sqlite",
  ".data/denokv.sqlite-wal",
  ".data/access-token",
  "node_modules/some-package/index.js",
  ".env",
  ".env.production",
  "scripts/.env.local",
  "lib/.data/scratch.sqlite",
  "proxy/node_modules/left-over/index.js",
  "denokv.sqlite",
  "scripts/local.sqlite-shm",
];

/** A path segment or name that marks secrets or local state. */
const FORBIDDEN = /(^|\/)(\.data|node_modules|\.git|\.env[^/]*)(\/|$)|\.sqlite(-[a-z]+)?$/;

async function run(cmd: string, args: string[], cwd?: string): Promise<string> {
  const out = await new Deno.Command(cmd, { args, cwd, stdout: "piped", stderr: "piped" }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`${cmd} ${args.join(" ")} exited ${out.code}:\n${text}`);
  return new TextDecoder().decode(out.stdout);
}

async function filesUnder(dir: string, prefix = ""): Promise<string[]> {
  const out: string[] = [];
  for await (const entry of Deno.readDir(join(dir, prefix))) {
    const rel = prefix ? `${prefix}/${entry.name}` : entry.name;
    if (entry.isDirectory) out.push(...await filesUnder(dir, rel));
    else out.push(rel);
  }
  return out;
}

/** The sources of the Dockerfile's `COPY` lines that read the build context. */
function dockerfileSources(): string[] {
  const text = Deno.readTextFileSync(join(ROOT, "Dockerfile"));
  const sources: string[] = [];
  for (const m of text.matchAll(/^COPY\s+(.+)$/gm)) {
    const args = m[1].trim().split(/\s+/);
    if (args.some((a) => a.startsWith("--from"))) continue;
    sources.push(...args.filter((a) => !a.startsWith("--")).slice(0, -1));
  }
  return sources.map((s) => s.replace(/\/$/, ""));
}

Deno.test("build context: buildah receives what the Dockerfile copies and no secret-bearing path", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "dockerignore-" });
  try {
    const context = join(tmp, "context");
    // The repository as a checkout has it (tracked and new files, .gitignore honoured)...
    const files = (await run("git", ["ls-files", "-co", "--exclude-standard"], ROOT))
      .split("\n").filter((f) => f !== "");
    for (const file of files) {
      await Deno.mkdir(join(context, dirname(file)), { recursive: true });
      await Deno.copyFile(join(ROOT, file), join(context, file));
    }
    // ...plus what a developer's working copy holds after `npm ci` and `npm start`.
    for (const file of PLANTED) {
      await Deno.mkdir(join(context, dirname(file)), { recursive: true });
      await Deno.writeTextFile(join(context, file), "local state\n");
    }
    await Deno.writeTextFile(join(tmp, "Containerfile"), "FROM scratch\nCOPY . /ctx\n");
    const out = join(tmp, "out");
    await run("buildah", [
      "--storage-driver",
      "vfs",
      "--root",
      join(tmp, "storage"),
      "--runroot",
      join(tmp, "run"),
      "bud",
      "--isolation",
      "chroot",
      "--pull=never",
      "-f",
      join(tmp, "Containerfile"),
      "--output",
      `type=local,dest=${out}`,
      context,
    ]);
    const received = (await filesUnder(join(out, "ctx"))).sort();

    const leaked = received.filter((f) => FORBIDDEN.test(f));
    assert.deepEqual(leaked, [], `secret-bearing or local paths in the build context`);
    for (const file of PLANTED) assert.ok(!received.includes(file), `${file} reached the builder`);

    const sources = dockerfileSources();
    for (const source of sources) {
      assert.ok(
        received.some((f) => f === source || f.startsWith(`${source}/`)),
        `the Dockerfile copies ${source}, but the context lacks it`,
      );
    }
    const extra = received.filter((f) => !sources.some((s) => f === s || f.startsWith(`${s}/`)));
    assert.deepEqual(extra, [], "files the image never copies reached the builder");
  } finally {
    await Deno.remove(tmp, { recursive: true }).catch(() => {});
  }
});
