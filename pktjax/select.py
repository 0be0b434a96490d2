"""LaTen's *select* stage (SPEC §3.2): top layers, then top neurons inside each selected layer.

Ties are broken towards the lower index everywhere (``jax.lax.top_k`` keeps the lower index first).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from pktjax.errors import ConfigError


@struct.dataclass
class Attribution:
    """Attribution scores of one model (SPEC §3.1); scores over several examples add up with ``+``.

    layer_attn [L], layer_ffn [L], ffn [L, f], attn [L, H*hd] (attention neuron = o_proj column).
    """

    layer_attn: jax.Array
    layer_ffn: jax.Array
    ffn: jax.Array
    attn: jax.Array

    def __add__(self, other: "Attribution") -> "Attribution":
        return jax.tree.map(jnp.add, self, other)


@struct.dataclass
class Selection:
    """Selected layers and neurons of one model, in pairing order (SPEC §3.2).

    attn_layers [K], ffn_layers [K] ascending layer indices; ffn_neurons [K, N_f] and attn_neurons [K, N_a] in
    descending score order. The ``i``-th teacher entry pairs with the ``i``-th student entry.
    """

    attn_layers: jax.Array
    ffn_layers: jax.Array
    ffn_neurons: jax.Array
    attn_neurons: jax.Array


def _top(scores: jax.Array, k: int) -> jax.Array:
    return jax.lax.top_k(scores, k)[1]


def select(attr: Attribution, n_layers: int, ffn_count: int, attn_count: int) -> Selection:
    """Top ``n_layers`` layers (separately for attention and FFN, then sorted by index) and, in each, the top
    ``ffn_count`` FFN neurons and ``attn_count`` attention neurons. Jittable with the counts static."""
    n_l, f = attr.ffn.shape
    if attr.layer_attn.shape != (n_l,) or attr.layer_ffn.shape != (n_l,) or attr.attn.shape[0] != n_l:
        raise ConfigError(f"select: scores of {n_l} layers need layer_attn, layer_ffn [{n_l}] and attn [{n_l}, n]; "
                          f"got {attr.layer_attn.shape}, {attr.layer_ffn.shape}, {attr.attn.shape}.")
    for name, count, limit in (("n_layers", n_layers, n_l), ("ffn_count", ffn_count, f),
                               ("attn_count", attn_count, attr.attn.shape[1])):
        if not 1 <= count <= limit:
            raise ConfigError(f"select: {name}={count} must be between 1 and {limit}.")
    return _select(attr, n_layers, ffn_count, attn_count)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _select(attr: Attribution, n_layers: int, ffn_count: int, attn_count: int) -> Selection:
    attn_layers = jnp.sort(_top(attr.layer_attn, n_layers))
    ffn_layers = jnp.sort(_top(attr.layer_ffn, n_layers))
    return Selection(
        attn_layers=attn_layers,
        ffn_layers=ffn_layers,
        ffn_neurons=_top(attr.ffn[ffn_layers], ffn_count),
        attn_neurons=_top(attr.attn[attn_layers], attn_count),
    )


def neuron_counts(student_ffn: int, student_hidden: int, rate: float) -> tuple[int, int]:
    """``(N_f, N_a) = (floor(f_S * rate), floor(d_S * rate))``; ``rate`` must lie in (0, 1]."""
    if not 0.0 < rate <= 1.0:
        raise ConfigError(f"transfer rate {rate} is outside (0, 1]; use e.g. 0.1 for 10% of the neurons per layer.")
    return max(1, int(student_ffn * rate)), max(1, int(student_hidden * rate))
