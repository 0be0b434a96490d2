"""Task data: JSONL chat examples, the Tulu-style chat text, and the two tokenizations (SPEC §2).

An example is ``{"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]}``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pktjax import runfolder
from pktjax.errors import DataError

IGNORE = -100  # label of a token that carries no loss
LATEN_TASKS = ("gsm", "mmlu", "humaneval", "mbpp")
SEEKING_TASKS = ("gsm", "mmlu", "super_ni", "lima")
_ROLES = ("system", "user", "assistant")


def data_root() -> Path:
    """The shared data folder: ``$PKTJAX_DATA``, else the first ``shared/data`` found beside the working
    directory or this package's checkout (``../shared/data`` from the repository root)."""
    env = os.environ.get("PKTJAX_DATA")
    if env:
        return Path(env).expanduser()
    for base in (Path.cwd(), Path(__file__).resolve().parent):
        for parent in (base, *base.parents):
            cand = parent / "shared" / "data"
            if cand.is_dir():
                return cand
    raise DataError("cannot find the shared data folder; set PKTJAX_DATA to the folder holding laten/, seeking/ "
                    "and benchmarks/ (in a checkout it is ../shared/data).")


def laten_split(task: str, split: str) -> Path:
    """Path of a LaTen split: ``laten/<task>/<task>_<split>_split.jsonl`` (split: extract | align | train)."""
    if task not in LATEN_TASKS:
        raise DataError(f"unknown LaTen task {task!r}; choose one of {', '.join(LATEN_TASKS)} or pass a JSONL path.")
    return data_root() / "laten" / task / f"{task}_{split}_split.jsonl"


def seeking_file(task: str, kind: str) -> Path:
    """Seeking data: ``kind="sample"`` (32 seed examples) or ``"train"`` (1000 fine-tuning examples)."""
    if task not in SEEKING_TASKS:
        raise DataError(f"unknown Seeking task {task!r}; choose one of {', '.join(SEEKING_TASKS)} or pass a JSONL path.")
    name = f"sample_{task}.jsonl" if kind == "sample" else f"{task}_data_1000.jsonl"
    return data_root() / "seeking" / task / name


def read_jsonl(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """Read chat examples (:func:`pktjax.runfolder.read_jsonl`, every line checked by :func:`check_example`); a
    missing file, a bad line (JSON, UTF-8, shape) or an empty file is a :class:`DataError` naming it."""
    out = runfolder.read_jsonl(path, limit, check=check_example)
    if not out:
        raise DataError(f"{path}: the split is empty; it needs at least one example.")
    return out


def check_example(ex: Any, where: str = "example") -> None:
    msgs = ex.get("messages") if isinstance(ex, dict) else None
    if not isinstance(msgs, list) or len(msgs) < 2:
        raise DataError(f"{where}: expected {{'messages': [...]}} with a prompt and a final assistant message.")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: each message needs a role in {_ROLES} and a string content.")


def _turn(msg: dict[str, str]) -> str:
    return f"<|{msg['role']}|>\n{msg['content'].strip()}\n\n"


def prompt_and_response(ex: dict[str, Any]) -> tuple[str, str]:
    """``(user prompt, response)``: the prompt is every message but the last, then ``"<|assistant|>\\n"``;
    the response is the last message's stripped content followed by ``"\\n\\n"``."""
    msgs = ex["messages"]
    prompt = "".join(_turn(m) for m in msgs[:-1]) + "<|assistant|>\n"
    return prompt, msgs[-1]["content"].strip() + "\n\n"


@dataclass(frozen=True)
class Tokenized:
    """One tokenized example: ``ids [T]`` and ``labels [T]`` (``IGNORE`` where there is no loss); ``extra [T, k]``
    optionally carries per-token float values along (SemAlign's layer targets)."""

    ids: np.ndarray
    labels: np.ndarray
    extra: np.ndarray | None = None


def _encode(tokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def tokenize_laten(tokenizer, ex: dict[str, Any], cutoff_len: int = 768, train_on_inputs: bool = False) -> Tokenized:
    """LaTen tokenization: no BOS, EOS appended when shorter than ``cutoff_len``, truncated to ``cutoff_len``,
    loss on the response only unless ``train_on_inputs``."""
    prompt, response = prompt_and_response(ex)
    ids = _encode(tokenizer, prompt + response)[:cutoff_len]
    if len(ids) < cutoff_len and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    labels = list(ids)
    if not train_on_inputs:
        n_prompt = min(len(_encode(tokenizer, prompt)), len(ids))
        labels[:n_prompt] = [IGNORE] * n_prompt
    return Tokenized(np.asarray(ids, np.int32), np.asarray(labels, np.int32))


def tokenize_seeking(tokenizer, ex: dict[str, Any], cutoff_len: int = 2048) -> Tokenized:
    """Seeking tokenization: the tokenizer's own special prefix (BOS where it adds one), the assistant turn ending
    with the EOS token instead of ``"\\n\\n"``, loss on the response only, truncated to ``cutoff_len``."""
    prompt, response = prompt_and_response(ex)
    prompt_ids = _encode(tokenizer, prompt, add_special_tokens=True)
    ids = (_encode(tokenizer, prompt + response.rstrip("\n"), add_special_tokens=True) + [tokenizer.eos_token_id])
    ids = ids[:cutoff_len]
    n_prompt = min(len(prompt_ids), len(ids))
    labels = [IGNORE] * n_prompt + ids[n_prompt:]
    return Tokenized(np.asarray(ids, np.int32), np.asarray(labels, np.int32))


@dataclass(frozen=True)
class Batch:
    """Left-padded batch: ``ids, mask, labels [B, T]`` (numpy); ``extra [B, T, k]`` when the items carry one."""

    ids: np.ndarray
    mask: np.ndarray
    labels: np.ndarray
    extra: np.ndarray | None = None


def pad_left(items: Sequence[Tokenized], pad_id: int, length: int | None = None) -> Batch:
    """Left-pad to ``length`` (default: the longest item) with ``pad_id``; pads get mask 0 and label ``IGNORE``
    (and ``extra`` 0; an item without ``extra`` beside items with one, e.g. a filler row, gets zeros)."""
    length = length or max(len(t.ids) for t in items)
    ids = np.full((len(items), length), pad_id, np.int32)
    labels = np.full((len(items), length), IGNORE, np.int32)
    mask = np.zeros((len(items), length), np.int32)
    width = next((t.extra.shape[-1] for t in items if t.extra is not None), None)
    extra = None if width is None else np.zeros((len(items), length, width), np.float32)
    for i, t in enumerate(items):
        n = len(t.ids)
        if n > length:
            raise DataError(f"example {i} has {n} tokens, more than the batch length {length}.")
        ids[i, length - n:] = t.ids
        labels[i, length - n:] = t.labels
        mask[i, length - n:] = 1
        if extra is not None and t.extra is not None and n:
            extra[i, length - n:] = t.extra
    return Batch(ids, mask, labels, extra)


def bucket_length(n: int, multiple: int = 64) -> int:
    """Round a length up so that jitted functions see few distinct shapes."""
    return max(multiple, -(-n // multiple) * multiple)


def iter_chunks(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i:i + size]
