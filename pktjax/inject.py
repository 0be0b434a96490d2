"""LaTen's *inject* stage (SPEC §3.5): add aligned deltas to the student's selected rows and columns."""

from __future__ import annotations

import chex
import jax

from pktjax.config import ModelConfig
from pktjax.extract import check_modules, check_selection, from_knowledge, knowledge_shape, weight_index
from pktjax.model import Params
from pktjax.select import Selection


def inject(student_params: Params, cfg: ModelConfig, selection: Selection, deltas: dict[str, jax.Array]) -> Params:
    """New student params with ``W[l][neurons] += delta``: rows of up/v, columns of down/o.

    ``selection`` is the *student's* selection; ``deltas`` as :func:`pktjax.align` returns them: ``up_proj
    [K, N_f, d_S]``, ``down_proj [K, d_S, N_f]``, ``v_proj [K, N_a, d_S]``, ``o_proj [K, d_S, N_a]``. Pure (the
    input params are untouched, unchanged leaves are shared), jittable and differentiable w.r.t. ``deltas``.
    """
    check_modules(tuple(deltas), cfg)
    check_selection(cfg, selection)
    layers = dict(student_params["layers"])
    for m, delta in deltas.items():
        chex.assert_shape(delta, knowledge_shape(cfg, selection, m))
        w = layers[m]
        layers[m] = w.at[weight_index(selection, m)].add(from_knowledge(delta, m).astype(w.dtype))
    return {**student_params, "layers": layers}
