/**
 * `deno task kv-export [--prefix k1,k2] <url|path> > dump.ndjson`: writes every
 * entry as one JSON line `{"key":[...],"value":...}` in key order (the format
 * is described in scripts/transfer/kv_transfer.ts, `encodeValue`).
 */
import { parseArgs } from "node:util";
import { createHash } from "node:crypto";
import {
  DEFAULT_PAGE_SIZE,
  entryToLine,
  fail,
  intOption,
  type KvLocation,
  onlyLocation,
  openLocation,
  parsePrefix,
  Progress,
  readPages,
} from "./kv_transfer.ts";

const USAGE = `usage: kv-export [--prefix k1,k2]... [--token-env NAME] [--output FILE]
                 [--page-size N] [--progress-ms MS] <url|path> > dump.ndjson`;

/** Validated options of one kv-export run. */
export interface ExportConfig {
  source: KvLocation;
  token?: string;
  prefixes: Deno.KvKey[];
  output?: string;
  pageSize: number;
  progressMs: number;
}

/** Parses and validates the command line and the environment. */
export function loadConfig(args: string[], env: Record<string, string>): ExportConfig {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      prefix: { type: "string", multiple: true },
      "token-env": { type: "string", default: "DENO_KV_ACCESS_TOKEN" },
      output: { type: "string", short: "o" },
      "page-size": { type: "string" },
      "progress-ms": { type: "string" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    Deno.exit(0);
  }
  const { location: source, token } = onlyLocation(positionals, env, values["token-env"]);
  const prefixes = (values.prefix ?? []).map(parsePrefix);
  if (prefixes.length === 0) prefixes.push([]);
  return {
    source,
    token,
    prefixes,
    output: values.output,
    pageSize: intOption("page-size", values["page-size"], DEFAULT_PAGE_SIZE, 1),
    progressMs: intOption("progress-ms", values["progress-ms"], 5000, 0),
  };
}

/** Streams the export to `out`; prints progress and a summary on stderr. */
export async function runExport(
  cfg: ExportConfig,
  out: WritableStream<Uint8Array>,
): Promise<number> {
  const kv = await openLocation(cfg.source, { token: cfg.token, mustExist: true }).catch((err) => {
    throw new Error(`cannot open ${cfg.source.spec}: ${err.message ?? err}`);
  });
  const writer = out.getWriter();
  const enc = new TextEncoder();
  const hash = createHash("sha256");
  const progress = new Progress("kv-export", cfg.progressMs);
  let count = 0;
  let bytes = 0;
  try {
    for (const prefix of cfg.prefixes) {
      for await (const page of readPages(kv, prefix, { pageSize: cfg.pageSize })) {
        let chunk = "";
        for (const e of page.entries) chunk += entryToLine(e.key, e.value) + "\n";
        hash.update(chunk);
        const data = enc.encode(chunk);
        await writer.write(data);
        count += page.entries.length;
        bytes += data.byteLength;
        progress.update(count, bytes);
      }
    }
    await writer.close();
  } finally {
    kv.close();
  }
  progress.done();
  console.error(`kv-export: ${count} entries, sha256 ${hash.digest("hex")}`);
  return 0;
}

if (import.meta.main) {
  let cfg: ExportConfig;
  try {
    cfg = loadConfig(Deno.args, Deno.env.toObject());
  } catch (err) {
    fail("kv-export", err, 2);
  }
  try {
    let out: WritableStream<Uint8Array> = Deno.stdout.writable;
    if (cfg.output) {
      const file = await Deno.open(cfg.output, { write: true, create: true, truncate: true });
      out = file.writable;
    }
    Deno.exit(await runExport(cfg, out));
  } catch (err) {
    fail("kv-export", err);
  }
}
