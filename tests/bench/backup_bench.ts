/**
 * `deno task bench:backup [-- --entries N]`: time and memory of the nightly
 * check (scripts/backup_check/backup_check.ts) over a replicated database of N entries
 * (default 100,000, about 60 MB; `BACKUP_BENCH_ENTRIES` works too). Memory is
 * sampled from /proc every 50 ms: the check with its `litestream restore`
 * child summed, and that plus the running denokv and `litestream replicate`
 * (what the machine holds during the night, bar supervisord, the proxy, the
 * lease renewer and Supercronic).
 * Targets (issue 12): 1,000,000 entries restored and verified in <= 30 s with
 * the check and its restore child <= 150 MB.
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { startBackupFixture } from "../_helpers/fauxqs.ts";
import { startMinio } from "../_helpers/minio.ts";
import { DENO, KV_SERVER, ROOT } from "../_helpers/processes.ts";
import { readLatest } from "../../scripts/backup_check/history.ts";

/** About 500 bytes per entry makes 100,000 entries about 60 MB on disk. */
const PADDING = "p".repeat(440);
/** KV Connect takes at most 1000 mutations and 800 KiB per atomic write. */
const BATCH = 1000;
/** Commits in flight while seeding. */
const SEED_CONCURRENCY = 4;

/** Every process below `pid`, from /proc. */
function descendants(pid: number): number[] {
  const children = new Map<number, number[]>();
  for (const entry of Deno.readDirSync("/proc")) {
    if (!/^\d+$/.test(entry.name)) continue;
    try {
      const stat = Deno.readTextFileSync(`/proc/${entry.name}/stat`);
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      children.set(ppid, [...(children.get(ppid) ?? []), Number(entry.name)]);
    } catch { /* gone */ }
  }
  const out: number[] = [];
  const walk = (p: number) => {
    for (const c of children.get(p) ?? []) {
      out.push(c);
      walk(c);
    }
  };
  walk(pid);
  return out;
}

function rssKiB(pid: number): number {
  try {
    return Number(/VmRSS:\s+(\d+)/.exec(Deno.readTextFileSync(`/proc/${pid}/status`))?.[1] ?? 0);
  } catch {
    return 0;
  }
}

function comm(pid: number): string {
  try {
    return Deno.readTextFileSync(`/proc/${pid}/comm`).trim();
  } catch {
    return "";
  }
}

function mb(kib: number): string {
  return `${(kib / 1024).toFixed(0)} MB`;
}

function entriesOption(): number {
  const { values } = parseArgs({ args: Deno.args, options: { entries: { type: "string" } } });
  const raw = values.entries ?? Deno.env.get("BACKUP_BENCH_ENTRIES") ?? "100000";
  const n = Number(raw.replaceAll("_", "").replaceAll(",", ""));
  if (!Number.isInteger(n) || n < 1) {
    throw new RangeError(`"--entries" must be a positive integer: got ${JSON.stringify(raw)}`);
  }
  return n;
}

async function main(): Promise<void> {
  const n = entriesOption();
  const seedStart = performance.now();
  await using fx = await startBackupFixture(async (kv) => {
    let next = 0;
    const worker = async () => {
      while (next < n) {
        const from = next;
        next = Math.min(n, next + BATCH);
        const op = kv.atomic();
        for (let j = from; j < next; j++) op.set(["bench", j], { j, PADDING });
        if (!(await op.commit()).ok) throw new Error("seeding failed");
      }
    };
    await Promise.all(Array.from({ length: SEED_CONCURRENCY }, worker));
  }, { snapshotTimeoutMs: 600_000, startS3: () => startMinio("denokv-bench") });
  const snapshotSecs = (performance.now() - seedStart) / 1000;
  const { size } = await Deno.stat(fx.dbPath);

  const started = performance.now();
  const child = new Deno.Command(DENO, {
    args: ["run", "-A", join(ROOT, "scripts/backup_check/backup_check.ts")],
    cwd: ROOT,
    env: fx.env(),
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stack = [fx.denokv.child.pid, fx.litestream.child.pid];
  let checkPeak = 0;
  let restorePeak = 0;
  let machinePeak = 0;
  let stackAtCheckPeak = 0;
  const sample = () => {
    const tree = [child.pid, ...descendants(child.pid)];
    const check = tree.reduce((sum, p) => sum + rssKiB(p), 0);
    const restore = tree.filter((p) => comm(p) === "litestream").reduce((s, p) => s + rssKiB(p), 0);
    const stackNow = stack.reduce((sum, p) => sum + rssKiB(p), 0);
    if (check > checkPeak) {
      checkPeak = check;
      stackAtCheckPeak = stackNow;
    }
    restorePeak = Math.max(restorePeak, restore);
    machinePeak = Math.max(machinePeak, check + stackNow);
  };
  const timer = setInterval(sample, 50);
  const out = await child.output();
  clearInterval(timer);
  const wallSecs = (performance.now() - started) / 1000;
  const stderr = new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`the check failed (${out.code}):\n${stderr}`);
  const record = await readLatest(fx.dataDir);
  if (!record) throw new Error("no history line");
  const ms = (name: string) => record.checks.find((c) => c.name === name)?.ms ?? NaN;
  const s = (name: string) => (ms(name) / 1000).toFixed(2);
  const verifySecs = (ms("restore") + ms("integrity") + ms("contents")) / 1000;
  console.log(
    `backup check against the ${KV_SERVER} denokv, ${n} entries (${
      (size / 1024 / 1024).toFixed(1)
    } MB live db, seeded in ${snapshotSecs.toFixed(1)} s, first snapshot included):\n` +
      `  restore + integrity + contents: ${verifySecs.toFixed(2)} s ` +
      `(restore ${s("restore")} s, integrity ${s("integrity")} s, contents ${s("contents")} s)\n` +
      `  whole check: ${wallSecs.toFixed(2)} s wall, canary wait ${s("canary")} s\n` +
      `  peak RSS, check + its litestream restore child (summed): ${mb(checkPeak)} ` +
      `(restore child alone: ${mb(restorePeak)})\n` +
      `  peak RSS, check + restore + denokv + litestream replicate (summed): ${mb(machinePeak)} ` +
      `(denokv + replicate at the check's peak: ${mb(stackAtCheckPeak)})\n` +
      `  contents: ${record.checks.find((c) => c.name === "contents")?.detail}\n` +
      `  status: ${record.status}${record.failedStep ? ` at ${record.failedStep}` : ""}`,
  );
}

if (import.meta.main) await main();
