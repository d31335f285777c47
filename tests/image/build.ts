/**
 * Builds the repository's Dockerfile, unchanged, with buildah the way a
 * builder without registry access must: local base images, the Supercronic
 * release served from loopback (its URL and SHA1 are build arguments), and
 * the machine's CA bundle mounted for npm when this machine needs one.
 */
import { join } from "node:path";
import { existsSync } from "node:fs";
import { ROOT } from "../_helpers/processes.ts";
import { pinsFrom, toolPaths } from "../../scripts/dev/tools.ts";
import { buildah, CACHE_DIR, run } from "./buildah.ts";
import { type BaseImage, ensureBaseImages } from "./base_images.ts";

/** The tag the test gives the built image. */
export const IMAGE_NAME = "localhost/denokv-on-fly:test";

/** The go-installed binary of `deno task setup` (`go install ...supercronic@V`). */
export function supercronicBinary(version: string): string {
  return join(
    toolPaths({ denokv: "", supercronic: version }, CACHE_DIR).supercronicBinDir,
    "supercronic",
  );
}

/** What a build did and cost. */
export interface Built {
  name: string;
  bases: BaseImage[];
  buildMs: number;
  sizeBytes: number;
  log: string;
}

/**
 * The URL is a build argument, so part of the cache key of every later step: a
 * fixed port keeps a warm rebuild cached; when another process holds it, any
 * free port does (the build is then only slower).
 */
const PREFERRED_PORT = 47_480;

/** Serves one file over HTTP on loopback until disposed. */
function serveFile(path: string): { url: string; [Symbol.asyncDispose](): Promise<void> } {
  const handler = async () => new Response((await Deno.open(path)).readable);
  const listen = (port: number) =>
    Deno.serve({ hostname: "127.0.0.1", port, onListen() {} }, handler);
  let server: Deno.HttpServer<Deno.NetAddr>;
  try {
    server = listen(PREFERRED_PORT);
  } catch (err) {
    if (!(err instanceof Deno.errors.AddrInUse)) throw err;
    server = listen(0);
  }
  return {
    url: `http://127.0.0.1:${server.addr.port}/supercronic-linux-amd64`,
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

/**
 * npm inside RUN steps trusts the machine's extra CA (a TLS-inspecting proxy here)
 * through a user config in a folder mounted as /root: a folder every stage already
 * has, so the mount leaves no mount-point file behind in the image (a file mount
 * would), and npm's cache lands there, outside the layers. The Dockerfile names no CA.
 */
async function npmCaMounts(dir: string): Promise<string[]> {
  const ca = Deno.env.get("NODE_EXTRA_CA_CERTS");
  if (!ca || !existsSync(ca)) return [];
  const home = join(dir, "root");
  await Deno.mkdir(home);
  await Deno.copyFile(ca, join(home, "extra-ca.crt"));
  await Deno.writeTextFile(join(home, ".npmrc"), "cafile=/root/extra-ca.crt\n");
  return ["-v", `${home}:/root`];
}

/** Image size in bytes, from buildah's decimal human-readable figure ("418 MB"). */
export async function imageSize(name: string): Promise<number> {
  const res = await buildah(["images", "--json", name]);
  const [info] = JSON.parse(res.stdout) as { size: string }[];
  const m = /^([\d.]+)\s*(B|kB|MB|GB)$/.exec(info.size);
  if (!m) throw new Error(`unexpected image size ${info.size}`);
  return Number(m[1]) * { B: 1, kB: 1e3, MB: 1e6, GB: 1e9 }[m[2] as "B"];
}

/** Containers in the store, by id, with the image each was made from. */
async function containers(): Promise<Map<string, string>> {
  const res = await buildah(["containers", "--json"]);
  const list = (JSON.parse(res.stdout || "null") ?? []) as { id: string; imagename: string }[];
  return new Map(list.map((c) => [c.id, c.imagename]));
}

/**
 * Keeps the vfs store from growing by a full image copy per step and run:
 * buildah leaves a working container for each stage that is only a FROM, and
 * every rebuilt step leaves the layers it replaced as untagged images. The
 * layers this build used or made (named in its log) stay as the next cache.
 */
async function dropLeftovers(containersBefore: Map<string, string>, log: string): Promise<void> {
  for (const [id, image] of await containers()) {
    // A boot of the built image by a test running beside this one is not a leftover.
    if (containersBefore.has(id) || image === IMAGE_NAME) continue;
    await buildah(["rm", id], { allowFail: true });
  }
  // buildah prints new layers by 11-character ids and cached ones in full.
  const used = [...log.matchAll(/--> (?:Using cache )?([0-9a-f]{11,64})/g)].map((m) => m[1]);
  const res = await buildah(["images", "--all", "--json"]);
  const images = JSON.parse(res.stdout) as { id: string; names?: string[] | null }[];
  for (const image of images) {
    if (image.names?.length) continue;
    if (used.some((u) => u.startsWith(image.id) || image.id.startsWith(u))) continue;
    await buildah(["rmi", image.id], { allowFail: true });
  }
}

/** Makes the base images, then builds the Dockerfile into {@linkcode IMAGE_NAME}. */
export async function buildImage(): Promise<Built> {
  const dockerfile = await Deno.readTextFile(join(ROOT, "Dockerfile"));
  const bases = await ensureBaseImages(dockerfile);
  const supercronic = supercronicBinary(pinsFrom(dockerfile).supercronic);
  if (!existsSync(supercronic)) {
    throw new Error(`${supercronic} is missing (run deno task setup)`);
  }
  const sha1 = (await run("sha1sum", [supercronic])).stdout.split(" ")[0];
  const dir = await Deno.makeTempDir({ prefix: "image-build-" });
  try {
    await using served = serveFile(supercronic);
    const containersBefore = await containers();
    console.log(`image test: buildah build of ${join(ROOT, "Dockerfile")}`);
    const started = performance.now();
    const res = await buildah([
      "build",
      "--isolation",
      "chroot",
      "--network",
      "host",
      "--pull=never",
      // Unchanged steps come from cache on a warm machine; the first build is the real figure.
      "--layers",
      ...await npmCaMounts(dir),
      "--build-arg",
      `SUPERCRONIC_URL=${served.url}`,
      "--build-arg",
      `SUPERCRONIC_SHA1SUM=${sha1}`,
      "-t",
      IMAGE_NAME,
      "-f",
      join(ROOT, "Dockerfile"),
      ROOT,
    ]);
    const buildMs = performance.now() - started;
    await dropLeftovers(containersBefore, res.stdout + res.stderr);
    return {
      name: IMAGE_NAME,
      bases,
      buildMs,
      sizeBytes: await imageSize(IMAGE_NAME),
      log: res.stdout + res.stderr,
    };
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}
