"""HumanEval (164 problems): pass@1 of a greedy completion, run with the problem's tests in the sandbox.

Prompt: user ``"Complete the following python function.\\n\\n\\n" + prompt``; the assistant turn opened with
``"Here is the completed function:\\n\\n\\n```python\\n" + prompt`` so the model continues the function body.
The completion stops at a new top-level statement or the closing fence; the program is the prompt, the
completion, the problem's ``check`` function and ``check(entry_point)``.
"""

from __future__ import annotations

import re
from typing import Any

from pktjax.runfolder import read_jsonl
from pktjax.tasks.common import Render, bench_path, chat_prompt, hub_dataset

KIND = "generate"
MAX_NEW_TOKENS = 512
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "```", "<|user|>", "<|assistant|>")
INSTRUCTION = "Complete the following python function.\n\n\n"
ANSWER_PREFIX = "Here is the completed function:\n\n\n```python\n"


def load(limit: int | None = None, hub: bool = False) -> list[dict[str, Any]]:
    """The problems (``task_id, prompt, entry_point, canonical_solution, test``), plus ``id``."""
    if hub:
        rows = [dict(r) for r in hub_dataset("openai/openai_humaneval", None, "test")]
    else:
        rows = read_jsonl(bench_path("humaneval", "HumanEval.jsonl.gz"), what="benchmark file")
    rows = rows[:limit] if limit is not None else rows
    for r in rows:
        r["id"] = r["task_id"]
    return rows


def data_files(examples: list[dict[str, Any]], few_shot: int) -> list:
    """The local files an evaluation with these settings reads."""
    return [bench_path("humaneval", "HumanEval.jsonl.gz")]


def shots(k: int, hub: bool = False) -> list:
    if k:
        raise ValueError("HumanEval is evaluated zero-shot; few_shot must be 0.")
    return []


def prompt(example: dict[str, Any], exemplars: list, render: Render = chat_prompt) -> str:
    return render([("user", INSTRUCTION + example["prompt"])], ANSWER_PREFIX + example["prompt"])


def extract_code(example: dict[str, Any], completion: str) -> str:
    """The full function: the problem prompt and the completed body, cut at a closing fence. When the model
    restarted the function instead (a top-level ``def <entry_point>``), its code is used as is, after the
    prompt's imports."""
    body = completion.split("```")[0]
    if re.search(rf"^def\s+{re.escape(example['entry_point'])}\s*\(", body, re.M):
        imports = "".join(line + "\n" for line in example["prompt"].splitlines()
                          if line.startswith(("import ", "from ")))
        return imports + body
    return example["prompt"] + body


def check_program(example: dict[str, Any], code: str) -> str:
    """``code`` (the whole function, imports included) followed by the problem's tests: exits 0 iff it passes."""
    return code + "\n\n" + example["test"] + "\n\n" + f"check({example['entry_point']})\n"


def program(example: dict[str, Any], completion: str) -> str:
    """The program that passes iff the completion is correct."""
    return check_program(example, extract_code(example, completion))


def sample_id(example: dict[str, Any]) -> str:
    return example["task_id"]


def to_sample(example: dict[str, Any], completion: str) -> dict[str, str]:
    """One line of a ``human-eval`` / EvalPlus samples file: ``completion`` is appended to the problem's prompt
    by ``human-eval``; ``solution`` (EvalPlus) is the self-contained code. A completion that restarted the
    function follows the prompt's bare signature, which the new definition replaces."""
    code = extract_code(example, completion)
    tail = code[len(example["prompt"]):] if code.startswith(example["prompt"]) else "\n" + code
    return {"task_id": sample_id(example), "completion": tail, "solution": code}


def from_sample(example: dict[str, Any], row: dict[str, Any]) -> str:
    """The code a samples-file line stands for: its ``solution``, else the prompt followed by its ``completion``
    (as ``human-eval`` runs it)."""
    if row.get("solution") is not None:
        return row["solution"]
    return example["prompt"] + row["completion"]
