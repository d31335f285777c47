/**
 * `deno task kv-copy --from <url|path> --to <url|path>`: copies every entry
 * (or those under `--prefix`) between two Deno KV databases, resumably, then
 * verifies counts and a digest on both sides.
 */
import { parseArgs } from "node:util";
import { createHash } from "node:crypto";
import {
  countEntries,
  DEFAULT_PAGE_SIZE,
  digest,
  encodeKey,
  fail,
  intOption,
  type KvLocation,
  openLocation,
  parseLocation,
  parsePrefix,
  Progress,
  readPages,
  tokenFor,
  writeEntries,
} from "./kv_transfer.ts";

const USAGE = `usage: kv-copy --from <url|path> --to <url|path> [--prefix k1,k2]... [--dry-run]
               [--resume] [--overwrite] [--from-token-env NAME] [--to-token-env NAME]
               [--checkpoint FILE] [--page-size N] [--progress-ms MS] [--no-verify]

  A URL (http/https) is a KV Connect server; its token comes from the variable
  named by --from-token-env / --to-token-env (default DENO_KV_ACCESS_TOKEN).
  Anything else is a local SQLite file; a source file must exist.
  --prefix: comma-separated string parts, or a JSON key with kv-export's tags
  ('["users", {"$":"bigint","v":"5"}]'); repeatable. As with kv.list(), the
  key equal to the prefix itself is not included.
  Existing destination keys are kept (and counted as skipped) unless --overwrite.
  The checkpoint (default .kv-copy-<id>.checkpoint.json in the working
  directory) is written after every committed page and removed after a
  successful verify; --resume continues after it.
  Exit codes: 0 done and verified, 1 error, 2 bad options, 3 verify mismatch.`;

/** Validated options of one kv-copy run. */
export interface CopyConfig {
  from: KvLocation;
  to: KvLocation;
  fromToken?: string;
  toToken?: string;
  prefixes: Deno.KvKey[];
  dryRun: boolean;
  resume: boolean;
  overwrite: boolean;
  verify: boolean;
  checkpoint: string;
  pageSize: number;
  progressMs: number;
}

/** Parses and validates the command line and the environment. */
export function loadConfig(args: string[], env: Record<string, string>): CopyConfig {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      from: { type: "string" },
      to: { type: "string" },
      prefix: { type: "string", multiple: true },
      "dry-run": { type: "boolean", default: false },
      resume: { type: "boolean", default: false },
      overwrite: { type: "boolean", default: false },
      "no-verify": { type: "boolean", default: false },
      "from-token-env": { type: "string", default: "DENO_KV_ACCESS_TOKEN" },
      "to-token-env": { type: "string", default: "DENO_KV_ACCESS_TOKEN" },
      checkpoint: { type: "string" },
      "page-size": { type: "string" },
      "progress-ms": { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    Deno.exit(0);
  }
  if (positionals.length) throw new TypeError(`unexpected argument: ${positionals[0]}; see --help`);
  if (!values.from) throw new TypeError(`"--from" is required; see --help`);
  if (!values.to) throw new TypeError(`"--to" is required; see --help`);
  const from = parseLocation(values.from);
  const to = parseLocation(values.to);
  if (from.spec === to.spec) throw new TypeError(`"--from" and "--to" are the same: ${from.spec}`);
  const prefixes = (values.prefix ?? []).map(parsePrefix);
  if (prefixes.length === 0) prefixes.push([]);
  const id = createHash("sha256")
    .update(JSON.stringify([from.spec, to.spec, prefixes.map(encodeKey)]))
    .digest("hex").slice(0, 12);
  return {
    from,
    to,
    fromToken: tokenFor(from, env, values["from-token-env"]),
    toToken: tokenFor(to, env, values["to-token-env"]),
    prefixes,
    dryRun: values["dry-run"],
    resume: values.resume,
    overwrite: values.overwrite,
    verify: !values["no-verify"],
    checkpoint: values.checkpoint ?? `.kv-copy-${id}.checkpoint.json`,
    pageSize: intOption("page-size", values["page-size"], DEFAULT_PAGE_SIZE, 1),
    progressMs: intOption("progress-ms", values["progress-ms"], 5000, 0),
  };
}

/** What a checkpoint file holds: where the last committed page ended. */
interface Checkpoint {
  from: string;
  to: string;
  prefixes: unknown;
  prefixIndex: number;
  cursor?: string;
  written: number;
  identical: number;
  skipped: number;
  bytes: number;
}

async function readCheckpoint(cfg: CopyConfig): Promise<Checkpoint | null> {
  let text: string;
  try {
    text = await Deno.readTextFile(cfg.checkpoint);
  } catch (err) {
    if (err instanceof Deno.errors.NotFound) return null;
    throw err;
  }
  const cp = JSON.parse(text) as Checkpoint;
  const same = cp.from === cfg.from.spec && cp.to === cfg.to.spec &&
    JSON.stringify(cp.prefixes) === JSON.stringify(cfg.prefixes.map(encodeKey));
  if (!same) throw new TypeError(`checkpoint ${cfg.checkpoint} belongs to another copy`);
  return cp;
}

async function writeCheckpoint(path: string, cp: Checkpoint): Promise<void> {
  // Write then rename so that a kill never leaves half a checkpoint.
  const tmp = `${path}.tmp`;
  await Deno.writeTextFile(tmp, JSON.stringify(cp));
  await Deno.rename(tmp, path);
}

/** Runs a copy; prints progress and a summary to stderr. Returns the exit code. */
export async function runCopy(cfg: CopyConfig): Promise<number> {
  let cp: Checkpoint | null = null;
  if (cfg.resume) {
    cp = await readCheckpoint(cfg);
    if (!cp) {
      console.error(`kv-copy: no checkpoint at ${cfg.checkpoint}: starting from the beginning`);
    }
  }
  // The source first: a missing source must not create an empty destination file.
  const src = await openLocation(cfg.from, { token: cfg.fromToken, mustExist: true })
    .catch((err) => {
      throw new Error(`cannot open source ${cfg.from.spec}: ${err.message ?? err}`);
    });
  let dst: Deno.Kv | undefined;
  try {
    dst = await openLocation(cfg.to, { token: cfg.toToken }).catch((err) => {
      throw new Error(`cannot open destination ${cfg.to.spec}: ${err.message ?? err}`);
    });
    const state: Checkpoint = cp ?? {
      from: cfg.from.spec,
      to: cfg.to.spec,
      prefixes: cfg.prefixes.map(encodeKey),
      prefixIndex: 0,
      written: 0,
      identical: 0,
      skipped: 0,
      bytes: 0,
    };
    if (cp) {
      console.error(
        `kv-copy: resuming after ${
          cp.written + cp.identical + cp.skipped
        } entries (${cfg.checkpoint})`,
      );
    }
    const verb = cfg.dryRun ? "kv-copy (dry run)" : "kv-copy";
    // On a terminal, one extra read pass gives the ETA a total.
    let total: number | undefined;
    if (Deno.stderr.isTerminal() && !cp) total = await countEntries(src, cfg.prefixes);
    const progress = new Progress(verb, cfg.progressMs, total);
    const t0 = performance.now();
    for (; state.prefixIndex < cfg.prefixes.length; state.prefixIndex++, state.cursor = undefined) {
      const prefix = cfg.prefixes[state.prefixIndex];
      const pages = readPages(src, prefix, { cursor: state.cursor, pageSize: cfg.pageSize });
      // Read the next page while the current one is written.
      let next = pages.next();
      while (true) {
        const step = await next;
        if (step.done) break;
        next = pages.next();
        next.catch(() => {}); // surfaced by the await above; not an unhandled rejection meanwhile
        const page = step.value;
        const res = await writeEntries(dst, page.entries, {
          overwrite: cfg.overwrite,
          dryRun: cfg.dryRun,
          sorted: true,
        });
        state.written += res.written;
        state.identical += res.identical;
        state.skipped += res.skipped;
        state.bytes += res.bytes;
        state.cursor = page.cursor;
        if (!cfg.dryRun) await writeCheckpoint(cfg.checkpoint, state);
        progress.update(state.written + state.identical + state.skipped, state.bytes);
      }
    }
    progress.update(state.written + state.identical + state.skipped, state.bytes, true);
    progress.done();
    const copySecs = (performance.now() - t0) / 1000;
    const would = cfg.dryRun ? "would write" : "wrote";
    console.error(
      `kv-copy: ${would} ${state.written} entries; ${state.identical} already identical; ` +
        `${state.skipped} skipped (existing key with a different value${
          cfg.overwrite ? "" : ", use --overwrite to replace"
        }); copy took ${copySecs.toFixed(2)} s`,
    );
    if (cfg.dryRun || !cfg.verify) return 0;
    const t1 = performance.now();
    const [a, b] = await Promise.all([digest(src, cfg.prefixes), digest(dst, cfg.prefixes)]);
    const ok = a.count === b.count && a.sha256 === b.sha256;
    console.error(
      `kv-copy: verify ${ok ? "ok" : "MISMATCH"}: source ${a.count} entries sha256 ${a.sha256}; ` +
        `destination ${b.count} entries sha256 ${b.sha256}; verify took ${
          ((performance.now() - t1) / 1000).toFixed(2)
        } s`,
    );
    if (ok) {
      await Deno.remove(cfg.checkpoint).catch(() => {});
      return 0;
    }
    if (state.skipped > 0) {
      console.error(`kv-copy: the difference includes the ${state.skipped} skipped entries`);
    }
    return 3;
  } finally {
    src.close();
    dst?.close();
  }
}

if (import.meta.main) {
  let cfg: CopyConfig;
  try {
    cfg = loadConfig(Deno.args, Deno.env.toObject());
  } catch (err) {
    fail("kv-copy", err, 2);
  }
  try {
    Deno.exit(await runCopy(cfg));
  } catch (err) {
    fail("kv-copy", err);
  }
}
