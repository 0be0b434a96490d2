"""LaTen's *inject* stage (SPEC §3.5): add aligned deltas to the student's selected rows and columns.

Two equal forms: :func:`inject` writes new weights (what *fuse* saves); :func:`delta_adapter` hands the deltas to
the forward as a sparse adapter, which adds them inside the products (what aligner training differentiates: no
copy of the stacked weights, and no gradient for the whole weight, only for the ``N`` changed rows / columns).
:func:`delta_sizes` measures an injection against the weights it changes (aligner logs, fuse records, reports).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from pktjax.config import ModelConfig
from pktjax.extract import (ROW_MODULES, check_modules, check_selection, extract, from_knowledge, knowledge_shape,
                            module_index, weight_index)
from pktjax.model import Adapter, Params
from pktjax.select import Selection


def _check(cfg: ModelConfig, selection: Selection, deltas: dict[str, jax.Array]) -> None:
    check_modules(tuple(deltas), cfg)
    check_selection(cfg, selection)
    for m, delta in deltas.items():
        chex.assert_shape(delta, knowledge_shape(cfg, selection, m))


def inject(student_params: Params, cfg: ModelConfig, selection: Selection, deltas: dict[str, jax.Array]) -> Params:
    """New student params with ``W[l][neurons] += delta``: rows of up/v, columns of down/o.

    ``selection`` is the *student's* selection; ``deltas`` as :func:`pktjax.align` returns them: ``up_proj
    [K, N_f, d_S]``, ``down_proj [K, d_S, N_f]``, ``v_proj [K, N_a, d_S]``, ``o_proj [K, d_S, N_a]``. Pure (the
    input params are untouched, unchanged leaves are shared), jittable and differentiable w.r.t. ``deltas``.
    """
    _check(cfg, selection, deltas)
    layers = dict(student_params["layers"])
    for m, delta in deltas.items():
        w = layers[m]
        layers[m] = w.at[weight_index(selection, m)].add(from_knowledge(delta, m).astype(w.dtype))
    return {**student_params, "layers": layers}


def delta_adapter(cfg: ModelConfig, selection: Selection, deltas: dict[str, jax.Array]) -> Adapter:
    """The injection of :func:`inject` as an :class:`~pktjax.model.Adapter` for ``forward(..., adapter=)``:
    weights ``{"layers": {m: {"rows" | "cols": [L, N], "delta": [L, N, d_S] | [L, d_S, N]}}}``, the ``K`` selected
    layers holding ``deltas`` (same shapes and selection as :func:`inject`) and the others a zero delta.
    ``forward(params, cfg, ids, adapter=delta_adapter(...))`` equals ``forward(inject(params, ...), cfg, ids)`` up
    to rounding."""
    _check(cfg, selection, deltas)
    layers = {}
    for m, delta in deltas.items():
        chosen, neurons = module_index(selection, m)
        full = jnp.zeros((cfg.num_layers, *delta.shape[1:]), delta.dtype).at[chosen].set(delta)
        index = jnp.zeros((cfg.num_layers, neurons.shape[1]), neurons.dtype).at[chosen].set(neurons)
        layers[m] = {("rows" if m in ROW_MODULES else "cols"): index, "delta": full}
    return Adapter({"layers": layers})


@jax.jit
def _square_sums(weights: dict[str, jax.Array], deltas: dict[str, jax.Array]) -> dict[str, tuple[jax.Array, ...]]:
    sq = lambda x: jnp.sum(jnp.square(x.astype(jnp.float32)))  # noqa: E731  (XLA sums in a tree: float32 is enough)
    return {m: (sq(deltas[m]), sq(weights[m])) for m in deltas}


def delta_sizes(student_params: Params, cfg: ModelConfig, selection: Selection,
                deltas: dict[str, jax.Array]) -> dict[str, dict[str, float]]:
    """How large an injection is next to what it changes: ``{module | "all": {"rms", "weight_rms",
    "relative"}}``, with ``rms`` the root mean square of the deltas, ``weight_rms`` that of the student's entries
    they are added to (the same rows / columns, before injection) and ``relative = rms / weight_rms``;
    ``"all"`` pools every module's entries. Arguments as :func:`inject`; plain floats, for logs and reports."""
    _check(cfg, selection, deltas)
    sums = jax.device_get(_square_sums(extract(student_params, cfg, selection, tuple(deltas)), deltas))
    counts = {m: int(d.size) for m, d in deltas.items()}
    sums["all"] = tuple(sum(float(s[i]) for s in sums.values()) for i in range(2))
    counts["all"] = sum(counts.values())
    out = {}
    for m, (d2, w2) in sums.items():
        rms, w_rms = (float(x / counts[m]) ** 0.5 for x in (d2, w2))
        out[m] = {"rms": rms, "weight_rms": w_rms, "relative": rms / w_rms if w_rms > 0 else None}
    return out
