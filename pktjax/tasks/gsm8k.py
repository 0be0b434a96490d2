"""GSM8K test (1319 problems): chain-of-thought generation, exact match of the final number.

Prompt (the LaTen GSM chat format): user ``"Answer the following question.\\n\\nQuestion: <question>"``, the
assistant turn opened with ``"Answer:"``. Few-shot exemplars are the first ``k`` examples of the LaTen GSM train
split, given as earlier chat turns. The prediction is the number after the last "answer is" (or ``####``),
otherwise the last number of the completion.
"""

from __future__ import annotations

import re
from typing import Any

from pktjax.data import data_root, read_jsonl as read_chat
from pktjax.runfolder import read_jsonl
from pktjax.tasks.common import Render, bench_path, chat_prompt, hub_dataset

KIND = "generate"
MAX_NEW_TOKENS = 512
STOP = ("\n\n", "<|user|>", "<|assistant|>", "\nQuestion:")
INSTRUCTION = "Answer the following question.\n\n"
_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def load(limit: int | None = None, hub: bool = False) -> list[dict[str, Any]]:
    """``[{"id", "question", "answer", "gold"}]`` from ``benchmarks/gsm8k/test.jsonl`` (or the hub)."""
    if hub:
        rows = [dict(r) for r in hub_dataset("openai/gsm8k", "main", "test")]
        rows = rows[:limit] if limit is not None else rows
    else:
        rows = read_jsonl(bench_path("gsm8k", "test.jsonl"), limit)
    return [{"id": f"gsm8k/{i}", "question": r["question"], "answer": r["answer"], "gold": gold_answer(r["answer"])}
            for i, r in enumerate(rows)]


def data_files(examples: list[dict[str, Any]], few_shot: int) -> list:
    """The local files an evaluation with these settings reads."""
    shots_file = [data_root() / "laten" / "gsm" / "gsm_train_split.jsonl"] if few_shot else []
    return [bench_path("gsm8k", "test.jsonl"), *shots_file]


def shots(k: int, hub: bool = False) -> list[tuple[str, str]]:
    """``k`` exemplar ``(user, assistant)`` turns from the LaTen GSM train split."""
    if k <= 0:
        return []
    rows = read_chat(data_root() / "laten" / "gsm" / "gsm_train_split.jsonl", limit=k)
    return [(r["messages"][0]["content"], r["messages"][-1]["content"]) for r in rows]


def prompt(example: dict[str, Any], exemplars: list[tuple[str, str]], render: Render = chat_prompt) -> str:
    turns = [t for u, a in exemplars for t in (("user", u), ("assistant", a))]
    turns.append(("user", INSTRUCTION + "Question: " + example["question"].strip()))
    return render(turns, "Answer:")


def gold_answer(answer: str) -> str:
    """The reference number after ``####``, without thousands separators."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-80:]!r}")
    return normalize_number(answer.split("####")[-1].strip())


def normalize_number(text: str) -> str:
    """``"1,234.50" -> "1234.5"``, ``"$18." -> "18"``; non-numbers come back stripped."""
    text = _THOUSANDS.sub("", text.strip()).replace("$", "").rstrip(".")
    m = _NUMBER.search(text)
    if not m:
        return text
    num = m.group(0)
    if "." in num:
        num = num.rstrip("0").rstrip(".") or "0"
    if num.startswith("-") and num.strip("-0.") == "":
        num = "0"
    return num


def extract_answer(completion: str) -> str | None:
    """The predicted number of a completion: the first number after the last "answer is" or ``####``, else the
    last number in the text; None when there is no number."""
    text = _THOUSANDS.sub("", completion)
    for marker in ("####", "answer is"):
        idx = text.lower().rfind(marker)
        if idx >= 0:
            m = _NUMBER.search(text, idx + len(marker))
            if m:
                return normalize_number(m.group(0))
    found = _NUMBER.findall(text)
    return normalize_number(found[-1]) if found else None


def same_number(a: str | None, b: str) -> bool:
    if a is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return a == b


def score(example: dict[str, Any], completion: str) -> dict[str, Any]:
    pred = extract_answer(completion)
    return {"correct": same_number(pred, example["gold"]), "pred": pred, "gold": example["gold"]}
