/**
 * Unit tests of the supervisord event listener's decisions
 * (scripts/boot/watchdog.ts): when the pair counts as hung, when a FATAL
 * state stops the machine. The listener itself runs in tests/faults/.
 */
import assert from "node:assert/strict";
import { HUNG_AFTER_MS, parseTokens, Watchdog } from "../scripts/boot/watchdog.ts";

const running = { name: "PROCESS_STATE_RUNNING", fields: { processname: "denokv" } };

Deno.test("parseTokens() reads supervisord's header and payload lines", () => {
  assert.deepEqual(
    parseTokens("ver:3.0 server:supervisor serial:21 eventname:PROCESS_STATE_FATAL len:54\n"),
    { ver: "3.0", server: "supervisor", serial: "21", eventname: "PROCESS_STATE_FATAL", len: "54" },
  );
});

Deno.test("Watchdog: any program FATAL stops the machine", () => {
  const dog = new Watchdog();
  assert.equal(
    dog.onState({ name: "PROCESS_STATE_FATAL", fields: { processname: "proxy" } }),
    "fatal",
  );
  assert.equal(dog.onState(running), null);
});

Deno.test("Watchdog: a pair that answered and then stops answering is restarted after HUNG_AFTER_MS", () => {
  const dog = new Watchdog();
  dog.onState(running);
  assert.ok(dog.shouldProbe());
  assert.equal(dog.onProbe(null, 0), false);
  assert.equal(dog.onProbe("denokv: refused", 1_000), false);
  assert.equal(dog.onProbe("denokv: refused", 1_000 + HUNG_AFTER_MS - 1), false);
  assert.equal(dog.onProbe("denokv: refused", 1_000 + HUNG_AFTER_MS), true);
  assert.equal(dog.shouldProbe(), false, "no second restart while the first runs");
  dog.onState({ name: "PROCESS_STATE_STARTING", fields: { processname: "denokv" } });
  dog.onState(running);
  assert.ok(dog.shouldProbe());
});

Deno.test("Watchdog: a pair still starting (connection refused) is left alone; one taking connections without answering is hung", () => {
  const dog = new Watchdog();
  dog.onState(running);
  for (let t = 0; t <= 10 * HUNG_AFTER_MS; t += 5_000) {
    assert.equal(dog.onProbe("denokv: connection refused", t), false);
  }
  const hung = new Watchdog();
  hung.onState(running);
  assert.equal(hung.onProbe("denokv: timed out", 0, true), false);
  assert.equal(hung.onProbe("denokv: timed out", HUNG_AFTER_MS, true), true);
});

Deno.test("Watchdog: an answer in between resets the count", () => {
  const dog = new Watchdog();
  dog.onState(running);
  dog.onProbe(null, 0);
  dog.onProbe("x", 1_000);
  dog.onProbe(null, 2_000);
  assert.equal(dog.onProbe("x", 3_000), false);
  assert.equal(dog.onProbe("x", 3_000 + HUNG_AFTER_MS - 1), false);
});
