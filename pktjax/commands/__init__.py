"""Sub-commands of the ``pktjax`` command line, one module per command group, and the option helpers they share."""

from __future__ import annotations

import argparse
from typing import Callable

from pktjax.settings import list_action
from pktjax.tasks import TASKS, benchmark_name, data_name

def list_argument(p: argparse.ArgumentParser, *flags: str, item: Callable[[str], object] = str, **kw) -> None:
    """An option taking a list, written the same way by every command: space-separated, comma-separated or both
    (``--modules up_proj down_proj``, ``--modules up_proj,down_proj``); the value is a tuple of ``item(s)``."""
    p.add_argument(*flags, nargs="+", action=list_action(item), **kw)


def task_argument(p: argparse.ArgumentParser, kind: str, **kw) -> None:
    """``--task``: ``kind="benchmark"`` (gsm8k, mmlu, humaneval, mbpp) or ``"data"`` (a data folder's name:
    gsm, mmlu, ..., or a JSONL path); ``gsm`` and ``gsm8k`` are accepted alike either way."""
    if kind == "benchmark":
        p.add_argument("--task", type=benchmark_name, choices=TASKS, **kw)
    else:
        p.add_argument("--task", type=data_name, **kw)

