"""Samples files of the code benchmarks in the ``human-eval`` / EvalPlus format, and pass@k over them.

A samples file is JSONL, one generated program per line: ``{"task_id": "HumanEval/0", "completion": ...,
"solution": ...}`` for HumanEval (``human-eval`` appends ``completion`` to the problem's prompt; EvalPlus runs
``solution`` as is) and ``{"task_id": "Mbpp/11", "solution": ...}`` for MBPP (EvalPlus's ids). A problem may have
several lines (``n`` samples for pass@k). :func:`pktjax.evaluate.evaluate` writes these files;
:func:`pktjax.evaluate.score_samples` scores files made elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from pktjax.errors import DataError
from pktjax.runfolder import read_jsonl, write_jsonl
from pktjax.tasks.common import pass_at_k


def has_samples(mod) -> bool:
    """Whether task module ``mod`` has a samples format (the code benchmarks)."""
    return hasattr(mod, "to_sample")


def samples_path(report: str | os.PathLike, n: int | None = None) -> Path:
    """The samples file beside a report: ``eval/student.json -> eval/student.samples.jsonl`` (greedy) or
    ``eval/student.samples-n10.jsonl`` (``n`` sampled completions per problem)."""
    report = Path(report).expanduser()
    return report.with_name(report.stem + (f".samples-n{n}" if n else ".samples") + ".jsonl")


def write_samples(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``rows`` as JSONL atomically (:func:`pktjax.runfolder.write_jsonl`): a crash never leaves half a file."""
    return write_jsonl(Path(path).expanduser(), list(rows))


def read_samples(path: str | os.PathLike, mod, examples: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """``{example id: [code, ...]}`` of a samples file for task module ``mod``, in the file's order; every line
    needs a ``task_id`` of the task and a ``solution`` or ``completion`` (a :class:`DataError` names the line)."""
    path = Path(path).expanduser()
    by_sample_id = {mod.sample_id(ex): ex for ex in examples}
    by_sample_id.update({str(ex["task_id"]): ex for ex in examples})  # MBPP's plain integer ids too

    def check(row: Any, where: str) -> None:
        if not isinstance(row, dict) or "task_id" not in row or not ({"solution", "completion"} & set(row)):
            raise DataError(f"{where}: a samples line needs 'task_id' and 'solution' or 'completion'.")
        if str(row["task_id"]) not in by_sample_id:
            some = ", ".join(list(by_sample_id)[:2])
            raise DataError(f"{where}: task_id {row['task_id']!r} is not a problem of this task "
                            f"(ids look like {some}); check --task.")

    out: dict[str, list[str]] = {}
    for row in read_jsonl(path, check=check, what="samples file"):
        ex = by_sample_id[str(row["task_id"])]
        out.setdefault(ex["id"], []).append(mod.from_sample(ex, row))
    if not out:
        raise DataError(f"{path}: no samples in the file.")
    return out


def pass_at_ks(counts: Sequence[tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` of the unbiased estimate, from ``(n, c)`` per problem; a ``k`` larger
    than some problem's ``n`` is left out (as ``human-eval`` does)."""
    smallest = min(n for n, _ in counts)
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
            for k in sorted(set(ks)) if k <= smallest}
