/**
 * Unit tests of the start-up's comparison of the volume's database with the
 * replica (scripts/boot/start_denokv_freshness.ts). The end-to-end case (a volume
 * back from an older snapshot) is in tests/faults/storage_test.ts.
 */
import assert from "node:assert/strict";
import { compareWithReplica, parseWalList } from "../scripts/boot/start_denokv_freshness.ts";

const G1 = "0fe53c9f407bb3a0";
const G2 = "1aa53c9f407bb3a1";
const LIST = `replica  generation        index  offset  size  created
s3       ${G1}  0      0       451   2026-12-03T14:57:29Z
s3       ${G1}  0      16512   95    2026-12-03T14:57:31Z
`;

Deno.test("parseWalList() reads litestream wal's table", () => {
  assert.deepEqual(parseWalList(LIST), [
    { generation: G1, index: 0, offset: 0, created: Date.parse("2026-12-03T14:57:29Z") },
    { generation: G1, index: 0, offset: 16512, created: Date.parse("2026-12-03T14:57:31Z") },
  ]);
  assert.deepEqual(parseWalList("replica  generation  index  offset  size  created\n"), []);
});

const local = (generation: string, index: number, size: number, modified = 0) => ({
  generation,
  index,
  size,
  modified,
});

Deno.test("compareWithReplica(): same generation, the replica holds bytes past the local end: older", () => {
  const segments = parseWalList(LIST);
  assert.equal(compareWithReplica(local(G1, 0, 16512), segments).older, true);
  assert.equal(compareWithReplica(local(G1, 0, 20632), segments).older, false);
  assert.equal(compareWithReplica(local(G1, 1, 4096), segments).older, false);
});

Deno.test("compareWithReplica(): the replica moved on to a later generation: older", () => {
  const segments = [
    ...parseWalList(LIST),
    { generation: G2, index: 0, offset: 0, created: Date.parse("2026-12-03T15:00:00Z") },
  ];
  const verdict = compareWithReplica(local(G1, 0, 20632), segments);
  assert.equal(verdict.older, true);
  assert.match(verdict.reason, /moved on to generation/);
});

Deno.test("compareWithReplica(): an unknown generation is judged by time", () => {
  const segments = parseWalList(LIST);
  const newest = Date.parse("2026-12-03T14:57:31Z");
  assert.equal(compareWithReplica(local(G2, 0, 100, newest - 3_600_000), segments).older, true);
  assert.equal(compareWithReplica(local(G2, 0, 100, newest + 1_000), segments).older, false);
  assert.equal(compareWithReplica(local(G2, 0, 100, 0), []).older, false);
});
