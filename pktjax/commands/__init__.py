"""Sub-commands of the ``pktjax`` command line, one module per command group, and the option helpers they share."""

from __future__ import annotations

import argparse
from typing import Callable


def list_argument(p: argparse.ArgumentParser, *flags: str, item: Callable[[str], object] = str, **kw) -> None:
    """An option taking a list, written the same way by every command: space-separated, comma-separated or both
    (``--modules up_proj down_proj``, ``--modules up_proj,down_proj``); the value is a tuple of ``item(s)``."""

    class _Items(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            try:
                parsed = tuple(item(v.strip()) for value in values for v in value.split(",") if v.strip())
            except ValueError as e:
                parser.error(f"{option_string}: {e}")
            setattr(namespace, self.dest, parsed)

    p.add_argument(*flags, nargs="+", action=_Items, **kw)


def task_argument(p: argparse.ArgumentParser, kind: str, **kw) -> None:
    """``--task``: ``kind="benchmark"`` (gsm8k, mmlu, humaneval, mbpp) or ``"data"`` (a data folder's name:
    gsm, mmlu, ..., or a JSONL path); ``gsm`` and ``gsm8k`` are accepted alike either way."""
    from pktjax.tasks import TASKS, benchmark_name, data_name

    if kind == "benchmark":
        p.add_argument("--task", type=benchmark_name, choices=TASKS, **kw)
    else:
        p.add_argument("--task", type=data_name, **kw)
