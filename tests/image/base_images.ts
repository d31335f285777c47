/**
 * Makes the base images the Dockerfile's FROM lines name, locally and under
 * those exact names, since no registry is reachable: Debian from debootstrap,
 * Deno from the pinned npm binary, denokv from the cargo-built release.
 */
import { join } from "node:path";
import { existsSync } from "node:fs";
import { toolPaths } from "../../scripts/dev/tools.ts";
import { buildah, CACHE_DIR, imageExists, imageLabel, run, sha256File } from "./buildah.ts";

/** Where `deno task setup` puts `cargo install denokv --version V`. */
export function denokvBinary(version: string): string {
  return join(toolPaths({ denokv: version, supercronic: "" }, CACHE_DIR).denokvBinDir, "denokv");
}

/** Label recording the binary an image was made from, so a new binary remakes it. */
const SOURCE_LABEL = "denokv-on-fly.test.source-sha256";

/** The FROM image names of a Dockerfile, with global ARG defaults expanded. */
export function fromImages(dockerfile: string): string[] {
  const args: Record<string, string> = {};
  const images: string[] = [];
  const stages = new Set<string>();
  const lines = dockerfile.replace(/\\\n/g, " ").split("\n").map((l) => l.trim());
  let seenFrom = false;
  for (const line of lines) {
    const arg = /^ARG\s+(\w+)=(\S+)/i.exec(line);
    // Only ARGs before the first FROM are in scope for FROM lines.
    if (arg && !seenFrom) args[arg[1]] = arg[2];
    const from = /^FROM\s+(?:--\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?/i.exec(line);
    if (!from) continue;
    seenFrom = true;
    const name = from[1].replace(/\$\{(\w+)\}|\$(\w+)/g, (_, a, b) => {
      const value = args[a ?? b];
      if (value === undefined) throw new Error(`FROM ${from[1]}: no default for ${a ?? b}`);
      return value;
    });
    if (!stages.has(name) && name !== "scratch" && !images.includes(name)) images.push(name);
    if (from[2]) stages.add(from[2]);
  }
  return images;
}

/** The fully qualified name buildah resolves a short FROM name to. */
export function qualified(name: string): string {
  const firstPart = name.split("/")[0];
  const hasRegistry = name.includes("/") && /[.:]/.test(firstPart) || firstPart === "localhost";
  if (hasRegistry) return name;
  return name.includes("/") ? `docker.io/${name}` : `docker.io/library/${name}`;
}

/** A base image the test knows how to make, and whether it is already stored. */
interface Maker {
  /** Compares the stored image with its source; true when it can be reused. */
  current(name: string): Promise<boolean>;
  make(name: string): Promise<void>;
}

async function fromScratchWithFile(
  name: string,
  source: string,
  target: string,
  sourceSha: string,
): Promise<void> {
  const ctr = (await buildah(["from", "scratch"])).stdout.trim();
  try {
    await buildah(["copy", "--chmod", "0755", ctr, source, target]);
    await buildah([
      "config",
      "--label",
      `${SOURCE_LABEL}=${sourceSha}`,
      "--entrypoint",
      `["${target}"]`,
      ctr,
    ]);
    await buildah(["commit", "--quiet", ctr, name]);
  } finally {
    await buildah(["rm", ctr], { allowFail: true });
  }
}

/** Remakes when the stored image was made from another binary. */
function binaryImage(source: () => string, target: string): Maker {
  return {
    async current(name) {
      const sha = await sha256File(source());
      return (await imageLabel(name, SOURCE_LABEL)) === sha;
    },
    async make(name) {
      await fromScratchWithFile(name, source(), target, await sha256File(source()));
    },
  };
}

/** debootstrap's minbase, trimmed the way Debian's -slim images are. */
const debianSlim: Maker = {
  current: imageExists,
  async make(name) {
    const suite = /debian:(\w+)-slim$/.exec(name)?.[1];
    if (!suite) throw new Error(`no debootstrap suite for ${name}`);
    const dir = await Deno.makeTempDir({ prefix: "debootstrap-" });
    const rootfs = join(dir, "rootfs");
    try {
      await run("debootstrap", [
        "--variant=minbase",
        suite,
        rootfs,
        "http://deb.debian.org/debian",
      ]);
      // The suites Debian's own images list; apt in a build reaches them over plain HTTP.
      await Deno.remove(join(rootfs, "etc/apt/sources.list")).catch(() => {});
      await Deno.writeTextFile(
        join(rootfs, "etc/apt/sources.list.d/debian.sources"),
        [
          "Types: deb",
          "URIs: http://deb.debian.org/debian",
          `Suites: ${suite} ${suite}-updates`,
          "Components: main",
          "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg",
          "",
          "Types: deb",
          "URIs: http://deb.debian.org/debian-security",
          `Suites: ${suite}-security`,
          "Components: main",
          "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg",
          "",
        ].join("\n"),
      );
      // -slim images keep documentation out of every later install too.
      await Deno.writeTextFile(
        join(rootfs, "etc/dpkg/dpkg.cfg.d/slim"),
        [
          "path-exclude /usr/share/doc/*",
          "path-include /usr/share/doc/*/copyright",
          "path-exclude /usr/share/man/*",
          "path-exclude /usr/share/info/*",
          "path-exclude /usr/share/locale/*",
          "",
        ].join("\n"),
      );
      // Debian's images delete downloaded packages after every install and fetch no
      // translations; without this the test image would carry apt's cache.
      await Deno.writeTextFile(
        join(rootfs, "etc/apt/apt.conf.d/slim-clean"),
        [
          'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };',
          'APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };',
          'Dir::Cache::pkgcache "";',
          'Dir::Cache::srcpkgcache "";',
          'Acquire::Languages "none";',
          'Apt::AutoRemove::SuggestsImportant "false";',
          "",
        ].join("\n"),
      );
      await run("sh", [
        "-c",
        'cd "$1" && rm -rf var/cache/apt/*.bin var/cache/apt/archives/*.deb var/lib/apt/lists/* ' +
        "usr/share/man/* usr/share/info/* usr/share/locale/* dev/* proc/* sys/* run/* tmp/* && " +
        "find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete",
        "sh",
        rootfs,
      ]);
      const ctr = (await buildah(["from", "scratch"])).stdout.trim();
      try {
        const mnt = (await buildah(["mount", ctr])).stdout.trim();
        await run("cp", ["-a", `${rootfs}/.`, `${mnt}/`]);
        await buildah(["umount", ctr]);
        await buildah([
          "config",
          "--env",
          "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
          "--cmd",
          '["bash"]',
          ctr,
        ]);
        await buildah(["commit", "--quiet", ctr, name]);
      } finally {
        await buildah(["rm", ctr], { allowFail: true });
      }
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
};

function makerFor(name: string): Maker {
  if (/^docker\.io\/library\/debian:\w+-slim$/.test(name)) return debianSlim;
  const deno = /^docker\.io\/denoland\/deno:bin-(\S+)$/.exec(name);
  if (deno) {
    if (deno[1] !== Deno.version.deno) {
      throw new Error(`${name}: the tests run Deno ${Deno.version.deno}, not ${deno[1]}`);
    }
    return binaryImage(() => Deno.execPath(), "/deno");
  }
  const denokv = /^ghcr\.io\/denoland\/denokv:(\S+)$/.exec(name);
  if (denokv) {
    const bin = denokvBinary(denokv[1]);
    return binaryImage(() => {
      if (!existsSync(bin)) throw new Error(`${name}: ${bin} is missing (run deno task setup)`);
      return bin;
    }, "/usr/local/bin/denokv");
  }
  throw new Error(`no local maker for base image ${name}: add one or drop that base`);
}

/** What happened to each base image. */
export interface BaseImage {
  name: string;
  made: boolean;
  ms: number;
}

/** Makes every base image of the Dockerfile that is missing or stale. */
export async function ensureBaseImages(dockerfile: string): Promise<BaseImage[]> {
  const out: BaseImage[] = [];
  for (const short of fromImages(dockerfile)) {
    const name = qualified(short);
    const maker = makerFor(name);
    const started = performance.now();
    const made = !(await maker.current(name));
    if (made) {
      // Minutes for Debian: say so, or the test looks stuck.
      console.log(`image test: making base image ${name}`);
      await maker.make(name);
    }
    out.push({ name, made, ms: performance.now() - started });
  }
  return out;
}
