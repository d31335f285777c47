/**
 * The suite runs the real third-party binaries: the denokv it starts is the
 * pinned official release that `deno task setup` built with cargo, and the
 * Supercronic on its PATH is the pinned release built with go.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { sha256File } from "../scripts/dev/install.ts";
import { loadPins } from "../scripts/dev/tools.ts";
import {
  DENOKV_BIN,
  KV_SERVER,
  openRemoteKv,
  ROOT,
  startDenokv,
  TEST_PATH,
  TOOLS,
} from "./_helpers/processes.ts";

const opts = { sanitizeOps: false, sanitizeResources: false };

async function output(cmd: string, args: string[], env: Record<string, string> = {}) {
  const out = await new Deno.Command(cmd, { args, env, stdout: "piped", stderr: "piped" }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  assert.ok(out.success, `${cmd} ${args.join(" ")} failed: ${text}`);
  return text;
}

Deno.test(
  "the denokv the tests start is the pinned official release, not the stand-in",
  opts,
  async () => {
    const pins = await loadPins(ROOT);
    assert.equal(KV_SERVER, "official", "KV_SERVER=standin is for the stand-in's own run only");
    assert.equal(DENOKV_BIN, join(TOOLS.denokvBinDir, "denokv"));
    // cargo's own record of what it installed in that root, at the Dockerfile's pin.
    const listed = await output("cargo", ["install", "--list", "--root", TOOLS.denokvRoot]);
    assert.match(listed, new RegExp(`^denokv v${pins.denokv.replaceAll(".", "\\.")}:`, "m"));
    // The binary is byte for byte the one installed then.
    const recorded = (await Deno.readTextFile(TOOLS.denokvSha256File)).split(/\s+/)[0];
    assert.equal(await sha256File(DENOKV_BIN), recorded);
    // Configs call plain `denokv`: on the tests' PATH it resolves to that binary.
    const which = await output("bash", ["-c", "command -v denokv"], { PATH: TEST_PATH });
    assert.equal(which.trim(), DENOKV_BIN);

    // And the process that serves is that ELF binary, answering a real client.
    const dir = await Deno.makeTempDir();
    await using denokv = await startDenokv({ sqlitePath: join(dir, "db.sqlite") });
    assert.equal(await Deno.realPath(`/proc/${denokv.child.pid}/exe`), DENOKV_BIN);
    const kv = await openRemoteKv(denokv.url);
    try {
      await kv.set(["real"], 1n);
      assert.equal((await kv.get(["real"])).value, 1n);
    } finally {
      kv.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

Deno.test("the supercronic on the tests' PATH is the pinned release built by go", async () => {
  const pins = await loadPins(ROOT);
  const which = await output("bash", ["-c", "command -v supercronic"], { PATH: TEST_PATH });
  assert.equal(which.trim(), join(TOOLS.supercronicBinDir, "supercronic"));
  const info = await output("go", ["version", "-m", which.trim()]);
  assert.match(
    info,
    new RegExp(`\\bmod\\s+github\\.com/aptible/supercronic\\s+${pins.supercronic}\\b`),
  );
});
