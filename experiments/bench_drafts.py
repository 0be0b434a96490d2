"""Decoding with drafts against plain greedy decoding: the same evaluation, the same completions, the time saved.

A student made from a base student (LaTen's fused students, LoRA students) mostly writes what the base student
wrote; the transfer job hands it the base student's completions as drafts (:func:`pktjax.generate.generate`).
This script evaluates one model on the first ``--limit`` problems twice per round, plainly and with drafts (an
earlier report, or the ``.partial.jsonl`` of one in progress), cold (compiles included) then warm, and prints the
wall and process-CPU seconds of each, the share of draft tokens kept, and whether the completions are identical.

    .venv/bin/python experiments/bench_drafts.py --model ~/.cache/pktjax/qwen2.5-coder-0.5b-instruct-q4.gguf \
        --task humaneval --limit 8 --drafts runs/RUN/eval/student.json [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def read_guesses(path: Path) -> dict[str, str]:
    """``{prompt: output}`` from an evaluation report (JSON) or its ``.partial.jsonl``."""
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        rows = json.loads(path.read_text())["records"]
    return {r["prompt"]: r["output"] for r in rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint folder or .gguf file")
    ap.add_argument("--task", default="humaneval")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--drafts", required=True, type=Path, help="a report (JSON) or a .partial.jsonl")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2, help="plain / drafted pairs (the first one compiles)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from pktjax.checkpoint import load_model
    from pktjax.evaluate import evaluate
    from pktjax.tokenizer import load_tokenizer

    model, tok = load_model(args.model), load_tokenizer(args.model)
    guesses = read_guesses(args.drafts)
    kw = dict(limit=args.limit, batch_size=args.batch_size, tokenizer=tok)
    runs = []
    for r in range(args.rounds):
        for mode in ("plain", "drafts"):
            wall, cpu = time.perf_counter(), time.process_time()
            rep = evaluate(model, args.task, drafts=guesses if mode == "drafts" else None, **kw)
            row = {"round": r, "mode": mode, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                   "outputs": [x["output"] for x in rep["records"]], "score": rep["score"],
                   "drafts_kept": rep["settings"].get("drafts_kept")}
            runs.append(row)
            print(f"round {r} {mode:6s}: wall {row['wall_s']:8.1f} s  cpu {row['cpu_s']:8.1f} s  "
                  f"score {row['score']:.3f}  kept {row['drafts_kept']}", flush=True)
    same = all(x["outputs"] == runs[0]["outputs"] for x in runs)
    last = {x["mode"]: x for x in runs[-2:]}
    print(f"completions identical in every run: {same}")
    print(f"warm ratio plain / drafts: wall {last['plain']['wall_s'] / last['drafts']['wall_s']:.2f}x, "
          f"cpu {last['plain']['cpu_s'] / last['drafts']['cpu_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                         "identical": same}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
