"""Copy the small, publishable files of a ``pktjax transfer`` run folder into a results folder.

    python -m experiments.collect_results runs/qwen-coder-mbpp-cpu experiments/results/mbpp_cpu

Takes the report (``report.md``, ``scores.json``, ``timings.json``, ``transfer.json``, the PNG figures),
the per-example records of every evaluation, the aligner logs, the LoRA-trained students' metrics and training
configs, Seeking's extraction summary and the analysis's numbers and PNG figures; leaves out weights,
checkpoints and adapters. Nested files are flattened by seed so a results folder reads at a glance::

    eval/student.json                      <- eval/student.json
    laten/seed42_step0_eval.json           <- laten/seed42/step0/eval.json      (also injection.json)
    laten/seed42_aligner_log.jsonl         <- laten/seed42/aligner/log.jsonl
    laten/seed42_trained.json              <- laten/seed42/trained.json         (the aligner's stage marker)
    laten/lr3e-05/seed42_step0_eval.json   <- laten/lr3e-05/seed42/step0/eval.json  (several learning rates)
    lora/seed1_metrics.jsonl               <- lora/seed1/metrics.jsonl        (also seeking/, pissa/)
    seeking/extraction.json                <- seeking/extracted/extraction.json
    analysis/analysis.json, analysis/*.png <- analysis/

Every file is written to a temporary name and renamed, so an interrupted copy leaves no half-written file.

``--restore`` goes the other way: it puts a results folder's resumable files back where a run folder keeps them
(``transfer.json``, ``timings.json``, the evaluations, each aligner's stage marker and each fused step's report and
fuse record), so the same ``pktjax transfer`` command resumes on a machine that never held the run: finished
evaluations and fused steps are not redone. Aligner checkpoints are not in a results folder, so a seed whose
steps all have reports resumes, and one whose training was cut off trains again from its start::

    python -m experiments.collect_results --restore experiments/results/humaneval_protocol runs/qwen-coder-humaneval-protocol
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from pathlib import Path

TOP = ("report.md", "scores.json", "timings.json", "transfer.json", "aligner_curves.png", "delta_vs_score.png")
# (pattern relative to the run folder, destination built from the match's named groups)
NESTED = (
    (r"eval/(?P<name>[^/]+\.(?:json|samples\.jsonl))", "eval/{name}"),
    (r"laten/(?P<lr>lr[^/]+/)?seed(?P<seed>\d+)/step(?P<step>\d+)/(?P<name>eval|injection)\.json",
     "laten/{lr}seed{seed}_step{step}_{name}.json"),
    (r"laten/(?P<lr>lr[^/]+/)?seed(?P<seed>\d+)/aligner/log\.jsonl", "laten/{lr}seed{seed}_aligner_log.jsonl"),
    (r"laten/(?P<lr>lr[^/]+/)?seed(?P<seed>\d+)/trained\.json", "laten/{lr}seed{seed}_trained.json"),
    (r"(?P<m>seeking|lora|pissa)/seed(?P<seed>\d+)/(?P<name>eval\.json|metrics\.jsonl|train_config\.json)",
     "{m}/seed{seed}_{name}"),
    (r"seeking/extracted/extraction\.json", "seeking/extraction.json"),
    (r"analysis/(?P<name>[^/]+\.(?:json|png))", "analysis/{name}"),
)


def plan(run: Path) -> dict[str, Path]:
    """``{destination relative path: source file}`` of every file :func:`collect` copies from ``run``."""
    if not (run / "transfer.json").is_file():
        raise SystemExit(f"{run} is not a pktjax transfer run folder (no transfer.json): name the folder given "
                         "as `out` in the run's config.")
    out = {name: run / name for name in TOP if (run / name).is_file()}
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        rel = path.relative_to(run).as_posix()
        for pattern, dest in NESTED:
            m = re.fullmatch(pattern, rel)
            if m:
                out[dest.format(**{k: v or "" for k, v in m.groupdict().items()})] = path
                break
    return out


def collect(run: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Copy :func:`plan`'s files of ``run`` into ``dest`` (created; files already there are replaced). Returns
    the destination paths written, relative to ``dest``."""
    run, dest = Path(run), Path(dest)
    files = plan(run)
    for rel, src in files.items():
        _copy(src, dest / rel)
    return sorted(files)


def _copy(src: Path, target: Path) -> None:
    """``src`` onto ``target`` through a temporary beside it, so an interrupted copy leaves no half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, target)


# what a resumed run reads back (results-folder pattern, run-folder destination): see ``--restore``
RESUMABLE = (
    (r"(?P<name>transfer|timings)\.json", "{name}.json"),
    (r"eval/(?P<name>[^/]+\.(?:json|samples\.jsonl))", "eval/{name}"),
    (r"laten/(?P<lr>lr[^/]+/)?seed(?P<seed>\d+)_step(?P<step>\d+)_(?P<name>eval|injection)\.json",
     "laten/{lr}seed{seed}/step{step}/{name}.json"),
    (r"laten/(?P<lr>lr[^/]+/)?seed(?P<seed>\d+)_trained\.json", "laten/{lr}seed{seed}/trained.json"),
)


def restore(results: str | os.PathLike, run: str | os.PathLike) -> list[str]:
    """Copy a results folder's resumable files (:data:`RESUMABLE`) into the run folder ``run``, which must be new
    or hold the same run (the same ``transfer.json``); files already in ``run`` are kept. Returns the run-folder
    paths written."""
    results, run = Path(results), Path(run)
    marker = results / "transfer.json"
    if not marker.is_file():
        raise SystemExit(f"{results} holds no transfer.json: name a folder written by this script from a run.")
    if (run / "transfer.json").is_file() and (run / "transfer.json").read_bytes() != marker.read_bytes():
        raise SystemExit(f"{run} holds another run (its transfer.json differs from {marker}): restore into a new "
                         "folder.")
    written = []
    for path in sorted(p for p in results.rglob("*") if p.is_file()):
        rel = path.relative_to(results).as_posix()
        for pattern, dest in RESUMABLE:
            m = re.fullmatch(pattern, rel)
            if m:
                target = run / dest.format(**{k: v or "" for k, v in m.groupdict().items()})
                if not target.exists():
                    _copy(path, target)
                    written.append(target.relative_to(run).as_posix())
                break
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="the run folder (the config's `out`); with --restore, the results folder")
    ap.add_argument("dest", help="the results folder to fill; with --restore, the run folder")
    ap.add_argument("--restore", action="store_true",
                    help="copy a results folder's resumable files back into a run folder (see the module's text)")
    args = ap.parse_args(argv)
    if args.restore:
        written = restore(args.run, args.dest)
        print(f"{len(written)} files restored into {args.dest}")
        return
    written = collect(args.run, args.dest)
    print(f"{len(written)} files copied into {args.dest}")


if __name__ == "__main__":
    main()
