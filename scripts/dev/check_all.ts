/**
 * `deno task ok`: everything `npm test` checks after the installs. The image
 * test (`test:image`) mostly waits on buildah's disk work and the test files
 * mostly wait on the processes they boot, so the image test runs beside the
 * rest from the start (its output goes to `.data/test-image.log` and is printed
 * when it ends) and `deno task test` runs its files in parallel. A failure of
 * any part fails the whole run; every part runs to its end either way.
 */
import { fileURLToPath } from "node:url";
import { join } from "node:path";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const DENO = join(ROOT, "node_modules/.bin/deno");

/** One part of the run: a `deno` command line. */
interface Part {
  name: string;
  args: string[];
  env?: Record<string, string>;
}

/** The parts that run one after another, in this order. */
export const SEQUENCE: Part[] = [
  { name: "fmt", args: ["fmt", "--check"] },
  { name: "lint", args: ["lint"] },
  { name: "check", args: ["task", "check"] },
  {
    name: "test",
    args: ["task", "test"],
    env: { DENO_JOBS: testJobs(Deno.env.toObject(), navigator.hardwareConcurrency) },
  },
  { name: "test:standin", args: ["task", "test:standin"] },
];
/** The part that runs beside the sequence. */
export const BESIDE: Part = { name: "test:image", args: ["task", "test:image"] };

/**
 * Test files run in parallel: at least 3 at once even on 2 cores, since they
 * spend their time waiting on denokv, Litestream and supervisord, not computing.
 */
export function testJobs(env: Record<string, string | undefined>, cores: number): string {
  return env.DENO_JOBS || String(Math.max(3, cores));
}

function seconds(since: number): string {
  return `${((performance.now() - since) / 1000).toFixed(0)} s`;
}

async function runPart(part: Part, output: "inherit" | Deno.FsFile): Promise<boolean> {
  const started = performance.now();
  const child = new Deno.Command(DENO, {
    args: part.args,
    cwd: ROOT,
    env: part.env,
    stdin: "null",
    stdout: output === "inherit" ? "inherit" : "piped",
    stderr: output === "inherit" ? "inherit" : "piped",
  }).spawn();
  if (output !== "inherit") {
    const copy = async (stream: ReadableStream<Uint8Array>) => {
      for await (const chunk of stream) await output.write(chunk);
    };
    await Promise.all([copy(child.stdout), copy(child.stderr)]);
  }
  const status = await child.status;
  console.error(`== ${part.name}: ${status.success ? "passed" : "FAILED"} in ${seconds(started)}`);
  return status.success;
}

async function main(): Promise<number> {
  const started = performance.now();
  await Deno.mkdir(join(ROOT, ".data"), { recursive: true });
  const logPath = join(ROOT, ".data/test-image.log");
  const log = await Deno.open(logPath, { create: true, write: true, truncate: true });
  console.error(`== ${BESIDE.name}: running beside the rest, output in ${logPath}`);
  const beside = runPart(BESIDE, log);

  const failed: string[] = [];
  for (const part of SEQUENCE) {
    if (!await runPart(part, "inherit")) failed.push(part.name);
  }
  const imageOk = await beside;
  log.close();
  console.error(`== ${BESIDE.name} output:`);
  await Deno.stdout.write(await Deno.readFile(logPath));
  if (!imageOk) failed.push(BESIDE.name);
  console.error(
    failed.length
      ? `== FAILED: ${failed.join(", ")} (${seconds(started)})`
      : `== all passed in ${seconds(started)}`,
  );
  return failed.length ? 1 : 0;
}

if (import.meta.main) Deno.exit(await main());
