"""MMLU test (14,042 questions, 57 subjects): the answer letter scored from next-token logits.

Prompt (the LaTen MMLU chat format): user ``"The following are multiple choice questions (with answers) about
<subject>.\\n\\n"`` + ``k`` dev exemplars ``"<q>\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: X\\n\\n"`` + the question in
the same form ending ``"Answer:"``; the assistant turn opened with ``"The answer is:"``. The prediction is the
letter whose token (last token of ``" A"``, ``" B"``, ...) has the highest logit at the next position.
"""

from __future__ import annotations

import csv
from typing import Any, Sequence

import numpy as np

from pktjax.runfolder import read_jsonl
from pktjax.tasks.common import Render, bench_path, chat_prompt, hub_dataset

KIND = "choice"
LETTERS = ("A", "B", "C", "D")
ASSISTANT_PREFIX = "The answer is:"


def load(limit: int | None = None, hub: bool = False) -> list[dict[str, Any]]:
    """``[{"id", "subject", "question", "choices", "gold"}]`` from ``benchmarks/mmlu/test.jsonl`` (or the hub).

    ``limit`` is stratified across subjects: the first question of every subject (alphabetically), then the
    second of every subject, and so on until ``limit`` questions (a subject with fewer questions drops out), kept
    in the file's order; ``id`` is ``mmlu/<subject>/<index in the whole test set>`` either way."""
    if hub:
        rows = hub_dataset("cais/mmlu", "all", "test")
        out = [{"subject": r["subject"], "question": r["question"], "choices": [str(c) for c in r["choices"]],
                "gold": LETTERS[int(r["answer"])]} for r in rows]
    else:
        out = [{"subject": r["topic"].replace(" ", "_"), "question": r["question"],
                "choices": [str(r[f"answer_{x}"]) for x in "abcd"], "gold": r["correct_answer"].strip()}
               for r in read_jsonl(bench_path("mmlu", "test.jsonl"))]
    for i, ex in enumerate(out):
        ex["id"] = f"mmlu/{ex['subject']}/{i}"
    return out if limit is None else stratified(out, limit)


def stratified(rows: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """``limit`` rows taken round-robin over the subjects (alphabetical), returned in their original order."""
    by_subject: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_subject.setdefault(r["subject"], []).append(i)
    queues = [by_subject[s] for s in sorted(by_subject)]
    chosen: list[int] = []
    depth = 0
    while len(chosen) < min(limit, len(rows)):
        chosen += [q[depth] for q in queues if depth < len(q)][:limit - len(chosen)]
        depth += 1
    return [rows[i] for i in sorted(chosen)]


def data_files(examples: list[dict[str, Any]], few_shot: int) -> list:
    """The local files an evaluation with these settings reads (the dev file of each subject when few-shot)."""
    subjects = sorted({ex["subject"] for ex in examples}) if few_shot else []
    return [bench_path("mmlu", "test.jsonl"), *(bench_path("mmlu", "dev", f"{s}_dev.csv") for s in subjects)]


def dev_exemplars(subject: str, hub: bool = False) -> list[dict[str, Any]]:
    """The 5 dev questions of ``subject`` (the fixed few-shot exemplars)."""
    if hub:
        rows = hub_dataset("cais/mmlu", subject, "dev")
        return [{"question": r["question"], "choices": [str(c) for c in r["choices"]],
                 "gold": LETTERS[int(r["answer"])]} for r in rows]
    with open(bench_path("mmlu", "dev", f"{subject}_dev.csv"), newline="", encoding="utf-8") as fh:
        return [{"question": r[0], "choices": r[1:5], "gold": r[5].strip()} for r in csv.reader(fh)]


def format_question(ex: dict[str, Any], with_answer: bool) -> str:
    text = ex["question"] + "".join(f"\n{L}. {c}" for L, c in zip(LETTERS, ex["choices"])) + "\nAnswer:"
    return text + (f" {ex['gold']}\n\n" if with_answer else "")


def prompt(example: dict[str, Any], exemplars: Sequence[dict[str, Any]], render: Render = chat_prompt) -> str:
    subject = example["subject"].replace("_", " ")
    head = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    user = head + "".join(format_question(e, True) for e in exemplars) + format_question(example, False)
    return render([("user", user)], ASSISTANT_PREFIX)


def choice_token_ids(tokenizer) -> list[int]:
    """Token id of each letter as it follows ``"The answer is:"``: the last token of ``" A"`` .. ``" D"``."""
    ids = [tokenizer(" " + L, add_special_tokens=False)["input_ids"][-1] for L in LETTERS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer maps the answer letters to non-distinct tokens {ids}.")
    return ids


def pick_letter(logits: np.ndarray, choice_ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """``logits [V]`` at the answer position -> (letter with the highest logit, probabilities over the 4 letters)."""
    sub = np.asarray(logits, np.float64)[list(choice_ids)]
    probs = np.exp(sub - sub.max())
    probs /= probs.sum()
    return LETTERS[int(np.argmax(sub))], probs


def score(example: dict[str, Any], letter: str) -> dict[str, Any]:
    return {"correct": letter == example["gold"], "pred": letter, "gold": example["gold"]}
