/**
 * `deno task bench:backup`: restore plus full verification time and peak memory
 * of scripts/backup_check.ts for a replicated database of 100,000 entries
 * (about 50 MB). `BACKUP_BENCH_ENTRIES` changes the count.
 * Target (issue 5): under 10 s and under 150 MB.
 */
import { join } from "node:path";
import { startBackupFixture } from "../_helpers/fauxqs.ts";
import { DENO, ROOT } from "../_helpers/processes.ts";
import { readLatest } from "../../scripts/backup_check/history.ts";

/** About 500 bytes per entry makes 100,000 entries about 50 MB on disk. */
const PADDING = "p".repeat(440);
/** KV Connect takes at most 1000 mutations and 800 KiB per atomic write. */
const BATCH = 1000;

async function main(): Promise<void> {
  const n = Number(Deno.env.get("BACKUP_BENCH_ENTRIES") ?? 100_000);
  if (!Number.isInteger(n) || n < 1) throw new RangeError(`BACKUP_BENCH_ENTRIES: got ${n}`);
  const seedStart = performance.now();
  await using fx = await startBackupFixture(async (kv) => {
    for (let i = 0; i < n; i += BATCH) {
      const op = kv.atomic();
      for (let j = i; j < Math.min(n, i + BATCH); j++) op.set(["bench", j], { j, PADDING });
      if (!(await op.commit()).ok) throw new Error("seeding failed");
    }
  });
  const seedSecs = (performance.now() - seedStart) / 1000;
  const { size } = await Deno.stat(fx.dbPath);
  // GNU time's %M is the peak RSS of the check or of any child it waited for (litestream).
  const out = await new Deno.Command("/usr/bin/time", {
    args: ["-f", "BENCH_TIME %e %M", DENO, "run", "-A", join(ROOT, "scripts/backup_check.ts")],
    cwd: ROOT,
    env: fx.env(),
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  const m = /BENCH_TIME ([\d.]+) (\d+)/.exec(stderr);
  if (!out.success || !m) throw new Error(`the check failed (${out.code}):\n${stderr}`);
  const record = await readLatest(fx.dataDir);
  if (!record) throw new Error("no history line");
  const ms = (name: string) => record.checks.find((c) => c.name === name)?.ms ?? NaN;
  const verifySecs = (ms("restore") + ms("integrity") + ms("contents")) / 1000;
  console.log(
    `backup check, ${n} entries (${(size / 1024 / 1024).toFixed(1)} MB live db, seeded in ${
      seedSecs.toFixed(1)
    } s):\n` +
      `  restore + integrity + contents: ${verifySecs.toFixed(2)} s ` +
      `(restore ${(ms("restore") / 1000).toFixed(2)} s, integrity ${
        (ms("integrity") / 1000).toFixed(2)
      } s, contents ${(ms("contents") / 1000).toFixed(2)} s)\n` +
      `  whole check: ${m[1]} s wall, canary wait ${(ms("canary") / 1000).toFixed(2)} s\n` +
      `  peak RSS: ${(Number(m[2]) / 1024).toFixed(0)} MB (largest single process)\n` +
      `  status: ${record.status}${record.failedStep ? ` at ${record.failedStep}` : ""}`,
  );
}

if (import.meta.main) await main();
