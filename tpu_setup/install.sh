#!/usr/bin/env bash
# Install pktjax (this checkout) with jax[tpu] into a virtual environment on every worker of a TPU VM or slice.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="python3.11"
TARBALL="${TMPDIR:-/tmp}/pktjax-src.tar.gz"

usage() {
  cat <<HELP
usage: install.sh --name NAME --zone ZONE [--source DIR] [--python python3.11] [--dry-run]

Pack the pktjax checkout, copy it to every worker (--worker=all) and install it there with the [tpu] extra
(jax[tpu]) into ~/pktjax-venv; the sources land in ~/pktjax. Installs the Python (apt) when it is missing.

  --source DIR     pktjax checkout to ship (default: $SOURCE)
  --python EXE     Python (3.11 or newer) on the workers (default: $PYTHON)
$COMMON_HELP
HELP
}

script_option() {
  case "$1" in
    --source) SOURCE="${2:?--source needs a value}"; SHIFT=2 ;;
    --python) PYTHON="${2:?--python needs a value}"; SHIFT=2 ;;
  esac
}

parse_options "$@"
require_target
[[ -f "$SOURCE/pyproject.toml" ]] || die "$SOURCE is not a pktjax checkout (no pyproject.toml)"

REMOTE="set -euo pipefail
command -v $PYTHON >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $PYTHON $PYTHON-venv; }
rm -rf ~/pktjax && mkdir -p ~/pktjax && tar -xzf ~/pktjax-src.tar.gz -C ~/pktjax
$PYTHON -m venv ~/pktjax-venv
~/pktjax-venv/bin/pip install -q --upgrade pip
~/pktjax-venv/bin/pip install -q -e \"\$HOME/pktjax[tpu]\"
~/pktjax-venv/bin/python -c 'import jax, pktjax; print(\"pktjax\", pktjax.__version__, \"jax\", jax.__version__)'"

run tar -czf "$TARBALL" --exclude=.venv --exclude=.git --exclude=runs --exclude=__pycache__ -C "$SOURCE" .
tpu_vm scp "$TARBALL" "$TPU_NAME:pktjax-src.tar.gz" --worker=all
on_workers all "$REMOTE"
