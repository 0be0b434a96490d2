"""MBPP test split (task_ids 11-510): pass@1 of a greedy completion, run with the 3 asserts in the sandbox.

Prompt (the LaTen MBPP chat format): user ``"Complete the following python function.\\n\\n\\n<text>\\n<head>"``,
where ``head`` is the reference code up to the signature of the tested function (without its colon); the
assistant turn opened with ``"Here is the completed function:\\n\\n\\n```python\\n"``. Few-shot exemplars are
the prompt split (task_ids 2, 3, 4 first, then 1, 5-10) as earlier chat turns with complete answers.
"""

from __future__ import annotations

import re
from typing import Any

from pktjax.runfolder import read_jsonl
from pktjax.tasks.common import Render, bench_path, chat_prompt, hub_dataset

KIND = "generate"
MAX_NEW_TOKENS = 512
STOP = ("```", "<|user|>", "<|assistant|>", "\nassert", "\nprint(", "\nif __name__")
INSTRUCTION = "Complete the following python function.\n\n\n"
ANSWER_PREFIX = "Here is the completed function:\n\n\n```python\n"
TEST_IDS = range(11, 511)
SHOT_IDS = (2, 3, 4, 1, 5, 6, 7, 8, 9, 10)


def _all(hub: bool) -> list[dict[str, Any]]:
    if hub:
        rows = []
        for split in ("train", "test", "validation", "prompt"):
            rows += [dict(r) for r in hub_dataset("google-research-datasets/mbpp", "full", split)]
        return sorted(rows, key=lambda r: r["task_id"])
    return read_jsonl(bench_path("mbpp", "mbpp.jsonl"))


def load(limit: int | None = None, hub: bool = False) -> list[dict[str, Any]]:
    """The test split (task_ids 11-510) with ``id``."""
    rows = [r for r in _all(hub) if r["task_id"] in TEST_IDS]
    rows = rows[:limit] if limit is not None else rows
    for r in rows:
        r["id"] = f"mbpp/{r['task_id']}"
    return rows


def data_files(examples: list[dict[str, Any]], few_shot: int) -> list:
    """The local files an evaluation with these settings reads."""
    return [bench_path("mbpp", "mbpp.jsonl")]


def shots(k: int, hub: bool = False) -> list[dict[str, Any]]:
    if k <= 0:
        return []
    if k > len(SHOT_IDS):
        raise ValueError(f"MBPP has {len(SHOT_IDS)} prompt-split exemplars; few_shot={k} is too many.")
    by_id = {r["task_id"]: r for r in _all(hub) if r["task_id"] in SHOT_IDS}
    return [by_id[i] for i in SHOT_IDS[:k]]


def head(example: dict[str, Any]) -> str:
    """The reference code up to the colon of its first ``def``/``class`` line (as the LaTen prompts show it)."""
    code = example["code"]
    m = re.search(r"^[ \t]*(?:def|class)\b", code, re.M)
    if m is None:
        raise ValueError(f"MBPP task {example['task_id']}: no function definition in the reference code.")
    colon = code.find(":", m.start())
    return code[:colon] if colon >= 0 else code


def _user(example: dict[str, Any]) -> str:
    return INSTRUCTION + example["text"] + "\n" + head(example)


def prompt(example: dict[str, Any], exemplars: list[dict[str, Any]], render: Render = chat_prompt) -> str:
    turns = []
    for e in exemplars:
        turns += [("user", _user(e)), ("assistant", ANSWER_PREFIX + e["code"] + "\n```")]
    turns.append(("user", _user(example)))
    return render(turns, ANSWER_PREFIX)


def extract_code(completion: str) -> str:
    """The code block of a completion: everything before a closing fence, without a repeated opening fence."""
    text = completion
    if text.lstrip().startswith("```"):
        text = text.lstrip()[3:]
        text = text[text.find("\n") + 1:] if "\n" in text else ""
    return text.split("```")[0]


def check_program(example: dict[str, Any], code: str) -> str:
    """The code, then ``test_setup_code`` (it may use the code's classes, as in task 367), then the asserts."""
    setup = example.get("test_setup_code") or ""
    tests = "\n".join(example["test_list"])
    return f"{code}\n\n{setup}\n{tests}\n"


def program(example: dict[str, Any], completion: str) -> str:
    return check_program(example, extract_code(completion))


def sample_id(example: dict[str, Any]) -> str:
    """EvalPlus's spelling of the task id (``Mbpp/11``)."""
    return f"Mbpp/{example['task_id']}"


def to_sample(example: dict[str, Any], completion: str) -> dict[str, str]:
    """One line of an EvalPlus samples file: the self-contained ``solution``."""
    return {"task_id": sample_id(example), "solution": extract_code(completion)}


def from_sample(example: dict[str, Any], row: dict[str, Any]) -> str:
    """The code a samples-file line stands for (``solution``, or a bare ``completion``)."""
    return row["solution"] if row.get("solution") is not None else row["completion"]
