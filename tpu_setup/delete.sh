#!/usr/bin/env bash
# Delete a TPU VM or slice (everything on its disks is lost: run collect.sh first).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

YES=0

usage() {
  cat <<HELP
usage: delete.sh --name NAME --zone ZONE --yes [--dry-run]

  --yes            confirm the deletion (required unless --dry-run)
$COMMON_HELP
HELP
}

script_option() {
  case "$1" in
    --yes) YES=1; SHIFT=1 ;;
  esac
}

parse_options "$@"
require_target
[[ "$YES" == 1 || "$DRY_RUN" == 1 ]] || die "deleting $TPU_NAME loses its disks; pass --yes to confirm"
tpu_vm delete "$TPU_NAME" --quiet
