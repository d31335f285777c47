/**
 * `deno task bench:copy`: entries per second of `scripts/transfer/kv_copy.ts` for
 * 100,000 small entries remote -> remote, each side the official denokv behind its proxy.
 * `COPY_BENCH_ENTRIES` changes the count, `COPY_BENCH_RUNS` the repetitions (median shown).
 */
import { join } from "node:path";
import { DENO, openRemoteKv, ROOT, startStack } from "../_helpers/processes.ts";

const TOKEN = "bench-token-0123456789";

async function main(): Promise<void> {
  const n = Number(Deno.env.get("COPY_BENCH_ENTRIES") ?? 100_000);
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`COPY_BENCH_ENTRIES: got ${n}`);
  const repeats = Number(Deno.env.get("COPY_BENCH_RUNS") ?? 3);
  if (!Number.isInteger(repeats) || repeats < 1) {
    throw new RangeError(`COPY_BENCH_RUNS: got ${repeats}`);
  }
  await using a = await startStack({ token: TOKEN });

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

  const runs: CopyRun[] = [];
  for (let r = 0; r < repeats; r++) {
    // A fresh, empty destination each time, so every run writes all n entries.
    await using b = await startStack({ token: TOKEN });
    runs.push(await copyOnce(a.proxy.url, b.proxy.url, join(b.dir, "bench.checkpoint.json")));
  }
  const median = (xs: number[]) => xs.toSorted((x, y) => x - y)[Math.floor(xs.length / 2)];
  const rate = (secs: number) => (n / secs).toFixed(0);
  console.log(
    `kv-copy remote -> remote through two proxies, ${n} small entries, ${repeats} runs\n`,
  );
  console.log("| phase | seconds per run | median entries/s |");
  console.log("| --- | --- | ---: |");
  const row = (name: string, xs: number[]) =>
    console.log(`| ${name} | ${xs.map((x) => x.toFixed(2)).join(", ")} | ${rate(median(xs))} |`);
  row("seed (client, 1000 per commit)", [seedSecs]);
  row("kv-copy: copy phase", runs.map((x) => x.copySecs));
  row("kv-copy: verify phase (both sides)", runs.map((x) => x.verifySecs));
  row("kv-copy: whole run incl. start-up", runs.map((x) => x.totalSecs));
}

interface CopyRun {
  copySecs: number;
  verifySecs: number;
  totalSecs: number;
}

async function copyOnce(from: string, to: string, checkpoint: string): Promise<CopyRun> {
  const t0 = performance.now();
  const out = await new Deno.Command(DENO, {
    args: [
      "run",
      "-A",
      "--unstable-kv",
      join(ROOT, "scripts/transfer/kv_copy.ts"),
      "--from",
      from,
      "--to",
      to,
      "--checkpoint",
      checkpoint,
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
  return {
    copySecs: Number(stderr.match(/copy took ([\d.]+) s/)?.[1]),
    verifySecs: Number(stderr.match(/verify took ([\d.]+) s/)?.[1]),
    totalSecs,
  };
}

if (import.meta.main) await main();
