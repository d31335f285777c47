/**
 * `deno task restore`: `--list` prints what the replica can restore (per
 * generation, the oldest and newest time); `--at <ISO time> --to <file>`
 * restores the state at that time into a new file and verifies it. The live
 * database is never touched (see `rollback.ts` for that).
 */
import { parseArgs } from "node:util";
import { isAbsolute, resolve } from "node:path";
import { loadConfig } from "../backup_check/config.ts";
import { formatRange, restorableRange } from "./replica_range.ts";
import { parseAt, restoreAt } from "./restore_at.ts";

const USAGE = `usage: deno task restore --list
       deno task restore --at <ISO time> --to <new file>`;

/** Runs the command; returns the exit code. */
export async function main(
  args: string[],
  env: Record<string, string | undefined>,
): Promise<number> {
  let flags: { list?: boolean; at?: string; to?: string; help?: boolean };
  try {
    flags = parseArgs({
      args,
      options: {
        list: { type: "boolean" },
        at: { type: "string" },
        to: { type: "string" },
        help: { type: "boolean", short: "h" },
      },
    }).values;
  } catch (err) {
    console.error(`restore: ${err instanceof Error ? err.message : err}\n${USAGE}`);
    return 2;
  }
  if (flags.help) {
    console.log(USAGE);
    return 0;
  }
  if (!flags.list && !(flags.at && flags.to)) {
    console.error(`restore: give --list, or both --at and --to\n${USAGE}`);
    return 2;
  }
  try {
    const config = loadConfig(env);
    const base = { litestreamBin: config.litestreamBin, dbPath: config.dbPath, s3: config.s3 };
    if (flags.list) {
      console.log(formatRange(await restorableRange(base)));
      return 0;
    }
    const at = parseAt(flags.at);
    const to = isAbsolute(flags.to!) ? flags.to! : resolve(flags.to!);
    const copy = await restoreAt({ ...base, at, outPath: to });
    console.log(
      `restored the state at ${at.toISOString()} (generation ${copy.generation}) to ${copy.path}: ` +
        `${copy.bytes} bytes, ${copy.entries} entries, ${copy.integrity}, ` +
        `${(copy.ms / 1000).toFixed(1)} s`,
    );
    return 0;
  } catch (err) {
    console.error(`restore: ${err instanceof Error ? err.message : err}`);
    return 1;
  }
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args, Deno.env.toObject()));
}
