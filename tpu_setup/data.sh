#!/usr/bin/env bash
# Put model checkpoints where every worker can read them: upload from here, copy onto each worker, or mount.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

MODE=""
SRC=""
DEST=""

usage() {
  cat <<HELP
usage: data.sh --mode upload|copy|mount --src SRC --dest DEST [--name NAME --zone ZONE] [--dry-run]

  --mode upload    copy a local checkpoint folder SRC to Cloud Storage DEST (gs://bucket/path), from this machine
  --mode copy      on every worker, copy gs://SRC to the local folder DEST (fastest to load; needs disk space)
  --mode mount     on every worker, mount gs://bucket[/dir] SRC read-only at DEST with gcsfuse (no copy)
Every process reads only its own slices of each weight, so each worker needs the files (copied or mounted).
$COMMON_HELP
HELP
}

script_option() {
  case "$1" in
    --mode) MODE="${2:?--mode needs a value}"; SHIFT=2 ;;
    --src) SRC="${2:?--src needs a value}"; SHIFT=2 ;;
    --dest) DEST="${2:?--dest needs a value}"; SHIFT=2 ;;
  esac
}

parse_options "$@"
[[ -n "$SRC" && -n "$DEST" ]] || die "--src and --dest are required; see --help"

gcs_path() {
  [[ "$1" == gs://* ]] || die "$1 is not a Cloud Storage path (gs://bucket/...)"
}

case "$MODE" in
  upload)
    gcs_path "$DEST"
    run gcloud storage cp --recursive "$SRC" "$DEST"
    ;;
  copy)
    require_target
    gcs_path "$SRC"
    on_workers all "set -euo pipefail; mkdir -p $(quote "$DEST"); gcloud storage cp --recursive $(quote "$SRC") $(quote "$DEST")"
    ;;
  mount)
    require_target
    gcs_path "$SRC"
    bucket="${SRC#gs://}"
    dir="${bucket#*/}"
    bucket="${bucket%%/*}"
    only=""
    if [[ "$dir" != "$bucket" && -n "$dir" ]]; then only="--only-dir $(quote "$dir") "; fi
    on_workers all "set -euo pipefail
if ! command -v gcsfuse >/dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
mkdir -p $(quote "$DEST")
gcsfuse --implicit-dirs -o ro ${only}$(quote "$bucket") $(quote "$DEST")"
    ;;
  *) die "--mode must be upload, copy or mount; see --help" ;;
esac
