/**
 * Start-up check that the database on the volume is not older than the
 * replica (a volume restored from an older Fly snapshot): compares the local
 * Litestream position (generation, WAL index, shadow WAL size) with the
 * replica's WAL segments, as `litestream wal` lists them.
 */
import { existsSync, readdirSync, readFileSync, statSync } from "node:fs";
import { basename, dirname, join } from "node:path";

/** One WAL segment of the replica (a row of `litestream wal`). */
export interface ReplicaSegment {
  generation: string;
  index: number;
  /** Offset of the segment in its WAL (uncompressed bytes). */
  offset: number;
  /** When the replica stored it. */
  created: number;
}

/** Where Litestream last was on this volume. */
export interface LocalPosition {
  generation: string;
  /** Highest shadow WAL index. */
  index: number;
  /** Size of that shadow WAL file: the local end within the index. */
  size: number;
  /** Last change of the database or its WAL (ms since epoch). */
  modified: number;
}

/** Parses `litestream wal` output (replica, generation, index, offset, size, created). */
export function parseWalList(text: string): ReplicaSegment[] {
  const out: ReplicaSegment[] = [];
  for (const line of text.split("\n")) {
    const f = line.trim().split(/\s+/);
    if (f.length < 6 || f[0] === "replica" || !/^[0-9a-f]{16}$/.test(f[1])) continue;
    out.push({
      generation: f[1],
      index: Number(f[2]),
      offset: Number(f[3]),
      created: Date.parse(f[5]),
    });
  }
  return out;
}

/** Litestream's state folder of a database: `.<name>-litestream` beside it. */
export function litestreamMetaDir(dbPath: string): string {
  return join(dirname(dbPath), `.${basename(dbPath)}-litestream`);
}

/** Reads the local position from Litestream's state folder, or null when there is none. */
export function localPosition(dbPath: string): LocalPosition | null {
  const meta = litestreamMetaDir(dbPath);
  const genFile = join(meta, "generation");
  if (!existsSync(genFile)) return null;
  const generation = readFileSync(genFile, "utf8").trim();
  const walDir = join(meta, "generations", generation, "wal");
  let index = -1;
  let size = 0;
  if (existsSync(walDir)) {
    for (const name of readdirSync(walDir)) {
      const m = /^([0-9a-f]{8})\.wal$/.exec(name);
      if (!m) continue;
      const i = parseInt(m[1], 16);
      if (i > index) {
        index = i;
        size = statSync(join(walDir, name)).size;
      }
    }
  }
  const modified = Math.max(
    ...[dbPath, dbPath + "-wal"].filter(existsSync).map((p) => statSync(p).mtimeMs),
  );
  return { generation, index, size, modified };
}

/** The verdict on the local database. */
export type Freshness =
  | { older: false; reason: string }
  | { older: true; reason: string };

/** Slack for clocks and Litestream's 1 s sync when only times can be compared. */
const TIME_SLACK_MS = 60_000;

/**
 * Decides whether the replica holds writes the local database lacks. Within
 * the local generation, by position: a replica segment at or past the local
 * shadow WAL's end is newer. A later generation in the replica is newer.
 * A generation the replica does not know (its retention dropped it, or a
 * crash came before the first upload) is judged by time.
 */
export function compareWithReplica(
  local: LocalPosition,
  segments: ReplicaSegment[],
): Freshness {
  if (segments.length === 0) return { older: false, reason: "the replica has no WAL yet" };
  const latest = segments.reduce((a, b) => b.created > a.created ? b : a);
  const mine = segments.filter((s) => s.generation === local.generation);
  if (mine.length > 0) {
    const end = mine.reduce((a, b) =>
      b.index > a.index || (b.index === a.index && b.offset > a.offset) ? b : a
    );
    if (end.index > local.index || (end.index === local.index && end.offset >= local.size)) {
      return {
        older: true,
        reason: `the local database is older than the replica: generation ${local.generation} ` +
          `is at WAL ${local.index}:${local.size} here and ${end.index}:${end.offset}+ in the replica`,
      };
    }
    const lastOfMine = Math.max(...mine.map((s) => s.created));
    if (latest.generation !== local.generation && latest.created > lastOfMine) {
      return {
        older: true,
        reason: `the local database is older than the replica: the replica moved on to ` +
          `generation ${latest.generation} after ${local.generation}`,
      };
    }
    return { older: false, reason: `the local database is at or past the replica` };
  }
  if (latest.created > local.modified + TIME_SLACK_MS) {
    return {
      older: true,
      reason: `the local database is older than the replica: its generation ` +
        `${local.generation} is not in the replica, whose newest WAL ` +
        `(${new Date(latest.created).toISOString()}) is newer than its last change ` +
        `(${new Date(local.modified).toISOString()})`,
    };
  }
  return { older: false, reason: "the local database is newer than anything in the replica" };
}
