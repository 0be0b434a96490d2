"""``pktjax eval``: score a checkpoint on GSM8K, MMLU, HumanEval or MBPP (or score a samples file made
elsewhere) and print a summary table."""

from __future__ import annotations

import argparse

from pktjax.commands import list_argument, task_argument
from pktjax.settings import DeviceSettings, EvalSettings, add_arguments, from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark (gsm8k, mmlu, humaneval, mbpp)")
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf file")
    task_argument(p, "benchmark", required=True, help="the benchmark (gsm is gsm8k)")
    p.add_argument("--samples", default=None, metavar="FILE",
                   help="score this human-eval / EvalPlus samples file (JSONL of task_id + completion or solution) "
                        "instead of a model (humaneval, mbpp)")
    # the settings of a transfer config's `eval:` section, as flags
    add_arguments(p, EvalSettings, ("limit", "few_shot", "batch_size", "prompt_format", "max_new_tokens",
                                     "matmul_dtype"))
    p.add_argument("--num-samples", type=int, default=0, metavar="N",
                   help="also draw N completions per problem at --temperature and report pass@k (0: greedy only)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature for --num-samples")
    list_argument(p, "--pass-k", item=int, default=(1, 10), metavar="K", help="k values of pass@k")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampled completions")
    p.add_argument("--timeout", type=float, default=10.0, help="sandbox seconds per program (code tasks)")
    p.add_argument("--hub", action="store_true", help="read the benchmark from the Hugging Face hub (online)")
    p.add_argument("--out", default=None, help="write the JSON report here (code tasks: the samples file beside it)")
    add_arguments(p, DeviceSettings, ("mesh", "dtype"))
    p.add_argument("--drafts", default=None, metavar="REPORT",
                   help="an earlier report on the task whose completions guess this model's (e.g. its base model's): "
                        "the same completions, fewer decode steps where they agree (default: none)")
    p.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    from pktjax import sharding as S
    from pktjax.checkpoint import load_model
    from pktjax.errors import ConfigError
    from pktjax.evaluate import evaluate, score_samples
    from pktjax.progress import progress_bar
    from pktjax.tasks import get_task

    if (args.model is None) == (args.samples is None):
        raise ConfigError("pktjax eval: give --model (evaluate a checkpoint) or --samples FILE (score samples "
                          "made elsewhere), not both.")
    e = from_args(EvalSettings, args)  # the ranges checked before any model or data is read
    if args.samples is not None:
        report = score_samples(args.samples, args.task, pass_k=args.pass_k, timeout=args.timeout, hub=args.hub,
                               out=args.out)
    else:
        mesh = S.as_mesh(args.mesh)
        total = len(get_task(args.task).load(e.limit, hub=args.hub)) * (2 if args.num_samples else 1)
        model = load_model(args.model, dtype=args.dtype, mesh=mesh)
        with progress_bar(total, args.task, "ex") as bar:
            report = evaluate(model, args.task, limit=e.limit, few_shot=e.few_shot,
                              batch_size=e.batch_size, out=args.out if S.is_main_process() else None,
                              max_new_tokens=e.max_new_tokens, hub=args.hub, timeout=args.timeout,
                              progress=bar.update, num_samples=args.num_samples,
                              temperature=args.temperature, pass_k=args.pass_k, seed=args.seed,
                              prompt_format=e.prompt_format, drafts=args.drafts,
                              matmul_dtype=e.matmul_dtype)
    S.main_print(format_table(report))
    if args.out:
        S.main_print(f"report: {args.out}")
    return 0


def format_table(report: dict) -> str:
    """A small plain-text table of the report's headline numbers."""
    s = report["settings"]
    ci = report.get("ci95")
    rows = [("task", report["task"]), ("model", s.get("model") or s.get("samples")), ("examples", report["n"]),
            ("few-shot", s.get("few_shot")), ("score", f"{report['score']:.4f}"),
            ("95% CI (Wilson)", f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "— (several samples per problem)"),
            ("correct", report["n_correct"]), ("seconds", report["seconds"])]
    sampled = report.get("pass_at_k") or {}
    rows += [(f"{k} (sampled)", f"{v:.4f}") for k, v in sampled.items() if k.startswith("pass@")]
    if "n" in sampled:
        rows.append(("samples", f"n={sampled['n']} at temperature {sampled['temperature']}"))
    for key in ("samples_file",):
        if s.get(key):
            rows.append(("samples file", s[key]))
    if s.get("sandbox"):
        rows.append(("sandbox", s["sandbox"]))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(str(v)) for _, v in rows))
    return "\n".join([line] + [f"{k:<{width}} | {v}" for k, v in rows] + [line])
