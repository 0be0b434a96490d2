"""Benchmarks for :func:`pktjax.evaluate`: one module per task with loading, prompts and scoring.

Each task module exposes ``KIND`` (``"generate"`` or ``"choice"``), ``load(limit=None, hub=False) -> list[dict]``
(every example has an ``id``) and ``prompt(example, exemplars) -> str``. Generative tasks add ``shots(k)``,
``STOP`` strings and ``MAX_NEW_TOKENS``, and either ``score(example, completion) -> dict`` (at least
``{"correct": bool}``; GSM8K) or ``program(example, completion) -> str``, a program that exits 0 iff the
completion is right (HumanEval, MBPP; run in :mod:`pktjax.sandbox`); these also have ``check_program(example,
code)``, and ``sample_id``, ``to_sample`` and ``from_sample`` for samples files (:mod:`pktjax.samples`). MMLU (``"choice"``) adds
``dev_exemplars``, ``choice_token_ids``, ``pick_letter`` and ``score(example, letter)``.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

TASKS = ("gsm8k", "mmlu", "humaneval", "mbpp")


def get_task(name: str) -> ModuleType:
    """The task module for ``name`` (one of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return import_module(f"pktjax.tasks.{name}")
