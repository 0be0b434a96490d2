#!/usr/bin/env bash
# SemAlign on the packaged Qwen2.5-Coder 1.5B -> 0.5B pair at the CPU scale of qwen-coder-humaneval-cpu.yaml's
# `semalign:` section (the critical teacher layer from 8 seed examples; a rank-16 LoRA on up/down/v/o of the paired
# student layer; one epoch on the first 32 HumanEval training examples in batches of 8 at lr 3e-4; cutoff 384),
# then the merged student on the first 20 HumanEval problems (pass@1, greedy, sandboxed), decoded with the base
# student's completions as drafts. Each step resumes: rerun the script after any stop.
#   RUN=/work/runs/semalign-humaneval-cpu DRAFTS=RUN_OF_THE_PROTOCOL/eval/student.json \
#       bash experiments/semalign_humaneval_cpu.sh
# Needs `pktjax models install qwen2.5-coder` (the GGUF files under ~/.cache/pktjax) and about 12 GB of memory.
set -euo pipefail

RUN=${RUN:-runs/semalign-humaneval-cpu}
MODELS=${MODELS:-$HOME/.cache/pktjax}
TEACHER=${TEACHER:-$MODELS/qwen2.5-coder-1.5b-instruct-q4.gguf}
STUDENT=${STUDENT:-$MODELS/qwen2.5-coder-0.5b-instruct-q4.gguf}
PY=${PY:-python}
LIMIT=${LIMIT:-20}
DRAFTS=${DRAFTS:+--drafts $DRAFTS}

$PY -m pktjax semalign train --teacher "$TEACHER" --student "$STUDENT" --task humaneval --out "$RUN/train" \
    --epochs 1 --lr 3e-4 --batch-size 8 --micro-batch 1 --rank 16 --alpha 16 --dropout 0.05 --cutoff-len 384 \
    --limit 32 --seed-samples 8 --seed 1 --cka 4
[ -d "$RUN/merged" ] || $PY -m pktjax lora merge --student "$STUDENT" --adapter "$RUN/train/adapter" --out "$RUN/merged"
$PY -m pktjax eval --model "$RUN/merged" --task humaneval --limit "$LIMIT" --out "$RUN/eval.json" $DRAFTS
