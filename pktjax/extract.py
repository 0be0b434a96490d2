"""LaTen's *extract* stage (SPEC §3.3): the teacher's weights at the selected layers and neurons.

Knowledge is one array per module, stacked over the ``K`` selected layers, in the Hugging Face orientation::

    up_proj    rows     [K, N_f, d_T]     (FFN unit i = row i of up_proj)
    down_proj  columns  [K, d_T, N_f]     (FFN unit i = column i of down_proj)
    v_proj     rows     [K, N_a, d_T]     (attention neuron c = row c of v_proj; multi-head attention only)
    o_proj     columns  [K, d_T, N_a]     (attention neuron c = column c of o_proj)

FFN modules use ``selection.ffn_layers``/``ffn_neurons``, attention modules ``attn_layers``/``attn_neurons``.
The same index helpers serve :mod:`pktjax.inject`, so extraction and injection address the same weights.
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp

from pktjax.config import ModelConfig
from pktjax.errors import ConfigError, PairError
from pktjax.model import Params
from pktjax.select import Selection

MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")
ROW_MODULES = ("up_proj", "v_proj")  # knowledge vectors are rows [K, N, d]
FFN_MODULES = ("up_proj", "down_proj")


def default_modules(*cfgs: ModelConfig) -> tuple[str, ...]:
    """All four modules when every model uses multi-head attention, else ``up_proj, down_proj, o_proj``."""
    if any(c.is_gqa for c in cfgs):
        return ("up_proj", "down_proj", "o_proj")
    return MODULES


def check_modules(modules: Sequence[str] | None, *cfgs: ModelConfig) -> tuple[str, ...]:
    """Validated module names (``None`` -> :func:`default_modules`); ``v_proj`` is refused for a GQA model,
    whose ``v_proj`` has fewer rows than there are attention neurons."""
    if modules is None:
        return default_modules(*cfgs)
    modules = tuple(modules)
    unknown = [m for m in modules if m not in MODULES]
    if unknown or not modules or len(set(modules)) != len(modules):
        raise ConfigError(f"modules {list(modules)} must be distinct names among {', '.join(MODULES)}.")
    if "v_proj" in modules and any(c.is_gqa for c in cfgs):
        raise ConfigError("v_proj cannot be transferred with grouped-query attention (num_key_value_heads < "
                          "num_attention_heads): its rows are shared by several heads. Use up_proj, down_proj, "
                          "o_proj.")
    return modules


def check_pair(teacher: ModelConfig, student: ModelConfig) -> None:
    """Refuse a teacher/student pair that LaTen cannot use: different vocabularies, or a teacher that is not
    larger (it needs at least the student's layers, hidden size and FFN width, and more of one of them)."""
    if teacher.vocab_size != student.vocab_size:
        raise PairError(f"teacher vocabulary ({teacher.vocab_size}) differs from the student's "
                        f"({student.vocab_size}); both models must share one tokenizer.")
    t = (teacher.num_layers, teacher.hidden_size, teacher.intermediate_size)
    s = (student.num_layers, student.hidden_size, student.intermediate_size)
    if any(a < b for a, b in zip(t, s)) or t == s:
        raise PairError(f"the teacher (layers, hidden, ffn) = {t} is not larger than the student {s}; "
                        "pass the larger model as the teacher.")


def module_index(selection: Selection, module: str) -> tuple[jax.Array, jax.Array]:
    """``(layers [K], neurons [K, N])`` that ``module`` uses from ``selection``."""
    if module in FFN_MODULES:
        return selection.ffn_layers, selection.ffn_neurons
    return selection.attn_layers, selection.attn_neurons


def weight_index(selection: Selection, module: str) -> tuple:
    """Index into a stacked weight ``[L, out, in]`` that gathers ``[K, N, d]``: rows ``w[l, n, :]`` for up/v,
    columns ``w[l, :, n]`` for down/o (advanced indices around a slice put ``K, N`` first)."""
    layers, neurons = module_index(selection, module)
    if module in ROW_MODULES:
        return layers[:, None], neurons
    return layers[:, None], slice(None), neurons


def to_knowledge(gathered: jax.Array, module: str) -> jax.Array:
    """``[K, N, d]`` as gathered -> the module's knowledge orientation (``[K, d, N]`` for columns)."""
    return gathered if module in ROW_MODULES else jnp.swapaxes(gathered, -1, -2)


def from_knowledge(knowledge: jax.Array, module: str) -> jax.Array:
    """Inverse of :func:`to_knowledge`: knowledge orientation -> ``[K, N, d]``."""
    return to_knowledge(knowledge, module)  # a transpose is its own inverse


def knowledge_shape(cfg: ModelConfig, selection: Selection, module: str) -> tuple[int, int, int]:
    """Shape of ``module``'s knowledge (or delta) for a model of config ``cfg``."""
    k, n = module_index(selection, module)[1].shape
    return (k, n, cfg.hidden_size) if module in ROW_MODULES else (k, cfg.hidden_size, n)


def check_selection(cfg: ModelConfig, selection: Selection) -> None:
    """Shapes and ranges of a selection for this model: ``[K]`` layers and ``[K, N]`` neurons."""
    k = selection.ffn_layers.shape[0]
    chex.assert_shape([selection.ffn_layers, selection.attn_layers], (k,))
    chex.assert_rank([selection.ffn_neurons, selection.attn_neurons], 2)
    chex.assert_axis_dimension(selection.ffn_neurons, 0, k)
    chex.assert_axis_dimension(selection.attn_neurons, 0, k)
    if k > cfg.num_layers or selection.ffn_neurons.shape[1] > cfg.intermediate_size \
            or selection.attn_neurons.shape[1] > cfg.q_dim:
        raise ConfigError(f"selection of {k} layers, {selection.ffn_neurons.shape[1]} FFN and "
                          f"{selection.attn_neurons.shape[1]} attention neurons does not fit this model "
                          f"({cfg.num_layers} layers, {cfg.intermediate_size} FFN units, {cfg.q_dim} attention).")


def _extract(params: Params, selection: Selection, modules: tuple[str, ...]) -> dict[str, jax.Array]:
    layers = params["layers"]
    return {m: to_knowledge(layers[m][weight_index(selection, m)], m) for m in modules}


_extract_jit = jax.jit(_extract, static_argnums=2)


def extract(params: Params, cfg: ModelConfig, selection: Selection,
            modules: Sequence[str] | None = None) -> dict[str, jax.Array]:
    """Teacher knowledge ``{module: array}`` at ``selection`` (shapes in the module docstring).

    ``modules`` defaults to all four for multi-head attention and ``up_proj, down_proj, o_proj`` for GQA;
    ``v_proj`` with GQA is a :class:`~pktjax.errors.ConfigError`. Only the selected rows/columns are gathered
    (never whole layers), in the parameters' dtype.
    """
    modules = check_modules(modules, cfg)
    check_selection(cfg, selection)
    out = _extract_jit(params, selection, modules)
    for m in modules:
        chex.assert_shape(out[m], knowledge_shape(cfg, selection, m))
    return out
