"""Losses shared by the aligner and LoRA trainers."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pktjax.data import IGNORE


def token_cross_entropy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Next-token cross-entropy. ``logits [B, T, V]`` at position ``t`` predict ``labels [B, T]`` at ``t + 1``.

    Returns ``(ce_sum [B], n_tokens [B])`` over the positions whose label is not ``IGNORE``.
    """
    logits, targets = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    valid = targets != IGNORE
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0), axis=-1), jnp.sum(valid, axis=-1)


def mean_token_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-example mean token cross-entropy ``[B]`` (0 for an example without loss tokens)."""
    total, n = token_cross_entropy(logits, labels)
    return total / jnp.maximum(n, 1)
