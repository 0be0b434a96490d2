"""Where a whole evaluation's time goes: ``pktjax.evaluate`` on a real model, with the decoder's own clock.

Runs one evaluation as ``pktjax eval`` does (the persistent compilation cache on), and prints its wall time from
the start of the process (imports, load, tokenization, decoding, sandbox) beside the decoder's split: prefill,
decode and host seconds, prefill calls, prompt tokens against the padded positions the prefills computed, decode
steps, slot occupancy and new tokens; examples done are reported as they finish. ``--compare REPORT`` counts the
completions equal to an earlier report's (the same greedy outputs before and after a change to the decoder).

    PKTJAX_DATA=../shared/data .venv/bin/python experiments/bench_eval.py \\
        --model ~/.cache/pktjax/qwen2.5-coder-0.5b-instruct-q4.gguf --task humaneval --slots 16 \\
        --out /tmp/student.json --compare experiments/results/humaneval_protocol/eval/student.json \\
        [--matmul-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="checkpoint folder or .gguf file")
    ap.add_argument("--task", default="humaneval")
    ap.add_argument("--slots", type=int, default=16, help="decode slots (pktjax eval --batch-size)")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--drafts", help="an earlier report whose completions are the drafts")
    ap.add_argument("--matmul-dtype", choices=("float32", "bfloat16"), help="pktjax eval --matmul-dtype")
    ap.add_argument("--out", type=Path, required=True, help="the evaluation report (JSON)")
    ap.add_argument("--compare", type=Path, help="count the completions equal to this report's")
    args = ap.parse_args()

    from pktjax.cli import enable_compilation_cache

    enable_compilation_cache()
    ev = importlib.import_module("pktjax.evaluate")  # the module (pktjax.evaluate is also the function's name)
    clock: dict = {}
    generate_text = ev.generate_text

    def timed(*a, **kw):  # the evaluation's one call into the decoder, with a stats dict to fill
        kw["stats"] = clock.setdefault("stats", {})
        t = time.perf_counter()
        gen = generate_text(*a, **kw)
        clock.update(generate_s=round(time.perf_counter() - t, 1), new_tokens=int(gen.lengths.sum()))
        return gen

    ev.generate_text = timed
    from pktjax.progress import progress_bar
    from pktjax.tasks import get_task

    total = len(get_task(args.task).load(args.limit))
    with progress_bar(total, args.task, "ex") as bar:  # a line per tenth or per minute when logged to a file
        report = ev.evaluate(args.model, args.task, limit=args.limit, batch_size=args.slots, out=args.out,
                             drafts=args.drafts, matmul_dtype=args.matmul_dtype, progress=bar.update)
    clock["stats"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in clock.get("stats", {}).items()}
    res = {"wall_s": round(time.perf_counter() - START, 1), "score": report["score"], "n": report["n"],
           "slots": args.slots, "matmul_dtype": args.matmul_dtype, **clock,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.compare:
        old = {r["prompt"]: r["output"] for r in json.loads(args.compare.read_text())["records"]}
        res["same_completions"] = sum(old.get(r["prompt"]) == r["output"] for r in report["records"])
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
