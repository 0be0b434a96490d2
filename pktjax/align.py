"""LaTen's *align* stage (SPEC §3.4): one small hypernetwork per module maps teacher vectors to student space.

``g(x) = W2 relu(W1 x)`` with ``W1 [d_T, d_T]``, ``W2 [d_S, d_T]``, no biases, float32, initialised from
``N(0, 1e-5^2)``; one per module, shared across layers. Aligner parameters are a plain pytree::

    {module: {"w1": [d_T, d_T], "w2": [d_S, d_T]}}

``g`` is applied to every ``d_T``-vector of the knowledge: rows for up/v (``[K, N, d_T] -> [K, N, d_S]``),
columns for down/o (``[K, d_T, N] -> [K, d_S, N]``).
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp

from pktjax.errors import ConfigError
from pktjax.extract import from_knowledge, to_knowledge

AlignerParams = dict[str, dict[str, jax.Array]]
INIT_STD = 1e-5


def init_aligner(key: jax.Array, modules: Sequence[str], d_teacher: int, d_student: int) -> AlignerParams:
    """Fresh aligner parameters for ``modules``: ``w1 [d_T, d_T]``, ``w2 [d_S, d_T]`` ~ N(0, 1e-5^2), float32."""
    keys = jax.random.split(key, 2 * len(modules))
    out = {}
    for i, m in enumerate(modules):
        out[m] = {"w1": INIT_STD * jax.random.normal(keys[2 * i], (d_teacher, d_teacher), jnp.float32),
                  "w2": INIT_STD * jax.random.normal(keys[2 * i + 1], (d_student, d_teacher), jnp.float32)}
    return out


def hypernet(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """``g(x) = W2 relu(W1 x)`` on the last axis: ``x [..., d_T] -> [..., d_S]`` (float32)."""
    hp = jax.lax.Precision.HIGHEST
    hidden = jax.nn.relu(jnp.einsum("...i,oi->...o", x.astype(jnp.float32), p["w1"], precision=hp))
    return jnp.einsum("...i,oi->...o", hidden, p["w2"], precision=hp)


def align(aligner_params: AlignerParams, knowledge: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """Deltas for the student: ``{module: g_module(knowledge[module])}`` (float32), shaped like the knowledge
    with ``d_T`` replaced by ``d_S``. Pure; works under ``jax.jit``, ``jax.vmap`` and ``jax.grad``."""
    missing = [m for m in knowledge if m not in aligner_params]
    if missing:
        raise ConfigError(f"the aligner has no hypernetwork for {missing}; it was trained for "
                          f"{sorted(aligner_params)}.")
    out = {}
    for m, k in knowledge.items():
        p = aligner_params[m]
        chex.assert_rank(k, 3)
        vectors = from_knowledge(k, m)  # [K, N, d_T]
        chex.assert_axis_dimension(vectors, -1, p["w1"].shape[1])
        out[m] = to_knowledge(hypernet(p, vectors), m)
    return out


def aligner_dims(aligner_params: AlignerParams) -> tuple[int, int]:
    """``(d_T, d_S)`` of an aligner."""
    w2 = next(iter(aligner_params.values()))["w2"]
    return int(w2.shape[1]), int(w2.shape[0])


def mean_square(deltas: dict[str, Any]) -> jax.Array:
    """``sum_m mean(delta_m ** 2)``: the size penalty of the deltas (SPEC §3.6)."""
    return sum(jnp.mean(jnp.square(d)) for d in deltas.values())
