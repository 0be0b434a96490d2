# shellcheck shell=bash
# Helpers shared by the tpu_setup scripts (sourced, not run): the common options and `run`, which prints each
# command exactly as it runs (shell-quoted) and runs it unless --dry-run was given.

# shellcheck disable=SC2034  # SHIFT, REST and COMMON_HELP are read by the scripts that source this file
DRY_RUN=0
TPU_NAME="${TPU_NAME:-}"
ZONE="${TPU_ZONE:-}"
PROJECT="${TPU_PROJECT:-}"
SHIFT=0
# shellcheck disable=SC2034
COMMON_HELP="common options:
  --name NAME      TPU VM / slice name (or env TPU_NAME)
  --zone ZONE      zone, e.g. us-central2-b for v4, us-west4-a for v5e (or env TPU_ZONE)
  --project ID     Google Cloud project (or env TPU_PROJECT; default: gcloud's configured project)
  --dry-run        print the commands without running them
  -h, --help       this help"

die() {
  echo "error: $*" >&2
  exit 2
}

# One word of a command line, quoted only when the shell needs it.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@+%^~-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Print a command (prefixed with "+ ") and run it unless this is a dry run.
run() {
  local out="+" word
  for word in "$@"; do
    out+=" $(quote "$word")"
  done
  printf '%s\n' "$out"
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}

# Parse one common option at "$1" (value in "$2"); sets SHIFT to the words used, 0 when "$1" is not common.
common_option() {
  # shellcheck disable=SC2034
  SHIFT=0
  case "$1" in
    --name) TPU_NAME="${2:?--name needs a value}"; SHIFT=2 ;;
    --zone) ZONE="${2:?--zone needs a value}"; SHIFT=2 ;;
    --project) PROJECT="${2:?--project needs a value}"; SHIFT=2 ;;
    --dry-run) DRY_RUN=1; SHIFT=1 ;;
    -h | --help) usage; exit 0 ;;
  esac
}

# Parse the command line: the common options here, the script's own through the `script_option` function it
# defines (same contract as common_option). Words after `--` land in REST; only a script that sets
# TAKES_COMMAND=1 accepts them.
parse_options() {
  REST=()
  while [[ $# -gt 0 ]]; do
    if [[ "$1" == "--" && "${TAKES_COMMAND:-0}" == 1 ]]; then
      shift
      REST=("$@")
      return
    fi
    common_option "$@"
    if [[ "$SHIFT" == 0 ]]; then
      script_option "$@"
    fi
    [[ "$SHIFT" -gt 0 ]] || die "unknown option $1; see --help"
    shift "$SHIFT"
  done
}

require_target() {
  [[ -n "$TPU_NAME" ]] || die "--name is required (or set TPU_NAME); see --help"
  [[ -n "$ZONE" ]] || die "--zone is required (or set TPU_ZONE); see --help"
}

# `gcloud compute tpus tpu-vm SUBCOMMAND ARGS... --zone=... [--project=...]`, through run.
tpu_vm() {
  local extra=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    extra+=(--project="$PROJECT")
  fi
  run gcloud compute tpus tpu-vm "$@" "${extra[@]}"
}

# Run a shell command on the given workers ("all" or an index) of the slice over ssh.
on_workers() {
  local workers="$1" command="$2"
  tpu_vm ssh "$TPU_NAME" --worker="$workers" --command="$command"
}
