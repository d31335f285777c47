/**
 * Static checks of the image layout, since no Docker engine runs here: every
 * file the Dockerfile copies exists, and every path and command in
 * supervisord.conf and crontab resolves inside the image the Dockerfile builds.
 */
import { programSections } from "../scripts/dev/dev_stack.ts";
import assert from "node:assert/strict";
import { existsSync, statSync } from "node:fs";
import { join, posix } from "node:path";
import { CronExpressionParser } from "cron-parser";
import { ROOT } from "./_helpers/processes.ts";

const dockerfile = Deno.readTextFileSync(join(ROOT, "Dockerfile"));
const supervisordConf = Deno.readTextFileSync(join(ROOT, "supervisord.conf"));
const crontab = Deno.readTextFileSync(join(ROOT, "crontab"));
const flyToml = Deno.readTextFileSync(join(ROOT, "fly.toml"));

/** Dockerfile instructions of the final stage, continuation lines joined. */
function instructions(text: string): { op: string; args: string }[] {
  const joined = text.replace(/\\\n/g, " ").split("\n").map((l) => l.trim());
  const all = joined.filter((l) => l && !l.startsWith("#")).map((l) => {
    const [op, ...rest] = l.split(/\s+/);
    return { op: op.toUpperCase(), args: rest.join(" ") };
  });
  const lastFrom = all.map((i) => i.op).lastIndexOf("FROM");
  return all.slice(lastFrom);
}

const finalStage = instructions(dockerfile);
const workdir = finalStage.find((i) => i.op === "WORKDIR")?.args ?? "/";

/** `ENV` values the image sets. */
const imageEnv: Record<string, string> = {};
for (const i of finalStage.filter((i) => i.op === "ENV")) {
  for (const m of i.args.matchAll(/(\w+)=(\S+)/g)) imageEnv[m[1]] = m[2];
}

/** Image path -> repo path, for every `COPY` from the build context. */
const copied = new Map<string, string>();
/** Commands the image puts in /usr/local/bin (COPY --from, curl/tar) or apt installs. */
const imageBins = new Set<string>();
for (const i of finalStage) {
  if (i.op === "COPY") {
    const parts = i.args.split(/\s+/).filter((p) => !p.startsWith("--chown") && p !== "");
    const fromStage = parts[0].startsWith("--from=");
    const words = parts.filter((p) => !p.startsWith("--"));
    const dest = posix.resolve(workdir, words.at(-1)!);
    if (fromStage) {
      if (dest.startsWith("/usr/local/bin/")) imageBins.add(posix.basename(dest));
      continue;
    }
    for (const src of words.slice(0, -1)) {
      const target = words.length > 2 || dest.endsWith("/") || words.at(-1)!.endsWith("/")
        ? posix.join(dest, src.endsWith("/") && words.length === 2 ? "" : posix.basename(src))
        : dest;
      copied.set(target.replace(/\/$/, ""), src.replace(/\/$/, ""));
    }
  }
  if (i.op === "RUN") {
    for (const m of i.args.matchAll(/-\w*o\s*\/usr\/local\/bin\/(\S+)/g)) imageBins.add(m[1]);
    for (const m of i.args.matchAll(/-C \/usr\/local\/bin (\w+)/g)) imageBins.add(m[1]);
    const apt = /apt-get install[^&]*/.exec(i.args)?.[0] ?? "";
    for (const pkg of apt.split(/\s+/).slice(2)) if (!pkg.startsWith("-")) imageBins.add(pkg);
  }
}

/** Maps an absolute path in the image to the repo file it comes from, or null. */
function repoPathOf(imagePath: string): string | null {
  for (const [target, src] of copied) {
    if (imagePath === target) return join(ROOT, src);
    if (imagePath.startsWith(target + "/")) return join(ROOT, src, imagePath.slice(target.length));
  }
  return null;
}

/** Whether an image path is on the data volume (created at run time, not copied). */
function onVolume(imagePath: string): boolean {
  return imagePath === imageEnv.DATA_DIR || imagePath.startsWith(imageEnv.DATA_DIR + "/");
}

/** supervisord.conf with `%(ENV_X)s` expanded from the image's ENV (missing ones fail). */
function expandSupervisord(text: string): string {
  return text.replace(/%\(ENV_(\w+)\)s/g, (_, name: string) => {
    assert.ok(
      name in imageEnv,
      `supervisord.conf uses ENV_${name} but the Dockerfile sets no ${name}`,
    );
    return imageEnv[name];
  });
}

Deno.test("Dockerfile: every file it copies from the build context exists", () => {
  assert.ok(copied.size > 0, "the Dockerfile copies nothing");
  for (const [target, src] of copied) {
    assert.ok(existsSync(join(ROOT, src)), `COPY ${src} (to ${target}): no such file in the repo`);
  }
  // The stages' own inputs, too.
  for (const m of dockerfile.matchAll(/^COPY (?!--from)(.+)$/gm)) {
    for (const src of m[1].split(/\s+/).slice(0, -1)) {
      assert.ok(existsSync(join(ROOT, src)), `COPY ${src}: no such file in the repo`);
    }
  }
});

Deno.test("Dockerfile: versions are pinned and the entry point is supervisord on the copied config", () => {
  assert.match(dockerfile, /ARG DENO_VERSION=2\.9\.6\b/);
  assert.match(dockerfile, /ARG LITESTREAM_VERSION=0\.3\.13\b/);
  assert.match(dockerfile, /ARG SUPERCRONIC_VERSION=v\d+\.\d+\.\d+\b/);
  assert.match(dockerfile, /ARG DENOKV_VERSION=\d+\.\d+\.\d+\b/);
  assert.match(dockerfile, /FROM ghcr\.io\/denoland\/denokv:\$\{DENOKV_VERSION\}/);
  // Litestream is the lockfile-pinned (sha512-checked) npm binary the tests run.
  assert.match(
    dockerfile,
    /npm ci --ignore-scripts[\s\S]*litestream version \| grep -qx "v\$\{LITESTREAM_VERSION\}"/,
  );
  const lock = JSON.parse(Deno.readTextFileSync(join(ROOT, "package-lock.json")));
  const pkg = lock.packages["node_modules/@flydotio/litestream-linux-x64"];
  assert.ok(pkg?.version && pkg.integrity?.startsWith("sha512-"), "litestream binary not pinned");
  assert.match(dockerfile, /sha1sum -c/);
  assert.match(dockerfile, /npm ci --omit=dev/);
  assert.match(dockerfile, /deno cache proxy\/main\.ts/);
  for (const from of dockerfile.matchAll(/^FROM (\S+)/gm)) {
    assert.ok(!/:latest$|^[^:]+$/.test(from[1]), `unpinned base image ${from[1]}`);
  }
  const entry = finalStage.find((i) => i.op === "ENTRYPOINT");
  assert.ok(entry, "no ENTRYPOINT");
  const argv = JSON.parse(entry.args) as string[];
  assert.equal(argv[0], "supervisord");
  assert.ok(argv.includes("-n"));
  const conf = argv[argv.indexOf("-c") + 1];
  assert.equal(repoPathOf(conf), join(ROOT, "supervisord.conf"));
  for (const name of ["deno", "denokv", "litestream", "supercronic", "supervisor"]) {
    assert.ok(imageBins.has(name), `the image does not install ${name}`);
  }
});

Deno.test("supervisord.conf: every path and command resolves in the image layout", () => {
  const expanded = expandSupervisord(supervisordConf);
  for (const m of supervisordConf.matchAll(/^(\w+)\s*=\s*(.*%\(ENV_.*)$/gm)) {
    const value = expandSupervisord(m[2]).replace("unix://", "");
    for (const path of value.match(/\/[\w./-]+/g) ?? []) {
      if (path.startsWith("/dev/")) continue;
      assert.ok(
        path === workdir || onVolume(path) || repoPathOf(path) !== null,
        `${m[1]}=${m[2]}: ${path} is neither copied into the image nor on the volume`,
      );
      const repo = repoPathOf(path);
      if (repo) assert.ok(existsSync(repo), `${m[1]}: ${path} -> ${repo} does not exist`);
    }
  }
  const progs = programSections(expanded);
  assert.deepEqual([...progs.keys()].sort(), ["denokv", "proxy", "supercronic"]);
  const imageBinsWithScripts = (cmd: string) => {
    const first = cmd.split(/\s+/)[0];
    if (first.startsWith("/")) {
      const repo = repoPathOf(first);
      assert.ok(repo && existsSync(repo), `${first} is not in the image`);
      assert.ok((statSync(repo).mode & 0o111) !== 0, `${first} is not executable`);
      return;
    }
    assert.ok(imageBins.has(first), `command ${first} is not installed by the Dockerfile`);
  };
  for (const [name, p] of progs) {
    assert.ok(p.command, `program ${name} has no command`);
    imageBinsWithScripts(p.command);
    assert.equal(p.stdout_logfile, "/dev/stdout", `${name} must log to stdout`);
    assert.equal(p.stdout_logfile_maxbytes, "0", `${name}: /dev/stdout cannot be rotated`);
  }
  // The start-up wrapper calls deno and execs litestream/denokv by name: all in the image.
  const wrapper = Deno.readTextFileSync(join(ROOT, "scripts/boot/start_denokv.sh"));
  assert.match(wrapper, /set -euo pipefail/);
  assert.match(wrapper, /^exec /m);
  assert.ok(imageBins.has("deno"));
});

Deno.test("supervisord.conf and fly.toml: the final sync has time to finish", () => {
  const progs = programSections(expandSupervisord(supervisordConf));
  const stopwait = Number(progs.get("denokv")!.stopwaitsecs);
  assert.ok(stopwait >= 30, `denokv stopwaitsecs=${stopwait} is too short for the final sync`);
  const killTimeout = Number(/^kill_timeout\s*=\s*(\d+)/m.exec(flyToml)?.[1]);
  assert.ok(killTimeout >= stopwait, `fly kill_timeout ${killTimeout} < stopwaitsecs ${stopwait}`);
  assert.match(flyToml, /^kill_signal\s*=\s*"SIGTERM"/m);
  assert.match(flyToml, /auto_stop_machines\s*=\s*"off"/);
  assert.match(flyToml, /min_machines_running\s*=\s*1/);
  assert.match(flyToml, /internal_port\s*=\s*4512/);
  assert.match(flyToml, /path\s*=\s*"\/healthz"/);
  assert.match(flyToml, /destination\s*=\s*"\/data"/);
  for (const name of ["DENO_KV_ACCESS_TOKEN", "AWS_SECRET_ACCESS_KEY"]) {
    assert.ok(!new RegExp(`^\\s*${name}\\s*=`, "m").test(flyToml), `${name} belongs in secrets`);
  }
});

/** Every section of an INI file (supervisord.conf) with its `key=value` settings. */
function iniSections(text: string): Map<string, Record<string, string>> {
  const sections = new Map<string, Record<string, string>>();
  let current: Record<string, string> = {};
  for (const line of text.split("\n")) {
    const header = /^\[([^\]]+)\]/.exec(line);
    if (header) {
      current = {};
      sections.set(header[1], current);
      continue;
    }
    const kv = /^(\w+)\s*=\s*(.*)$/.exec(line);
    if (kv) current[kv[1]] = kv[2].trim();
  }
  return sections;
}

Deno.test("supervisord.conf and fly.toml: every stop wait together fits kill_timeout", () => {
  // supervisord stops programs one after another, each for up to stopwaitsecs (default 10).
  const killTimeout = Number(/^kill_timeout\s*=\s*(\d+)/m.exec(flyToml)?.[1]);
  let total = 0;
  const parts: string[] = [];
  for (const [name, settings] of iniSections(supervisordConf)) {
    if (!/^(program|eventlistener):/.test(name)) continue;
    const wait = Number(settings.stopwaitsecs ?? "10");
    total += wait;
    parts.push(`${name} ${wait}`);
  }
  assert.ok(parts.length >= 4, parts.join(", "));
  assert.ok(
    total < killTimeout,
    `stop waits add up to ${total} s (${parts.join(", ")}), fly kill_timeout is ${killTimeout} s`,
  );
});

Deno.test("supervisord.conf and fly.toml: a FATAL program takes the machine down and Fly restarts it", () => {
  const listeners = [...iniSections(supervisordConf)].filter(([name, s]) =>
    name.startsWith("eventlistener:") &&
    (s.events ?? "").split(",").some((e) =>
      ["PROCESS_STATE", "PROCESS_STATE_FATAL"].includes(e.trim())
    )
  );
  assert.equal(listeners.length, 1, "no [eventlistener] on PROCESS_STATE_FATAL");
  const [, listener] = listeners[0];
  const script = /(\S+\.ts)\b/.exec(listener.command)?.[1] ?? "";
  const repo = repoPathOf(expandSupervisord(script));
  assert.ok(repo && existsSync(repo), `listener script ${script} is not in the image`);
  assert.match(Deno.readTextFileSync(repo), /PROCESS_STATE_|FATAL/);
  const restart = /^\[\[restart\]\]\s*\n((?:[ \t]+\S.*\n?)*)/m.exec(flyToml);
  assert.ok(restart, "fly.toml has no [[restart]] section");
  assert.match(restart[1], /policy\s*=\s*"always"/);
});

Deno.test("supervisord.conf: starts on the image's variables alone (no SUPERCRONIC_AUTOSTART)", () => {
  const used = new Set([...supervisordConf.matchAll(/%\(ENV_(\w+)\)s/g)].map((m) => m[1]));
  assert.deepEqual([...used].sort(), ["APP_DIR", "DATA_DIR"]);
  const supercronic = programSections(supervisordConf).get("supercronic")!;
  assert.ok(!("autostart" in supercronic) || supercronic.autostart === "true");
  const wrapper = Deno.readTextFileSync(join(ROOT, "scripts/boot/supercronic.sh"));
  assert.match(wrapper, /^exec supercronic .*"\$\{CRONTAB_PATH:-\$APP_DIR\/crontab\}"/m);
});

Deno.test("fly.toml: concurrency counts connections with limits sized for long watch streams", () => {
  const block = /\[http_service\.concurrency\]\s*\n((?:[ \t]+\S.*\n?)*)/.exec(flyToml);
  assert.ok(block, "no [http_service.concurrency]");
  const type = /type\s*=\s*"(\w+)"/.exec(block[1])?.[1];
  const soft = Number(/soft_limit\s*=\s*(\d+)/.exec(block[1])?.[1]);
  const hard = Number(/hard_limit\s*=\s*(\d+)/.exec(block[1])?.[1]);
  // A watch or a queue worker holds its slot for hours: the limit must leave room for
  // far more of them than the 250 requests that used to lock the machine out, and the
  // comment must give the measured memory per watch it was sized from.
  assert.equal(type, "connections");
  assert.ok(hard > 250 * 2, `hard_limit ${hard} is no better than the old 250 requests`);
  assert.ok(soft > 0 && soft < hard, `soft_limit ${soft} must be below hard_limit ${hard}`);
  const before = flyToml.slice(0, flyToml.indexOf("[http_service.concurrency]"));
  const comment = before.split("\n").slice(-12).join("\n");
  assert.match(comment, /watch/, "no reasoning comment");
  assert.match(comment, /\d+ KiB/, "the comment does not give the measured cost per watch");
});

Deno.test("crontab: the nightly check runs at 02:00 UTC on a script in the image", () => {
  const lines = crontab.split("\n").filter((l) => l.trim() && !l.trim().startsWith("#"));
  assert.equal(lines.length, 1);
  const fields = lines[0].trim().split(/\s+/);
  const schedule = fields.slice(0, 5).join(" ");
  const command = fields.slice(5);
  const cron = CronExpressionParser.parse(schedule, {
    tz: "UTC",
    currentDate: new Date("2026-01-01T12:00:00Z"),
  });
  assert.equal(cron.next().toDate().toISOString(), "2026-01-02T02:00:00.000Z");
  assert.equal(cron.next().toDate().toISOString(), "2026-01-03T02:00:00.000Z");
  assert.ok(imageBins.has(command[0]), `crontab command ${command[0]} is not in the image`);
  const expanded = command.map((w) =>
    w.replace(/\$\{(\w+)\}/g, (_, n: string) => {
      assert.ok(n in imageEnv, `crontab uses \${${n}} but the image sets no ${n}`);
      return imageEnv[n];
    })
  );
  const paths = expanded.filter((w) => w.startsWith("/"));
  assert.ok(
    paths.some((p) => p.endsWith("/scripts/backup_check/backup_check.ts")),
    expanded.join(" "),
  );
  for (const path of paths) {
    const repo = repoPathOf(path);
    assert.ok(repo && existsSync(repo), `crontab: ${path} is not in the image`);
  }
});

Deno.test("npm test runs every check: fmt, lint, types, all test folders, the stand-in and the image", async () => {
  const { SEQUENCE, BESIDE, testJobs } = await import("../scripts/dev/check_all.ts");
  const pkg = JSON.parse(Deno.readTextFileSync(join(ROOT, "package.json")));
  const tasks: Record<string, string> = JSON.parse(Deno.readTextFileSync(join(ROOT, "deno.json")))
    .tasks;
  assert.equal(pkg.scripts.test, "deno task setup && deno task ok");
  assert.match(tasks.ok, /scripts\/dev\/check_all\.ts$/);
  const parts = [...SEQUENCE, BESIDE].map((p) => p.args.join(" "));
  for (const part of ["fmt --check", "lint", "task check", "task test", "task test:standin"]) {
    assert.ok(parts.includes(part), `npm test does not run "deno ${part}"`);
  }
  assert.equal(BESIDE.args.join(" "), "task test:image");
  // The test task leaves out only the folder the image part runs.
  const ignored = [...tasks.test.matchAll(/--ignore=(\S+)/g)].map((m) => m[1]);
  assert.deepEqual(ignored, ["tests/image/"]);
  assert.match(tasks["test:image"], /deno test -A tests\/image\/$/);
  assert.match(tasks.test, /deno test -A --parallel /);
  assert.equal(testJobs({}, 2), "3");
  assert.equal(testJobs({}, 8), "8");
  assert.equal(testJobs({ DENO_JOBS: "1" }, 8), "1");
});
