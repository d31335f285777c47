/**
 * What the replica can restore: per Litestream generation, the oldest and
 * newest restorable time, read with the pinned Litestream's own `snapshots`
 * and `wal` commands (the same bounds its `restore -timestamp` goes by).
 */
import { join } from "node:path";
import { litestreamCredentials, restoreConfigYaml } from "../backup_check/replica.ts";
import type { S3Config } from "../backup_check/config.ts";

/** One generation: a continuous history that starts with a snapshot. */
export interface Generation {
  id: string;
  /** The first snapshot: nothing earlier can be restored from this generation. */
  oldest: Date;
  /** The newest snapshot or WAL segment uploaded. */
  newest: Date;
  snapshots: number;
  walSegments: number;
}

/** Everything the replica holds, newest generation last. */
export interface RestorableRange {
  generations: Generation[];
  /** Earliest restorable time over all generations, if any. */
  oldest?: Date;
  /** Latest restorable time over all generations, if any. */
  newest?: Date;
}

/**
 * Parses Litestream 0.3's tables (`snapshots`, `wal`): a header row, then
 * whitespace-separated columns. Returns one record per row keyed by header.
 */
export function parseTable(text: string): Record<string, string>[] {
  const lines = text.split("\n").map((l) => l.trim()).filter((l) => l !== "");
  if (lines.length === 0) return [];
  const header = lines[0].split(/\s+/);
  return lines.slice(1).map((line) => {
    const cells = line.split(/\s+/);
    return Object.fromEntries(header.map((name, i) => [name, cells[i] ?? ""]));
  });
}

/**
 * Folds `snapshots` and `wal` rows into generations, as Litestream's
 * `GenerationTimeBounds` does, but starting at the first snapshot: a
 * timestamp before it has nothing to restore from.
 */
export function rangeFromTables(
  snapshots: Record<string, string>[],
  wal: Record<string, string>[],
): RestorableRange {
  const byId = new Map<string, Generation>();
  const at = (row: Record<string, string>) => {
    const time = new Date(row.created);
    if (Number.isNaN(time.getTime())) {
      throw new Error(`litestream printed an unreadable time: got "${row.created}"`);
    }
    return time;
  };
  for (const row of snapshots) {
    const time = at(row);
    const g = byId.get(row.generation);
    if (!g) {
      byId.set(row.generation, {
        id: row.generation,
        oldest: time,
        newest: time,
        snapshots: 1,
        walSegments: 0,
      });
      continue;
    }
    g.snapshots++;
    if (time < g.oldest) g.oldest = time;
    if (time > g.newest) g.newest = time;
  }
  for (const row of wal) {
    const g = byId.get(row.generation);
    // WAL without a snapshot cannot be restored (Litestream prunes such leftovers).
    if (!g) continue;
    g.walSegments++;
    const time = at(row);
    if (time > g.newest) g.newest = time;
  }
  const generations = [...byId.values()].sort((a, b) => a.newest.getTime() - b.newest.getTime());
  const oldest = generations.reduce<Date | undefined>(
    (min, g) => (!min || g.oldest < min ? g.oldest : min),
    undefined,
  );
  return { generations, oldest, newest: generations.at(-1)?.newest };
}

/** Runs one read-only Litestream command against the replica; returns stdout or throws. */
async function litestream(
  sub: "snapshots" | "wal",
  opts: { litestreamBin: string; dbPath: string; s3: S3Config; env?: Record<string, string> },
): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "restore-list-" });
  try {
    const configPath = join(dir, "litestream.yml");
    await Deno.writeTextFile(configPath, restoreConfigYaml(opts.dbPath, opts.s3), { mode: 0o600 });
    const out = await new Deno.Command(opts.litestreamBin, {
      args: [sub, "-config", configPath, opts.dbPath],
      env: litestreamCredentials(opts.s3, opts.env),
      stdout: "piped",
      stderr: "piped",
    }).output();
    const decoder = new TextDecoder();
    if (!out.success) {
      throw new Error(
        `litestream ${sub} exited ${out.code}: ${decoder.decode(out.stderr).trim()}`,
      );
    }
    return decoder.decode(out.stdout);
  } finally {
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Lists what the replica of `dbPath` can restore, with the pinned Litestream. */
export async function restorableRange(
  opts: { litestreamBin: string; dbPath: string; s3: S3Config; env?: Record<string, string> },
): Promise<RestorableRange> {
  const [snapshots, wal] = await Promise.all([
    litestream("snapshots", opts),
    litestream("wal", opts),
  ]);
  return rangeFromTables(parseTable(snapshots), parseTable(wal));
}

/** The generation whose range holds `at`, newest first (as Litestream chooses), or undefined. */
export function generationAt(range: RestorableRange, at: Date): Generation | undefined {
  return range.generations.findLast((g) => g.oldest <= at && at <= g.newest);
}

/** Human lines for `restore --list`. */
export function formatRange(range: RestorableRange): string {
  if (range.generations.length === 0) return "nothing to restore: the replica has no snapshot";
  const lines = [
    `restorable from ${range.oldest!.toISOString()} to ${range.newest!.toISOString()}`,
    "",
    "generation        oldest                    newest                    snapshots  wal",
  ];
  for (const g of range.generations) {
    lines.push(
      `${g.id.padEnd(17)} ${g.oldest.toISOString().padEnd(25)} ${
        g.newest.toISOString().padEnd(25)
      } ${String(g.snapshots).padStart(9)}  ${g.walSegments}`,
    );
  }
  return lines.join("\n");
}
