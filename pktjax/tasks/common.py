"""Helpers shared by the task modules: benchmark paths, the chat prompt, confidence intervals, paired tests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from pktjax.data import data_root, prompt_and_response
from pktjax.errors import ConfigError, DataError


def bench_path(*parts: str) -> Path:
    """``data_root()/benchmarks/<parts>``; a missing file is a :class:`DataError` that says where it was looked for."""
    path = data_root() / "benchmarks" / Path(*parts)
    if not path.exists():
        raise DataError(f"{path}: benchmark file not found (see benchmarks/README.md in the shared data folder, "
                        "or pass hub=True to read the Hugging Face hub when online).")
    return path


def chat_prompt(turns: Sequence[tuple[str, str]], assistant_prefix: str = "") -> str:
    """Chat text of ``(role, content)`` turns (SPEC §2) ending in ``"<|assistant|>\\n" + assistant_prefix``."""
    messages = [{"role": r, "content": c} for r, c in turns] + [{"role": "assistant", "content": ""}]
    return prompt_and_response({"messages": messages})[0] + assistant_prefix


PROMPT_FORMATS = ("paper", "chat_template")
Render = Callable[[Sequence[tuple[str, str]], str], str]


def chat_template_prompt(tokenizer, source: str | None = None) -> Render:
    """A prompt renderer with the same signature as :func:`chat_prompt` that writes the turns in the model's own
    chat template (the tokenizer's, else a ``.gguf`` source's ``tokenizer.chat_template`` metadata), ending in
    the template's assistant header followed by ``assistant_prefix``."""
    template = getattr(tokenizer, "chat_template", None)
    if not template and source is not None and str(source).endswith(".gguf"):
        from pktjax.gguf_format import read_gguf

        template = read_gguf(source).fields.get("tokenizer.chat_template")
    if not template:
        raise ConfigError(f"prompt_format='chat_template': the tokenizer{f' of {source}' if source else ''} has no "
                          "chat template; use prompt_format='paper' (the paper's <|user|> format).")

    def render(turns: Sequence[tuple[str, str]], assistant_prefix: str = "") -> str:
        messages = [{"role": r, "content": c} for r, c in turns]
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True) + assistant_prefix

    return render


def hub_dataset(name: str, config: str | None, split: str):
    """A split from the Hugging Face hub through ``datasets`` (online use only)."""
    try:
        from datasets import load_dataset
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError("reading the hub needs the `datasets` package.") from e
    return load_dataset(name, config, split=split)


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a proportion ``correct / n`` (95% by default); ``(0, 1)`` when ``n == 0``."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return lo, hi


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value of a paired comparison on the same examples: ``gained`` examples that only
    the new model gets right, ``lost`` that only the old one does. Under the null each discordant example goes
    either way with probability 1/2: ``p = min(1, 2 P[Binomial(n, 1/2) <= min(gained, lost)])``, ``n = gained +
    lost``; 1 when ``n == 0``."""
    if gained < 0 or lost < 0:
        raise ValueError(f"gained={gained}, lost={lost}: counts cannot be negative.")
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate of one problem from ``n`` samples of which ``c`` passed (Chen et al. 2021):
    ``1 - C(n-c, k) / C(n, k)``, computed as ``1 - prod_{i=n-c+1}^{n} (1 - k/i)`` so that large ``n`` neither
    overflows nor loses precision in a ratio of huge binomials."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}.")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
