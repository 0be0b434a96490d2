#!/usr/bin/env bash
# Run one command on every worker of a TPU VM or slice (--worker=all), in the pktjax environment, with a log.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WORKERS="all"
LOG="run"
BACKGROUND=0
TAKES_COMMAND=1  # the words after -- are the command
ENVS=()

usage() {
  cat <<HELP
usage: launch.sh --name NAME --zone ZONE [--log NAME] [--env KEY=VALUE]... [--background] [--dry-run] -- COMMAND...

Runs COMMAND in ~/pktjax with ~/pktjax-venv/bin first on PATH and PKTJAX_DISTRIBUTED=1 (pktjax then calls
jax.distributed.initialize(), which finds the other workers of the slice itself), on all workers at once.
Output goes to ~/pktjax-logs/LOG.log on each worker (and here, unless --background).

  --log NAME       log file name on the workers (default: run)
  --env KEY=VALUE  extra environment variable (repeatable), e.g. --env XLA_FLAGS=...
  --worker W       run on worker W only (default: all)
  --background     start detached (nohup) and return; follow with collect.sh
$COMMON_HELP

example: launch.sh --name pkt --zone us-central2-b --log laten -- pktjax laten train --teacher ~/ckpt/13b \\
           --student ~/ckpt/7b --task gsm --out ~/pktjax/runs/laten
HELP
}

script_option() {
  case "$1" in
    --log) LOG="${2:?--log needs a value}"; SHIFT=2 ;;
    --env) ENVS+=("${2:?--env needs KEY=VALUE}"); SHIFT=2 ;;
    --worker) WORKERS="${2:?--worker needs a value}"; SHIFT=2 ;;
    --background) BACKGROUND=1; SHIFT=1 ;;
  esac
}

parse_options "$@"
set -- "${REST[@]}"
require_target
[[ $# -gt 0 ]] || die "no command given; put it after --"
[[ "$LOG" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--log must be a plain file name"

exports="export PATH=\$HOME/pktjax-venv/bin:\$PATH PKTJAX_DISTRIBUTED=1"
for kv in "${ENVS[@]}"; do
  [[ "$kv" == *=* ]] || die "--env $kv is not KEY=VALUE"
  exports+=" $(quote "$kv")"
done
command=""
for word in "$@"; do
  command+="$(quote "$word") "
done
logfile="\$HOME/pktjax-logs/$LOG.log"
if [[ "$BACKGROUND" == 1 ]]; then
  body="nohup bash -c $(quote "$command") > $logfile 2>&1 < /dev/null &"
else
  body="${command}2>&1 | tee $logfile"
fi
on_workers "$WORKERS" "set -euo pipefail; mkdir -p ~/pktjax-logs; cd ~/pktjax; $exports; $body"
