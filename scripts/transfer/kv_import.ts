/**
 * `deno task kv-import <url|path> < dump.ndjson`: writes the entries of a
 * kv-export dump in limit-aware atomic batches, keeping existing keys unless
 * `--overwrite`, and reads every written entry back to verify it.
 */
import { parseArgs } from "node:util";
import { createHash } from "node:crypto";
import {
  encodeValue,
  fail,
  intOption,
  type KvLocation,
  lineToEntry,
  MAX_GET_MANY,
  MAX_MUTATIONS,
  oneLine,
  onlyLocation,
  openLocation,
  Progress,
  writeEntries,
} from "./kv_transfer.ts";

const USAGE = `usage: kv-import [--overwrite] [--dry-run] [--token-env NAME] [--input FILE]
                 [--progress-ms MS] <url|path> < dump.ndjson`;

/** Validated options of one kv-import run. */
export interface ImportConfig {
  dest: KvLocation;
  token?: string;
  input?: string;
  overwrite: boolean;
  dryRun: boolean;
  progressMs: number;
}

/** Parses and validates the command line and the environment. */
export function loadConfig(args: string[], env: Record<string, string>): ImportConfig {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      "token-env": { type: "string", default: "DENO_KV_ACCESS_TOKEN" },
      input: { type: "string", short: "i" },
      overwrite: { type: "boolean", default: false },
      "dry-run": { type: "boolean", default: false },
      "progress-ms": { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    Deno.exit(0);
  }
  const { location: dest, token } = onlyLocation(positionals, env, values["token-env"]);
  const progressMs = intOption("progress-ms", values["progress-ms"], 5000, 0);
  return {
    dest,
    token,
    input: values.input,
    overwrite: values.overwrite,
    dryRun: values["dry-run"],
    progressMs,
  };
}

async function* lines(input: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let rest = "";
  for await (const chunk of input.pipeThrough(new TextDecoderStream())) {
    rest += chunk;
    const parts = rest.split("\n");
    rest = parts.pop()!;
    yield* parts;
  }
  if (rest !== "") yield rest;
}

/** Reads entries back and counts those that differ from what was written. */
async function readBack(kv: Deno.Kv, batch: { key: Deno.KvKey; value: unknown }[]) {
  let differ = 0;
  for (let i = 0; i < batch.length; i += MAX_GET_MANY) {
    const part = batch.slice(i, i + MAX_GET_MANY);
    const got = await kv.getMany(part.map((e) => e.key));
    got.forEach((e, j) => {
      const want = JSON.stringify(encodeValue(part[j].value));
      if (e.versionstamp === null || JSON.stringify(encodeValue(e.value)) !== want) differ++;
    });
  }
  return differ;
}

/** Imports from `input`; prints progress and a summary on stderr. Returns the exit code. */
export async function runImport(
  cfg: ImportConfig,
  input: ReadableStream<Uint8Array>,
): Promise<number> {
  const kv = await openLocation(cfg.dest, { token: cfg.token }).catch((err) => {
    throw new Error(`cannot open ${cfg.dest.spec}: ${err.message ?? err}`);
  });
  const verb = cfg.dryRun ? "kv-import (dry run)" : "kv-import";
  const progress = new Progress(verb, cfg.progressMs);
  const hash = createHash("sha256");
  const totals = { read: 0, written: 0, identical: 0, skipped: 0, bytes: 0, differ: 0 };
  let lineNo = 0;
  let batch: { key: Deno.KvKey; value: unknown }[] = [];
  const flush = async () => {
    const res = await writeEntries(kv, batch, { overwrite: cfg.overwrite, dryRun: cfg.dryRun });
    totals.written += res.written;
    totals.identical += res.identical;
    totals.skipped += res.skipped;
    totals.bytes += res.bytes;
    if (!cfg.dryRun && (res.written > 0)) {
      // Entries that were skipped keep their own value; read back only what this run owns.
      totals.differ += cfg.overwrite || res.skipped === 0 ? await readBack(kv, batch) : 0;
    }
    batch = [];
    progress.update(totals.read, totals.bytes);
  };
  try {
    for await (const line of lines(input)) {
      lineNo++;
      if (line.trim() === "") continue;
      try {
        batch.push(lineToEntry(line));
      } catch (err) {
        throw new Error(`line ${lineNo}: ${oneLine(err)}`);
      }
      hash.update(line + "\n");
      totals.read++;
      if (batch.length === MAX_MUTATIONS) await flush();
    }
    await flush();
  } finally {
    kv.close();
  }
  progress.update(totals.read, totals.bytes, true);
  progress.done();
  const would = cfg.dryRun ? "would write" : "wrote";
  console.error(
    `kv-import: read ${totals.read} entries (sha256 ${hash.digest("hex")}); ${would} ` +
      `${totals.written}; ${totals.identical} already identical; ${totals.skipped} skipped ` +
      `(existing key with a different value${cfg.overwrite ? "" : ", use --overwrite to replace"})`,
  );
  if (cfg.dryRun) return 0;
  if (totals.differ > 0) {
    console.error(`kv-import: verify MISMATCH: ${totals.differ} entries read back differently`);
    return 3;
  }
  console.error(`kv-import: verify ok: ${totals.written + totals.identical} entries read back`);
  return 0;
}

if (import.meta.main) {
  let cfg: ImportConfig;
  try {
    cfg = loadConfig(Deno.args, Deno.env.toObject());
  } catch (err) {
    fail("kv-import", err, 2);
  }
  try {
    let input: ReadableStream<Uint8Array> = Deno.stdin.readable;
    if (cfg.input) {
      const file = await Deno.open(cfg.input, { read: true }).catch((err) => {
        throw new Error(`cannot read ${cfg.input}: ${err.message}`);
      });
      input = file.readable;
    }
    Deno.exit(await runImport(cfg, input));
  } catch (err) {
    fail("kv-import", err);
  }
}
