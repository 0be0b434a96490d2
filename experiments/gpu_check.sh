#!/usr/bin/env bash
# GPU figures in one go, on a machine whose python already has jax (CUDA), torch, transformers, flax, optax and
# orbax (pktjax is used from this checkout, not installed):
#   1. one LaTen aligner step on Llama-2-13B -> 7B shaped random weights (bfloat16) on one GPU: step time per
#      stage and peak device memory (experiments/bench_laten_step.py --size full);
#   2. the side-by-side benchmark against the PyTorch baseline at the ~1/10 size (python -m experiments.bench);
#   3. if time is left, the same benchmark at the full Llama-2 widths with the depth cut (--layers).
# Every log and JSON lands in $OUT (default /tmp/gpu_check). Needs the GSM8K LaTen splits: PKTJAX_DATA, else
# .devdata/ in this checkout (a copy of ../shared/data/laten/gsm), else ../shared/data.
#   OUT=/tmp/g bash experiments/gpu_check.sh            # BUDGET_S=480, STEP_S=300, BENCH_S=240 by default
#   SMALL=1 bash experiments/gpu_check.sh               # a CPU rehearsal of the same steps at small sizes
set -uo pipefail

OUT=${OUT:-/tmp/gpu_check}
BUDGET_S=${BUDGET_S:-480}
STEP_S=${STEP_S:-300}    # at most this long for step 1
BENCH_S=${BENCH_S:-240}  # and for step 2
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [[ -z ${PKTJAX_DATA:-} && -d .devdata/laten ]]; then export PKTJAX_DATA=$PWD/.devdata; fi
start=$SECONDS

if [[ ${SMALL:-0} == 1 ]]; then
  device=cpu step_size=tiny step_args=(--cutoff-len 128 --dtype bfloat16 --repeats 1) bench_size=tiny full_args=(--size tiny)
  export JAX_PLATFORMS=cpu
else
  device=gpu step_size=full step_args=(--dtype bfloat16 --repeats 2) bench_size=tenth
  full_args=(--size llama2-13b-7b --layers 10 8 --reps 3)
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
fi

left() { echo $((BUDGET_S - (SECONDS - start))); }
stamp() { echo "[$(date -u +%H:%M:%S) +$((SECONDS - start))s] $*"; }

{
  stamp "machine"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  nproc; date -u
  "$PY" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for m in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "transformers", "torch", "peft"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:  # report and go on: the steps below say what they miss
        print(m, "missing:", e)
import jax
print("jax devices", jax.devices())
EOF
} 2>&1 | tee "$OUT/machine.txt"

stamp "1. LaTen step, $step_size shapes" | tee "$OUT/laten_step.log"
timeout "$(( $(left) < STEP_S ? $(left) : STEP_S ))" "$PY" experiments/bench_laten_step.py --size "$step_size" \
  "${step_args[@]}" 2>&1 | tee -a "$OUT/laten_step.log"
stamp "laten step exit ${PIPESTATUS[0]}" | tee -a "$OUT/laten_step.log"

stamp "2. benchmark vs PyTorch, $bench_size" | tee "$OUT/bench_$bench_size.log"
timeout "$(( $(left) < BENCH_S ? $(left) : BENCH_S ))" "$PY" -m experiments.bench --size "$bench_size" --device "$device" \
  --out "$OUT/bench_${bench_size}_$device.json" --markdown "$OUT/RESULTS_$device.md" 2>&1 \
  | tee -a "$OUT/bench_$bench_size.log"
stamp "bench exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench_$bench_size.log"

if (( $(left) > 120 )); then
  stamp "3. benchmark vs PyTorch, ${full_args[*]}" | tee "$OUT/bench_full.log"
  timeout "$(( $(left) - 10 ))" "$PY" -m experiments.bench "${full_args[@]}" --device "$device" \
    --out "$OUT/bench_full_$device.json" --markdown "$OUT/RESULTS_$device.md" --no-float64 2>&1 \
    | tee -a "$OUT/bench_full.log"
  stamp "bench full exit ${PIPESTATUS[0]}" | tee -a "$OUT/bench_full.log"
fi
stamp "done"
