/**
 * `deno task bench:copy`: entries per second of `scripts/kv_copy.ts` for
 * 100,000 small entries remote -> remote, each side a stand-in behind its proxy.
 * `COPY_BENCH_ENTRIES` changes the count.
 */
import { join } from "node:path";
import { DENO, openRemoteKv, ROOT, startStack } from "../_helpers/processes.ts";

const TOKEN = "bench-token-0123456789";

async function main(): Promise<void> {
  const n = Number(Deno.env.get("COPY_BENCH_ENTRIES") ?? 100_000);
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`COPY_BENCH_ENTRIES: got ${n}`);
  await using a = await startStack({ token: TOKEN });
  await using b = await startStack({ token: TOKEN });

  const src = await openRemoteKv(a.proxy.url, TOKEN);
  const seedStart = performance.now();
  for (let i = 0; i < n; i += 1000) {
    const op = src.atomic();
    for (let j = i; j < Math.min(n, i + 1000); j++) {
      op.set(["bench", j], { id: j, name: `entry-${j}`, at: new Date(j) });
    }
    if (!(await op.commit()).ok) throw new Error("seeding failed");
  }
  const seedSecs = (performance.now() - seedStart) / 1000;
  src.close();

  const t0 = performance.now();
  const out = await new Deno.Command(DENO, {
    args: [
      "run",
      "-A",
      "--unstable-kv",
      join(ROOT, "scripts/kv_copy.ts"),
      "--from",
      a.proxy.url,
      "--to",
      b.proxy.url,
      "--checkpoint",
      join(a.dir, "bench.checkpoint.json"),
      "--progress-ms",
      "60000",
    ],
    env: { DENO_KV_ACCESS_TOKEN: TOKEN },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const totalSecs = (performance.now() - t0) / 1000;
  const stderr = new TextDecoder().decode(out.stderr);
  if (out.code !== 0 || !/verify ok: source (\d+) entries/.test(stderr)) {
    throw new Error(`kv-copy failed (${out.code}): ${stderr}`);
  }
  const copySecs = Number(stderr.match(/copy took ([\d.]+) s/)?.[1]);
  const verifySecs = Number(stderr.match(/verify took ([\d.]+) s/)?.[1]);
  const rows: [string, string, string][] = [
    ["seed (client, 1000/commit)", seedSecs.toFixed(2), (n / seedSecs).toFixed(0)],
    ["kv-copy: copy phase", copySecs.toFixed(2), (n / copySecs).toFixed(0)],
    ["kv-copy: verify phase (both sides)", verifySecs.toFixed(2), (n / verifySecs).toFixed(0)],
    ["kv-copy: whole run incl. start-up", totalSecs.toFixed(2), (n / totalSecs).toFixed(0)],
  ];
  console.log(`kv-copy remote -> remote through two proxies, ${n} small entries\n`);
  console.log("| phase | seconds | entries/s |");
  console.log("| --- | ---: | ---: |");
  for (const [phase, secs, rate] of rows) console.log(`| ${phase} | ${secs} | ${rate} |`);
}

if (import.meta.main) await main();
