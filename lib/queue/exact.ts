/**
 * Commits that stay exact when the Deno KV client re-sends them: the client
 * re-sends a write whose answer was lost or was a 5xx even when the server
 * had applied it, so a commit may arrive twice, and its caller may see a
 * failed check (the second copy's answer) or an error for a write that went in.
 *
 * @module
 */

/**
 * Commits `op`. When the call fails or a check fails, `applied()` looks for
 * what only this commit writes (a receipt, a lease with this worker's mark)
 * and returns its versionstamp when the commit went in after all. Every
 * commit using this carries a check that fails on a second application, so
 * it changes nothing the second time.
 */
export async function commitExact(
  op: Pick<Deno.AtomicOperation, "commit">,
  applied: () => Promise<string | null>,
): Promise<Deno.KvCommitResult | Deno.KvCommitError> {
  let res: Deno.KvCommitResult | Deno.KvCommitError;
  try {
    res = await op.commit();
  } catch (err) {
    let stamp: string | null = null;
    try {
      stamp = await applied();
    } catch { /* cannot tell: report the call's own failure */ }
    if (stamp !== null) return { ok: true, versionstamp: stamp };
    throw err;
  }
  if (res.ok) return res;
  const stamp = await applied();
  return stamp === null ? res : { ok: true, versionstamp: stamp };
}
