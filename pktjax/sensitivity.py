"""Gradient sensitivity of every parameter (Seeking, SPEC §4): ``S_θ = Σ_examples |θ ⊙ ∂L/∂θ|``.

``L`` is one example's mean cross-entropy over its response tokens; the absolute value is taken per example
before summing, as the Seeking authors accumulate it.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Iterable, Sequence

import chex
import jax
import jax.numpy as jnp

from pktjax.config import ModelConfig
from pktjax.data import Batch, bucket_length, pad_left, tokenize_seeking
from pktjax.losses import mean_token_ce
from pktjax.model import forward

Params = dict[str, Any]


def _example_loss(params: Params, cfg: ModelConfig, ids: jax.Array, mask: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean response-token CE of one example; ``ids, mask, labels [T]``."""
    logits = forward(params, cfg, ids[None], mask[None])
    return mean_token_ce(logits, labels[None])[0]


@partial(jax.jit, static_argnums=3, donate_argnums=0)
def _accumulate(acc: Params, scored: Params, fixed: Params, cfg: ModelConfig, ids: jax.Array, mask: jax.Array,
                labels: jax.Array) -> Params:
    """``acc + Σ_rows |θ ⊙ ∇L_row|`` over the ``scored`` parameters (``fixed`` ones are constants), for
    ``ids, mask, labels [B, T]``, one row at a time (one gradient in memory)."""

    def one(total, row):
        grads = jax.grad(lambda p: _example_loss({**fixed, **p}, cfg, *row))(scored)
        return jax.tree.map(lambda s, p, g: s + jnp.abs(p.astype(jnp.float32) * g.astype(jnp.float32)),
                            total, scored, grads), None

    return jax.lax.scan(one, acc, (ids, mask, labels))[0]


def sensitivity(params: Params, cfg: ModelConfig, batches: Iterable[Batch],
                top: Iterable[str] | None = None, progress: bool = True) -> Params:
    """``Σ |θ ⊙ ∂L/∂θ|`` over every row of every batch (float32, shaped like ``params``).

    ``batches``: :class:`pktjax.data.Batch` objects (``ids, mask, labels [B, T]``, left-padded, labels
    ``IGNORE`` outside the response), e.g. from :func:`seed_batches`. The jitted step compiles once per batch shape.
    ``top``: the entries outside ``"layers"`` to score (``embed``, ``lm_head``, ``final_norm``; default all);
    the others are neither differentiated nor returned, which spares two ``[V, d]`` buffers per vocabulary matrix.
    ``progress``: a bar over the batches.
    """
    from pktjax.progress import progress_bar

    top = set(params) - {"layers"} if top is None else set(top)
    unknown = top - set(params)
    if unknown or "layers" in top:
        raise ValueError(f"top={sorted(top)}: choose among {sorted(set(params) - {'layers'})}.")
    scored = {k: v for k, v in params.items() if k == "layers" or k in top}
    fixed = {k: v for k, v in params.items() if k not in scored}
    acc = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), scored)
    batches = list(batches)
    with progress_bar(len(batches), "sensitivity", "batch", enabled=progress) as bar:
        for batch in batches:
            chex.assert_rank([batch.ids, batch.mask, batch.labels], 2)
            chex.assert_equal_shape([batch.ids, batch.mask, batch.labels])
            acc = _accumulate(acc, scored, fixed, cfg, jnp.asarray(batch.ids), jnp.asarray(batch.mask),
                              jnp.asarray(batch.labels))
            bar.update(1)
    return acc


def seed_batches(tokenizer, examples: Sequence[dict[str, Any]], cutoff_len: int = 2048,
                 multiple: int = 64) -> list[Batch]:
    """Seeking-tokenized seed examples, one per batch, each left-padded to a multiple of ``multiple`` tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for ex in examples:
        item = tokenize_seeking(tokenizer, ex, cutoff_len)
        out.append(pad_left([item], pad, bucket_length(len(item.ids), multiple)))
    return out
