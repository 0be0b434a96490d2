"""Benchmarks for :func:`pktjax.evaluate`: one module per task with loading, prompts and scoring.

Each task module exposes ``KIND`` (``"generate"`` or ``"choice"``), ``load(limit=None, hub=False) -> list[dict]``
(every example has an ``id``), ``prompt(example, exemplars, render=chat_prompt) -> str`` and
``data_files(examples, few_shot)`` (the local files read, for the report's provenance). Generative tasks add
``shots(k)``, ``STOP`` strings and ``MAX_NEW_TOKENS``, and either ``score(example, completion) -> dict`` (at least
``{"correct": bool}``; GSM8K) or ``program(example, completion) -> str``, a program that exits 0 iff the
completion is right (HumanEval, MBPP; run in :mod:`pktjax.sandbox`); these also have ``check_program(example,
code)``, and ``sample_id``, ``to_sample`` and ``from_sample`` for samples files (:mod:`pktjax.samples`). MMLU
(``"choice"``) adds ``dev_exemplars``, ``choice_token_ids``, ``pick_letter`` and ``score(example, letter)``.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

TASKS = ("gsm8k", "mmlu", "humaneval", "mbpp")
# the benchmark's name of each data folder's name (laten/gsm, seeking/gsm hold GSM8K training data)
_BENCHMARK_OF = {"gsm": "gsm8k"}
_FOLDER_OF = {v: k for k, v in _BENCHMARK_OF.items()}


def benchmark_name(name: str) -> str:
    """One naming scheme for tasks: ``gsm`` and ``gsm8k`` alike give the benchmark's name (``gsm8k``)."""
    return _BENCHMARK_OF.get(name, name)


def data_name(name: str) -> str:
    """The data folder's name of a task (``gsm8k`` and ``gsm`` alike give ``gsm``); other names and paths are
    returned as they are."""
    return _FOLDER_OF.get(name, name)


def get_task(name: str) -> ModuleType:
    """The task module for ``name`` (one of :data:`TASKS`, or ``gsm`` for ``gsm8k``)."""
    name = benchmark_name(name)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return import_module(f"pktjax.tasks.{name}")
