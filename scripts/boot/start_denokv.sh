#!/usr/bin/env bash
# supervisord's denokv program: the TypeScript step restores (or fails closed) and prints
# the Litestream command line, one argument per line; this wrapper only execs it.
# --pdeathsig: when supervisord stops this wrapper mid-restore, the step (and its restore) stop too.
set -euo pipefail
argv="$(setpriv --pdeathsig TERM deno run --allow-read --allow-write --allow-env --allow-run --allow-net --allow-sys "$APP_DIR/scripts/boot/start_denokv.ts")"
mapfile -t cmd <<<"$argv"
exec "${cmd[@]}"
