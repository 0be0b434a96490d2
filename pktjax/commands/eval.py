"""``pktjax eval``: score a checkpoint on GSM8K, MMLU, HumanEval or MBPP and print a summary table."""

from __future__ import annotations

import argparse

from pktjax.tasks import TASKS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark (gsm8k, mmlu, humaneval, mbpp)")
    p.add_argument("--model", required=True, help="checkpoint folder or .gguf file")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--few-shot", type=int, default=0, help="exemplars per prompt (MMLU: 0 or 5)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="decode slots of the continuous batching (generation tasks) or forward batch (MMLU)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="generation budget (default per task)")
    p.add_argument("--timeout", type=float, default=10.0, help="sandbox seconds per program (code tasks)")
    p.add_argument("--hub", action="store_true", help="read the benchmark from the Hugging Face hub (online)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pktjax.evaluate import evaluate
    from pktjax.tasks import get_task

    total = len(get_task(args.task).load(args.limit, hub=args.hub))
    with tqdm(total=total, desc=f"{args.task}", unit="ex") as bar:
        report = evaluate(args.model, args.task, limit=args.limit, few_shot=args.few_shot,
                          batch_size=args.batch_size, out=args.out, max_new_tokens=args.max_new_tokens,
                          hub=args.hub, timeout=args.timeout, progress=bar.update)
    print(format_table(report))
    if args.out:
        print(f"report: {args.out}")
    return 0


def format_table(report: dict) -> str:
    """A small plain-text table of the report's headline numbers."""
    s = report["settings"]
    rows = [("task", report["task"]), ("model", s.get("model")), ("examples", report["n"]),
            ("few-shot", s.get("few_shot")), ("score", f"{report['score']:.4f}"),
            ("95% CI (Wilson)", f"[{report['ci95'][0]:.4f}, {report['ci95'][1]:.4f}]"),
            ("correct", report["n_correct"]), ("seconds", report["seconds"])]
    if s.get("sandbox"):
        rows.append(("sandbox", s["sandbox"]))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(str(v)) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}} | {v}" for k, v in rows] + [line])
