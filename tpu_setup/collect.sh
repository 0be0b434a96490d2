#!/usr/bin/env bash
# Copy logs (every worker) and results (worker 0, where process 0 writes them) from a TPU VM or slice to here.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WORKERS=1
RESULTS=""
OUT=""

usage() {
  cat <<HELP
usage: collect.sh --name NAME --zone ZONE [--workers N] [--results REMOTE_DIR] [--out LOCAL_DIR] [--dry-run]

  --workers N          hosts in the slice (1 for v4-8 / v5e-8 / v6e-8, 4 for v4-32, ...; default 1)
  --results DIR        results folder on worker 0, relative to ~ (e.g. pktjax/runs/laten); copied to OUT/results
  --out DIR            local destination (default: ./tpu-results/NAME)
Logs ~/pktjax-logs of worker i go to OUT/worker-i/.
$COMMON_HELP
HELP
}

script_option() {
  case "$1" in
    --workers) WORKERS="${2:?--workers needs a value}"; SHIFT=2 ;;
    --results) RESULTS="${2:?--results needs a value}"; SHIFT=2 ;;
    --out) OUT="${2:?--out needs a value}"; SHIFT=2 ;;
  esac
}

parse_options "$@"
require_target
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer"
OUT="${OUT:-./tpu-results/$TPU_NAME}"

run mkdir -p "$OUT"
for ((i = 0; i < WORKERS; i++)); do
  run mkdir -p "$OUT/worker-$i"
  tpu_vm scp --recurse "$TPU_NAME:pktjax-logs" "$OUT/worker-$i/" --worker="$i"
done
if [[ -n "$RESULTS" ]]; then
  tpu_vm scp --recurse "$TPU_NAME:$RESULTS" "$OUT/results" --worker=0
fi
