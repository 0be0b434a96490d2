#!/usr/bin/env bash
# Create a Cloud TPU VM or pod slice with `gcloud compute tpus tpu-vm create`.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TYPE="v4-8"
VERSION=""
SPOT=0
SCOPES=""

usage() {
  cat <<HELP
usage: create.sh --name NAME --zone ZONE [--type v4-8] [--version RUNTIME] [--spot] [--scopes SCOPES] [--dry-run]

Create a TPU VM (one host: v4-8, v5e-8 = v5litepod-8, v6e-8) or a pod slice (several hosts: v4-32, v5e-16, ...).

  --type TYPE      accelerator type (default v4-8; v5e-N is spelled v5litepod-N by gcloud and accepted either way)
  --version V      TPU software version (default: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for v5e,
                   v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
  --spot           use Spot capacity (cheaper, may be preempted)
  --scopes SCOPES  service-account scopes, e.g. cloud-platform to read checkpoints from Cloud Storage
$COMMON_HELP
HELP
}

default_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default --version for accelerator type $1; pass --version" ;;
  esac
}

script_option() {
  case "$1" in
    --type) TYPE="${2:?--type needs a value}"; SHIFT=2 ;;
    --version) VERSION="${2:?--version needs a value}"; SHIFT=2 ;;
    --spot) SPOT=1; SHIFT=1 ;;
    --scopes) SCOPES="${2:?--scopes needs a value}"; SHIFT=2 ;;
  esac
}

parse_options "$@"
require_target

TYPE="${TYPE/#v5e-/v5litepod-}"
VERSION="${VERSION:-$(default_version "$TYPE")}"
args=(create "$TPU_NAME" --accelerator-type="$TYPE" --version="$VERSION")
if [[ "$SPOT" == 1 ]]; then args+=(--spot); fi
if [[ -n "$SCOPES" ]]; then args+=(--scopes="$SCOPES"); fi
tpu_vm "${args[@]}"
tpu_vm describe "$TPU_NAME" --format="value(state,acceleratorType,networkEndpoints.len())"
