"""``pktjax analyze``: the neural-incompatibility analysis of a teacher/student pair (SPEC §6).

Writes into ``--out``: ``representation_<metric>.png/.pdf`` (teacher × student layer heatmaps per module),
``parametric_similarity.png/.pdf`` (per-layer cosine curves of the PiSSA and Seeking LoRA inits),
``report.md`` (summary numbers) and ``analysis.json`` (every number; written last, so its presence marks a
finished run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from pktjax.errors import ConfigError, PairError

_TASKS = ("gsm", "mmlu", "humaneval", "mbpp")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="parametric and representation similarity of a teacher/student pair")
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder or .gguf")
    p.add_argument("--student", required=True, help="student checkpoint folder or .gguf")
    p.add_argument("--task", required=True, help="probe set: gsm | mmlu | humaneval | mbpp (its LaTen train split) "
                                                  "or a JSONL file of chat examples")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    p.add_argument("--n-examples", type=int, default=16, help="probe examples (default 16)")
    p.add_argument("--metric", choices=("cka", "cosine", "both"), default="cka")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of the PiSSA and Seeking inits (default 16)")
    p.add_argument("--modules", default="up_proj,down_proj,v_proj,o_proj",
                   help="comma-separated modules (default up_proj,down_proj,v_proj,o_proj)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--cutoff-len", type=int, default=768, help="tokens per probe example at most (default 768)")
    p.add_argument("--max-tokens", type=int, default=4096, help="probe tokens counted at most (default 4096)")
    p.add_argument("--no-seeking", action="store_true", help="skip the Seeking init (it needs teacher gradients)")
    p.add_argument("--full-heatmap", action="store_true",
                   help="show and summarise every cell, not only teacher layer >= student layer")
    p.set_defaults(func=_analyze)


def _analyze(args: argparse.Namespace) -> int:
    from pktjax import analysis, plots
    from pktjax.checkpoint import load_model

    out = _out_dir(args.out)
    modules = tuple(m.strip() for m in args.modules.split(",") if m.strip())
    teacher, student = load_model(args.teacher), load_model(args.student)
    examples = _examples(args.task, args.n_examples)
    tokenizer = _shared_tokenizer(args.teacher, args.student, examples)
    metrics = ("cka", "cosine") if args.metric == "both" else (args.metric,)
    triangle = not args.full_heatmap
    t0 = time.time()
    rep = {}
    for metric in metrics:
        rep[metric] = analysis.representation_similarity(
            teacher, student, examples, modules, metric, tokenizer=tokenizer, batch_size=args.batch_size,
            cutoff_len=args.cutoff_len, max_tokens=args.max_tokens)
        plots.plot_heatmaps(rep[metric], out / f"representation_{metric}", metric, teacher_label="teacher",
                            student_label="student", triangle=triangle)
    param, notes = _parametric(args, teacher, student, modules, tokenizer)
    if param:
        plots.plot_parametric(param, out / "parametric_similarity")
    meta = {"teacher": args.teacher, "student": args.student, "probe": f"{args.task} ({len(examples)} examples)",
            "LoRA rank": args.rank, "seconds": round(time.time() - t0, 1), **notes}
    (out / "report.md").write_text(analysis.markdown_report(param, rep, meta, triangle))
    (out / "analysis.json").write_text(json.dumps(_as_json(meta, param, rep, triangle), indent=1))
    print(f"wrote {out}/report.md, analysis.json and the figures")
    return 0


def _out_dir(path: str) -> Path:
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: a file; --out must name a new or empty folder.")
    if out.exists() and any(out.iterdir()):
        what = "another analysis run" if (out / "analysis.json").exists() else "other files"
        raise ConfigError(f"{out}: holds {what}; choose a new or empty --out folder.")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _examples(task: str, n: int) -> list[dict[str, Any]]:
    from pktjax.data import laten_split, read_jsonl

    if n < 1:
        raise ConfigError("--n-examples must be at least 1.")
    path = laten_split(task, "train") if task in _TASKS else Path(task).expanduser()
    return read_jsonl(path, limit=n)


def _shared_tokenizer(teacher_path: str, student_path: str, examples: list[dict[str, Any]]):
    """The student's tokenizer, after checking that the teacher's tokenizes the probe set identically."""
    from pktjax.analysis import probe_tokens
    from pktjax.tokenizer import load_tokenizer

    tok_s, tok_t = load_tokenizer(student_path), load_tokenizer(teacher_path)
    ids_s, ids_t = probe_tokens(examples, tok_s), probe_tokens(examples, tok_t)
    if any(len(a) != len(b) or (a != b).any() for a, b in zip(ids_s, ids_t)):
        raise PairError("teacher and student tokenize the probe set differently; representation similarity needs "
                        "both models to read the same tokens (one tokenizer).")
    return tok_s


def _parametric(args, teacher, student, modules, tokenizer) -> tuple[dict, dict[str, str]]:
    """Parametric similarity of the PiSSA init and, unless skipped or impossible, the Seeking init."""
    from pktjax import analysis, lora

    targets = tuple(m for m in modules if m in lora.LINEAR_NAMES)
    if not targets:
        return {}, {"parametric": "skipped (no projection modules given)"}
    scale = 1.0  # alpha = rank, as in the Seeking setting (SPEC §4)
    _, pissa = lora.init(student.params, student.config, args.rank, args.rank, targets, method="pissa")
    results = {"PiSSA": analysis.parametric_similarity(student.params, student.config, pissa, scale, targets)}
    notes = {}
    if args.no_seeking:
        notes["Seeking"] = "skipped (--no-seeking)"
        return results, notes
    try:
        seeking = _seeking_lora(args, teacher, student, targets, tokenizer)
    except PairError as e:
        notes["Seeking"] = f"skipped ({e})"
        return results, notes
    results["Seeking"] = analysis.parametric_similarity(student.params, student.config, seeking, scale, targets)
    return results, notes


def _seeking_lora(args, teacher, student, targets, tokenizer) -> dict:
    """Seeking's extracted LoRA: teacher sensitivity on the task's seed samples (the probe set for tasks Seeking
    ships no samples for), then the most sensitive sub-matrices factored to rank ``--rank``."""
    from pktjax.data import SEEKING_TASKS, read_jsonl, seeking_file
    from pktjax.seeking import extract_lora
    from pktjax.sensitivity import seed_batches, sensitivity

    if args.task in SEEKING_TASKS:
        seeds = read_jsonl(seeking_file(args.task, "sample"))
    else:
        seeds = _examples(args.task, args.n_examples)
    sens = sensitivity(teacher.params, teacher.config, seed_batches(tokenizer, seeds, args.cutoff_len))
    return extract_lora(teacher, student.config, sens, args.rank, targets=targets)


def _as_json(meta, param, rep, triangle) -> dict[str, Any]:
    from pktjax.analysis import heatmap_summary

    def lst(x):
        return np.asarray(x, np.float64).round(6).tolist()

    return {
        "meta": meta,
        "parametric": {i: {m: {k: lst(v) for k, v in r.items()} for m, r in per.items()} for i, per in param.items()},
        "representation": {metric: {m: {"matrix": lst(mat), **heatmap_summary(mat, triangle)}
                                    for m, mat in mats.items()} for metric, mats in rep.items()},
        "triangle": triangle,
    }
