/**
 * `deno task bench`: runs every benchmark script under tests/bench/ in turn
 * (each boots its own processes) and prints their tables.
 */
import { fileURLToPath } from "node:url";
import { join } from "node:path";

const here = fileURLToPath(new URL(".", import.meta.url));
const only = Deno.args;
const scripts = [...Deno.readDirSync(here)]
  .map((e) => e.name)
  .filter((n) => n.endsWith("_bench.ts"))
  .filter((n) => only.length === 0 || only.some((o) => n.startsWith(o)))
  .sort();
let failed = 0;
for (const name of scripts) {
  console.log(`\n# ${name}\n`);
  const { code } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", join(here, name)],
    stdout: "inherit",
    stderr: "inherit",
  }).output();
  if (code !== 0) {
    console.error(`${name} exited ${code}`);
    failed++;
  }
}
Deno.exit(failed ? 1 : 0);
