"""The inputs both frameworks receive: token ids, training batches, and the initial aligner and LoRA factors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from experiments.bench.sizes import Size

PAD = 2  # EOS of the random pair
MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK, LORA_ALPHA = 16, 16.0
ALIGNER_LR, LORA_LR = 3e-5 / 25, 3e-4  # the aligner's one-cycle schedule starts at lr / 25


@dataclass
class Workload:
    ids: np.ndarray  # [1, T] attribution prompt
    target: int
    aligner_batches: list[dict[str, np.ndarray]]  # ids, mask, labels, weight
    lora_batches: list[dict[str, np.ndarray]]  # ids, mask, labels
    aligner: dict[str, dict[str, np.ndarray]]  # {module: {"w1", "w2"}}
    lora: dict[str, dict[str, np.ndarray]]  # {target: {"a": [L, r, in], "b": [L, out, r]}}
    counts: tuple[int, int]  # (N_f, N_a)


def _items(rng: np.random.Generator, n: int, max_len: int, vocab: int) -> list:
    """Random examples of ``max_len/2 .. max_len`` tokens whose first 40% carry no loss."""
    from pktjax.data import IGNORE, Tokenized

    out = []
    for _ in range(n):
        length = int(rng.integers(max_len // 2, max_len + 1))
        ids = rng.integers(3, vocab, length).astype(np.int32)
        labels = ids.copy()
        labels[: int(0.4 * length)] = IGNORE
        out.append(Tokenized(ids, labels))
    return out


def _lora_init(size: Size, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """PEFT-style ``a`` (Kaiming-uniform) and a small random ``b``, so that both factors get a gradient."""
    rng = np.random.default_rng(seed)
    s, hd = size.student, size.student.hidden // size.student.heads
    shapes = {"q_proj": (s.hidden, s.hidden), "k_proj": (s.hidden, s.hidden), "v_proj": (s.hidden, s.hidden),
              "o_proj": (s.hidden, s.heads * hd), "gate_proj": (s.inter, s.hidden), "up_proj": (s.inter, s.hidden),
              "down_proj": (s.hidden, s.inter)}
    out = {}
    for t in LORA_TARGETS:
        o, i = shapes[t]
        bound = 1.0 / np.sqrt(i)
        out[t] = {"a": rng.uniform(-bound, bound, (s.layers, LORA_RANK, i)).astype(np.float32),
                  "b": (0.01 * rng.standard_normal((s.layers, o, LORA_RANK))).astype(np.float32)}
    return out


def make_workload(size: Size, seed: int = 0) -> Workload:
    from pktjax.align import init_aligner
    from pktjax.lora_train import micro_batches as lora_micro_batches
    from pktjax.select import neuron_counts
    from pktjax.train_aligner import micro_batches as aligner_micro_batches

    rng = np.random.default_rng(seed)
    vocab = size.student.vocab
    ids = rng.integers(3, vocab, (1, size.prompt_len)).astype(np.int32)
    items = _items(rng, size.examples, size.train_len, vocab)
    # one bucket of train_len tokens: every micro-batch has one shape, so each side compiles/plans it once
    aligner_batches = aligner_micro_batches(items, size.micro_batch, PAD, size.train_len, size.train_len)
    lora_items = _items(rng, size.lora_batch, size.train_len, vocab)
    lora_batches = [{"ids": b.ids, "mask": b.mask, "labels": b.labels} for b in
                    lora_micro_batches(lora_items, range(len(lora_items)), size.lora_micro, PAD, size.train_len)]
    aligner = init_aligner(jax.random.key(seed), MODULES, size.teacher.hidden, size.student.hidden)
    return Workload(ids=ids, target=int(rng.integers(3, vocab)), aligner_batches=aligner_batches,
                    lora_batches=lora_batches, aligner=jax.tree.map(np.asarray, aligner),
                    lora=_lora_init(size, seed), counts=neuron_counts(size.student.inter, size.student.hidden,
                                                                        size.rate))


def as_numpy(tree: Any) -> Any:
    return jax.tree.map(np.asarray, tree)
