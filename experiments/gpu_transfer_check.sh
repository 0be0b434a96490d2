#!/usr/bin/env bash
# Time the whole `pktjax transfer` job at the packaged pair's sizes on a machine that cannot receive its weights
# (experiments/configs/qwen-coder-shapes-gpu.yaml): random-weight models with the pair's configs and tokenizer
# are built there from $SHAPES (config.json + tokenizer files per role, written here by experiments/shaped_pair.py),
# then the config runs. Logs, timings.json and the report land in $OUT.
#   python -m experiments.shaped_pair ~/.cache/pktjax/qwen2.5-coder-1.5b-instruct-q4.gguf .devdata/shapes/teacher
#   python -m experiments.shaped_pair ~/.cache/pktjax/qwen2.5-coder-0.5b-instruct-q4.gguf .devdata/shapes/student
#   OUT=/tmp/g BUDGET_S=540 bash experiments/gpu_transfer_check.sh
# Needs PKTJAX_DATA (else .devdata/ in this checkout: laten/humaneval and benchmarks/humaneval).
set -uo pipefail

OUT=${OUT:-/tmp/gpu_transfer}
BUDGET_S=${BUDGET_S:-540}
SHAPES=${SHAPES:-.devdata/shapes}
CONFIG=${CONFIG:-experiments/configs/qwen-coder-shapes-gpu.yaml}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
if [[ -z ${PKTJAX_DATA:-} && -d .devdata/laten ]]; then export PKTJAX_DATA=$PWD/.devdata; fi
start=$SECONDS
stamp() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - start))s] $*"; }

{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null; nproc; date -u
  "$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"; } 2>&1 | tee "$OUT/machine.txt"

seed=1
for role in teacher student; do
  if [[ ! -f runs/shapes/$role/config.json ]]; then
    stamp "random $role" | tee -a "$OUT/transfer.log"
    "$PY" -m experiments.shaped_pair "$SHAPES/$role" "runs/shapes/$role" --weights --seed $seed 2>&1 \
      | tee -a "$OUT/transfer.log"
  fi
  seed=$((seed + 1))
done

stamp "pktjax transfer $CONFIG" | tee -a "$OUT/transfer.log"
timeout $((BUDGET_S - (SECONDS - start))) "$PY" -m pktjax.cli transfer "$CONFIG" >>"$OUT/transfer.log" 2>&1
stamp "transfer exit $?" | tee -a "$OUT/transfer.log"
run=$("$PY" -c "from pktjax.transfer import read_config; print(read_config('$CONFIG').out)")
cp "$run/timings.json" "$OUT/" 2>/dev/null
cp "$run/report.md" "$run/scores.json" "$OUT/" 2>/dev/null
nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | tee -a "$OUT/machine.txt"
