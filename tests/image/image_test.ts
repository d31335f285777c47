/**
 * The image, built and booted: the repository's Dockerfile built unchanged with
 * buildah, then run with its own entry point against fauxqs (S3) and an SMTP
 * capture on loopback, as `deno task test:image` (also runnable alone with
 * `deno test -A tests/image/image_test.ts`). Prints build, boot and memory figures.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { freePort, openRemoteKv, ROOT, TEST_TOKEN, waitFor } from "../_helpers/processes.ts";
import { startMinio } from "../_helpers/minio.ts";
import { startSmtpCapture } from "../_helpers/smtp.ts";
import { buildah } from "./buildah.ts";
import { buildImage, type Built } from "./build.ts";
import { type Boot, bootImage, imageProcesses, killBoot, memoryKiB, stopBoot } from "./boot.ts";
import { checkPointInTimeRestore, pitrValues } from "./pitr.ts";

const KEYS = 1_000;
const KEY_PREFIX = ["image-test"];
const REPLICA_PATH = "image-test";

/** The repository's crontab with every job rescheduled to each minute, command untouched. */
async function everyMinuteCrontab(): Promise<string> {
  const text = await Deno.readTextFile(join(ROOT, "crontab"));
  const lines = text.split("\n").map((line) => {
    if (!line.trim() || line.trim().startsWith("#") || /^\w+=/.test(line.trim())) return line;
    const fields = line.trim().split(/\s+/);
    return ["*", "*", "*", "*", "*", ...fields.slice(5)].join(" ");
  });
  return lines.join("\n");
}

/** Imports withQueues by URL from the image in a separate Deno, round-trips one message. */
async function queueRoundTripByUrl(url: string, dir: string): Promise<unknown> {
  const script = join(dir, "queue_client.ts");
  await Deno.writeTextFile(
    script,
    `import { withQueues } from "${url}/lib/kv_queue.ts";
const kv = withQueues(await Deno.openKv("${url}"), { prefix: ["image-test-queue"] });
let received: (value: unknown) => void;
const got = new Promise((resolve) => received = resolve);
const listening = kv.listenQueue((message: unknown) => received(message));
const result = await kv.enqueue({ hello: "from the image" }, { delay: 100 });
if (!result.ok) throw new Error("enqueue failed");
console.log(JSON.stringify(await got));
kv.close();
await listening;
`,
  );
  const port = new URL(url).port;
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--no-config",
      "--no-lock",
      "--unstable-kv",
      `--allow-import=127.0.0.1:${port}`,
      `--allow-net=127.0.0.1:${port}`,
      "--allow-env",
      script,
    ],
    // A fresh DENO_DIR: the module must come from the image, not from a cache.
    env: { DENO_DIR: join(dir, "deno_dir"), DENO_KV_ACCESS_TOKEN: TEST_TOKEN },
    stdout: "piped",
    stderr: "piped",
    signal: AbortSignal.timeout(120_000),
  }).output();
  const decoder = new TextDecoder();
  assert.equal(out.code, 0, decoder.decode(out.stderr));
  return JSON.parse(decoder.decode(out.stdout).trim().split("\n").at(-1)!);
}

/** Writes KEYS keys, ten writers at a time, each its own commit. */
async function writeKeys(kv: Deno.Kv): Promise<void> {
  let next = 0;
  await Promise.all(Array.from({ length: 10 }, async () => {
    while (next < KEYS) {
      const i = next++;
      const res = await kv.set([...KEY_PREFIX, i], { i, body: `value ${i}` });
      assert.ok(res.ok);
    }
  }));
}

/** How many of the KEYS keys are back with the value written. */
async function countKeys(kv: Deno.Kv): Promise<number> {
  let n = 0;
  for await (const entry of kv.list<{ i: number; body: string }>({ prefix: KEY_PREFIX })) {
    const i = entry.key[1] as number;
    if (entry.value.i === i && entry.value.body === `value ${i}`) n++;
  }
  return n;
}

/** A process's role in the table, from its command line. */
function role(cmd: string): string {
  // One sidecar watches the programs and renews the replica lease (supervisord.conf).
  if (cmd.includes("scripts/boot/watchdog.ts")) return "watchdog + lease renewer (deno)";
  if (cmd.includes("bin/supervisord")) return "supervisord";
  if (cmd.includes("proxy/main.ts")) return "proxy (deno)";
  if (cmd.startsWith("litestream")) return "litestream";
  if (cmd.includes("denokv")) return "denokv";
  if (cmd.startsWith("supercronic")) return "supercronic";
  if (cmd.includes("backup_check")) return "backup check (deno, nightly)";
  return cmd.slice(0, 40);
}

const MiB = 1024;

Deno.test({
  name:
    "image: the Dockerfile builds unchanged, boots, serves KV and /lib/, its Supercronic mails PASSED, restore and rollback run inside it, and it survives SIGKILL + wipe",
  sanitizeOps: false,
  sanitizeResources: false,
  async fn(t) {
    const figures: [string, string][] = [];
    // Each stage needs the one before it: stop at the first that fails.
    const step = async (name: string, fn: () => Promise<void>) => {
      if (!(await t.step(name, fn))) throw new Error(`stopped after the failed step: ${name}`);
    };
    let built!: Built;
    await step("build: base images under the FROM names, then buildah build", async () => {
      built = await buildImage();
      for (const base of built.bases) {
        figures.push([
          `base ${base.name}`,
          base.made ? `made in ${(base.ms / 1000).toFixed(0)} s` : "cached",
        ]);
      }
      figures.push(["build (buildah, vfs, --layers)", `${(built.buildMs / 1000).toFixed(1)} s`]);
      figures.push(["image size", `${(built.sizeBytes / 1e6).toFixed(0)} MB`]);
    });

    const dir = await Deno.makeTempDir({ prefix: "image-test-" });
    const dataDir = join(dir, "data");
    await Deno.mkdir(dataDir);
    const crontab = join(dir, "crontab");
    await Deno.writeTextFile(crontab, await everyMinuteCrontab());
    // MinIO, not fauxqs: the image's replica lease needs S3's conditional writes.
    await using s3 = await startMinio("denokv-image-test");
    await using smtp = await startSmtpCapture();
    const port = freePort();
    const env = {
      DENO_KV_ACCESS_TOKEN: TEST_TOKEN,
      PORT: String(port),
      // Host network: keep every listener on loopback, away from other tests' ports.
      HOSTNAME_BIND: "127.0.0.1",
      DENOKV_URL: `http://127.0.0.1:${freePort()}`,
      APP_NAME: "image-test",
      // One machine, rebooted: the lease it held before the SIGKILL is its own.
      FLY_MACHINE_ID: "image-test-machine",
      ...s3.env(REPLICA_PATH),
      ...smtp.env(),
    };
    const bootOpts = {
      image: built.name,
      dataDir,
      port,
      env,
      volumes: [`${crontab}:/app/crontab:ro`],
    };
    let boot: Boot | undefined;
    try {
      await step("boot: supervisord from the image's entry point answers /healthz", async () => {
        boot = await bootImage(bootOpts);
        figures.push(["boot to first /healthz 200", `${(boot.readyMs / 1000).toFixed(1)} s`]);
        // The build's mounts (npm's CA config as /root) must leave nothing in the image.
        const root = (await buildah(["mount", boot.container])).stdout.trim();
        try {
          const home = [...Deno.readDirSync(join(root, "root"))].map((e) => e.name).sort();
          assert.deepEqual(home, [".bashrc", ".profile"]);
        } finally {
          await buildah(["umount", boot.container]);
        }
        const names = imageProcesses(boot).map((p) => role(p.cmd));
        for (
          const name of [
            "supervisord",
            "proxy (deno)",
            "litestream",
            "denokv",
            "supercronic",
            "watchdog + lease renewer (deno)",
          ]
        ) {
          assert.ok(names.includes(name), `${name} is not running: ${names.join(", ")}`);
        }
      });

      await step("a real KV Connect client: set, get, watch", async () => {
        const kv = await openRemoteKv(boot!.url);
        try {
          await kv.set(["image-watch"], "before");
          assert.equal((await kv.get(["image-watch"])).value, "before");
          const stream = kv.watch([["image-watch"]]);
          const reader = stream.getReader();
          assert.equal((await reader.read()).value?.[0].value, "before");
          await kv.set(["image-watch"], "after");
          assert.equal((await reader.read()).value?.[0].value, "after");
          await reader.cancel();
        } finally {
          kv.close();
        }
      });

      await step(
        "withQueues imported by URL from the image's /lib/ delivers a message",
        async () => {
          const message = await queueRoundTripByUrl(boot!.url, dir);
          assert.deepEqual(message, { hello: "from the image" });
        },
      );

      await step(`${KEYS} writes; resident memory of every process`, async () => {
        const kv = await openRemoteKv(boot!.url);
        try {
          await writeKeys(kv);
          assert.equal(await countKeys(kv), KEYS);
        } finally {
          kv.close();
        }
        let rss = 0, pss = 0;
        const rows: string[] = [];
        for (const p of imageProcesses(boot!)) {
          const mem = memoryKiB(p.pid);
          rss += mem.rss;
          pss += mem.pss;
          rows.push(
            `| ${role(p.cmd)} | ${(mem.rss / MiB).toFixed(1)} | ${(mem.pss / MiB).toFixed(1)} |`,
          );
        }
        console.log(
          [
            `\nmemory after ${KEYS} writes (MiB):`,
            "| process | RSS | PSS |",
            "| --- | ---: | ---: |",
            ...rows,
            `| **total** | ${(rss / MiB).toFixed(1)} | ${(pss / MiB).toFixed(1)} |`,
          ].join("\n"),
        );
        figures.push([
          `memory after ${KEYS} writes, total RSS / PSS`,
          `${(rss / MiB).toFixed(0)} / ${(pss / MiB).toFixed(0)} MiB`,
        ]);
      });

      await step(
        "the image's Supercronic runs the crontab's check line: a PASSED e-mail",
        async () => {
          await waitFor("a backup-check e-mail", () => smtp.messages.length > 0, {
            timeoutMs: 240_000,
            intervalMs: 500,
          }).catch((err) => {
            throw new Error(`${err.message}\n--- image output ---\n${boot!.runner.output}`);
          });
          const mail = smtp.messages[0];
          assert.match(mail.subject, /PASSED/, `${mail.subject}\n${mail.text}`);
        },
      );

      await step(
        "inside the image: restore --list, restore --at T --to a copy, rollback --at T",
        async () => {
          const { rollbackMs } = await checkPointInTimeRestore(boot!, s3, dataDir, REPLICA_PATH)
            .catch((err) => {
              throw new Error(`${err.message}\n--- image output ---\n${boot!.runner.output}`);
            });
          figures.push(["deno task rollback in the image", `${(rollbackMs / 1000).toFixed(1)} s`]);
        },
      );

      // After the rollback: the cold boot below also restores the rolled-back generation.
      await step(
        `SIGKILL of every process, /data wiped, cold boot: ${KEYS}/${KEYS} back`,
        async () => {
          await killBoot(boot!);
          await stopBoot(boot!);
          await Deno.remove(dataDir, { recursive: true });
          await Deno.mkdir(dataDir);
          boot = await bootImage(bootOpts);
          figures.push([
            "cold boot with restore to /healthz 200",
            `${(boot.readyMs / 1000).toFixed(1)} s`,
          ]);
          const kv = await openRemoteKv(boot.url);
          try {
            assert.equal(await countKeys(kv), KEYS);
            // The rolled-back state and the write after it, not B.
            assert.deepEqual(await pitrValues(kv), { A: "value A", C: "value C" });
          } finally {
            kv.close();
          }
        },
      );
    } finally {
      if (boot) await stopBoot(boot);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
      console.log(
        [
          "\nimage figures:",
          "| figure | value |",
          "| --- | --- |",
          ...figures.map(([k, v]) => `| ${k} | ${v} |`),
        ]
          .join("\n"),
      );
    }
  },
});
