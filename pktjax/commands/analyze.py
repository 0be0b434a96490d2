"""``pktjax analyze``: the neural-incompatibility analysis of a teacher/student pair (SPEC §6).

Writes into ``--out``: ``representation_<metric>.png/.pdf`` (teacher × student layer heatmaps per module),
``parametric_similarity.png/.pdf`` (per-layer cosine curves of the PiSSA and Seeking LoRA inits),
``report.md`` (summary numbers) and ``analysis.json`` (every number; written last, so its presence marks a
finished run). The work is :func:`pktjax.workflows.analyze_pair`, which ``pktjax transfer`` runs too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pktjax.commands import task_argument
from pktjax.errors import ConfigError
from pktjax.settings import AnalysisSettings, DeviceSettings, add_arguments, from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="parametric and representation similarity of a teacher/student pair")
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder or .gguf")
    p.add_argument("--student", required=True, help="student checkpoint folder or .gguf")
    task_argument(p, "data", required=True, help="probe set: gsm | mmlu | humaneval | mbpp (its LaTen train split) "
                                                  "or a JSONL file of chat examples")
    p.add_argument("--out", required=True, help="output folder (new or empty)")
    add_arguments(p, AnalysisSettings, batch_size={"help": "probe examples per forward pass"},
                  seeking={"help": "also the Seeking init (it needs teacher gradients; --no-seeking skips it)"})
    add_arguments(p, DeviceSettings, ("mesh", "dtype"))
    p.set_defaults(func=_analyze)


def _analyze(args: argparse.Namespace) -> int:
    from pktjax import sharding as S
    from pktjax.checkpoint import load_model
    from pktjax.workflows import analyze_pair, probe_examples, probe_file, seed_examples, seed_file, shared_tokenizer

    a = from_args(AnalysisSettings, args)  # --n-examples 0, --rank 0, ... are refused before any work
    mesh = S.as_mesh(args.mesh)
    out = _out_dir(args.out)
    examples = probe_examples(args.task, a.n_examples)
    tokenizer = shared_tokenizer(args.teacher, args.student, examples)
    seeds = seed_examples(args.task, probe=a.n_examples) if a.seeking else None
    meta = {"teacher": args.teacher, "student": args.student, "probe": f"{args.task} ({len(examples)} examples)"}
    if not a.seeking:
        meta["Seeking"] = "skipped (--no-seeking)"
    teacher, student = (load_model(m, dtype=args.dtype, mesh=mesh) for m in (args.teacher, args.student))
    analyze_pair(teacher, student, examples, out, tokenizer=tokenizer,
                 metric=a.metric, rank=a.rank, modules=list(a.modules),
                 batch_size=a.batch_size, cutoff_len=a.cutoff_len, max_tokens=a.max_tokens,
                 triangle=not a.full_heatmap, seeking_seeds=seeds, meta=meta,
                 data_files=[probe_file(args.task), *([seed_file(args.task)] if a.seeking else [])])
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
