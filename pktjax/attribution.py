"""LaTen's *locate* stage (SPEC §3.1): static log-probability attribution of layers and neurons.

One forward pass captures, at the last position of every layer, the layer input ``h``, the attention output
``a``, the mid residual ``r = h + a``, the FFN output, the FFN coefficients ``m`` and the per-head attention
values ``s``. Every score is then a difference of two log-probabilities of the target token under the
vocabulary projection ``phi``; a neuron's score adds its own contribution (coefficient times its output column)
to the residual it writes into. Each score row costs one ``[d] x [d, V]`` product, so the neuron scores are
batched ``[chunk, d] x [d, V]`` products and a log-sum-exp, run as one loop over fixed-size chunks of neurons
inside a single jitted function: memory holds at most one ``[chunk, V]`` block of logits.

Precision: a score is computed as ``z_w - logsumexp(z + log_softmax(phi(x)))`` with ``z`` the projection of the
*change* ``phi(x + delta) - phi(x)`` (formed without cancellation), which equals
``log p(w | x + delta) - log p(w | x)`` but keeps small scores accurate to float32 relative precision instead of
the rounding of two log-probabilities of size ~10; near-ties are then ranked by their true order.

Notation: ``L`` layers, ``d`` hidden size, ``f`` FFN units, ``H*hd`` attention neurons (o_proj columns), ``V``
vocabulary, ``T`` tokens.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pktjax.attribution_cache import Entry, model_fingerprint, read_entry, write_entry
from pktjax.config import ModelConfig
from pktjax.data import Tokenized, bucket_length, check_example, iter_chunks, pad_left, prompt_and_response
from pktjax.errors import ConfigError, DataError
from pktjax.model import Params, Trace, forward_trace, rms_norm
from pktjax.progress import progress_bar
from pktjax.select import Attribution
from pktjax.settings import ATTENTION, MODES

log = logging.getLogger("pktjax.attribution")
TRAILING = '. ")\n,]'  # stripped from the end of the response before the target token is taken
DEFAULT_CHUNK = 512


def _check_options(mode: str, attention: str, chunk: int) -> None:
    if mode not in MODES:
        raise ConfigError(f"attribution mode {mode!r} is unknown; choose one of {', '.join(MODES)}.")
    if attention not in ATTENTION:
        raise ConfigError(f"attention option {attention!r} is unknown; choose one of {', '.join(ATTENTION)}.")
    if not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk={chunk!r} must be a positive integer (neurons scored per block).")


def _unembedding(params: Params, cfg: ModelConfig) -> jax.Array:
    """``W_U [V, d]``: the embedding matrix when the embeddings are tied, else ``lm_head``."""
    return params["embed"] if cfg.tie_word_embeddings else params["lm_head"]


class _Norm(NamedTuple):
    """The normalisation in front of the vocabulary projection, as two float32 maps.

    ``apply(x [n, d]) -> [n, d]``; ``shift(base [n|1, d], delta [n, d]) -> apply(base + delta) - apply(base)
    [n, d]``, computed without subtracting two nearly equal vectors.
    """

    apply: Callable[[jax.Array], jax.Array]
    shift: Callable[[jax.Array, jax.Array], jax.Array]


def _ref_scale(output: jax.Array) -> jax.Array:
    """The reference normaliser ``(sigma + 1e-6)^(-1/2)``, ``sigma = sqrt(Var(output) + 1e-5)``: ``[..., d] -> [..., 1]``."""
    var = jnp.var(output.astype(jnp.float32), axis=-1, keepdims=True)
    return jax.lax.rsqrt(jnp.sqrt(var + 1e-5) + 1e-6)


def _norm(params: Params, cfg: ModelConfig, use_rms: jax.Array | bool, scale: jax.Array) -> _Norm:
    """``use_rms`` false (mode ``reference``): ``gamma * x * scale`` with ``scale`` (:func:`_ref_scale` of the last
    layer's output, broadcast against the rows); true (mode ``rmsnorm``): the model's final RMSNorm of each row.
    The flag may be traced: both forms cost ``O(n d)``, next to the ``O(n d V)`` projection, so one compiled
    function can serve both modes."""
    gamma = params["final_norm"].astype(jnp.float32)
    eps = cfg.rms_norm_eps

    def apply(x: jax.Array) -> jax.Array:
        return jnp.where(use_rms, rms_norm(x, gamma, eps), gamma * (x * scale))

    def shift(base: jax.Array, delta: jax.Array) -> jax.Array:
        # rms(base + delta)^2 = ms0 * (1 + grow); the new scale is rsqrt(ms0) * (1 + rho_m1)
        ms0 = jnp.mean(base * base, axis=-1, keepdims=True) + eps
        grow = jnp.mean(delta * (2 * base + delta), axis=-1, keepdims=True) / ms0
        rho_m1 = jnp.expm1(-0.5 * jnp.log1p(grow))
        rms = gamma * (jax.lax.rsqrt(ms0) * (rho_m1 * base + (1 + rho_m1) * delta))
        return jnp.where(use_rms, rms, gamma * (delta * scale))

    return _Norm(apply, shift)


def _logits(w_u: jax.Array, y: jax.Array) -> jax.Array:
    """``y [n, d] -> y W_U^T [n, V]`` in float32 (inputs cast to W_U's dtype)."""
    precision = jax.lax.Precision.HIGHEST if w_u.dtype == jnp.float32 else None
    return jnp.einsum("nd,vd->nv", y.astype(w_u.dtype), w_u, precision=precision,
                      preferred_element_type=jnp.float32)


def _gain(w_u: jax.Array, target: jax.Array, shift: jax.Array, base_logp: jax.Array) -> jax.Array:
    """``log p(w | x + delta) - log p(w | x)`` ``[n]`` from ``shift [n, d]`` (the normalised change) and
    ``base_logp [n|1, V]`` (``log_softmax`` at ``x``): ``z_w - log sum_v p_v e^{z_v}`` with ``z = W_U shift``;
    ``target``: ``w``, one token ``[]`` or one per row ``[n]``.

    The log-sum is formed as ``log1p(s)`` with ``s = sum_v p_v expm1(z_v)``: a small change gives a small ``s``
    whose error is relative to itself, where ``logsumexp(z + base_logp)`` would carry the absolute rounding of
    log-probabilities of size ~10 (measured against a float64 recomputation at 1/10 of the Llama-2 widths: 1.4e-4
    of the largest score that way, 4.5e-6 this way). Rows where ``s`` falls below -1/2 (a change that moves most
    of the mass) or is not finite (some ``z_v`` beyond float32's ``exp`` range) take the plain ``logsumexp``,
    which is accurate there; it is computed only for blocks that hold such a row, so the usual cost is one
    ``[n, V]`` pass of ``expm1`` over the products."""
    z = _logits(w_u, shift)
    p = jax.lax.optimization_barrier(jnp.exp(base_logp))  # [n|1, V] once, not again for every row of z
    small = jnp.sum(jnp.expm1(z) * p, axis=1)
    near = jnp.log1p(jnp.maximum(small, -0.5))
    far = ~(small >= -0.5) | ~jnp.isfinite(small)  # NaN (0 * inf) compares false
    lse = jax.lax.cond(jnp.any(far), lambda: jnp.where(far, jax.nn.logsumexp(z + base_logp, axis=1), near),
                       lambda: near)
    rows = jnp.broadcast_to(target, lse.shape)[:, None]
    return jnp.take_along_axis(z, rows, axis=1)[:, 0] - lse


def _neuron_scores(base: jax.Array, coef: jax.Array, w_out: jax.Array, base_logp: jax.Array, score: Callable,
                   chunk: int, layers: jax.Array) -> jax.Array:
    """Scores ``[L, n]``: ``log p(w | base_l + coef_{l,i} w_out_l[:, i]) - log p(w | base_l)`` for the layers
    ``l`` in ``layers [K]``; the rows of other layers are ``-inf`` (not scored).

    ``base [L, d]``, ``coef [L, n]``, ``w_out [L, d, n]`` (output columns), ``base_logp [L, V]``,
    ``score(base [1, d], delta [c, d], base_logp [1, V]) -> [c]``. One sequential loop over ``K * B`` blocks,
    ``B = ceil(n / chunk)`` per layer of ``c = ceil(n / B)`` columns each (at most ``chunk``, and evenly sized,
    so a layer costs ``B c < n + B`` rows rather than ``B * chunk``), each read straight from ``w_out`` (no
    gathered copy); the last block of a layer is shifted back to end at ``n`` (it overlaps its neighbour by
    ``B c - n`` columns), so nothing is padded.
    """
    n_l, d, n = w_out.shape
    chex.assert_shape([base], (n_l, d))
    chex.assert_shape([coef], (n_l, n))
    blocks = -(-n // chunk)
    c = -(-n // blocks)

    def block(i: jax.Array) -> jax.Array:
        layer, start = layers[i // blocks], jnp.minimum((i % blocks) * c, n - c)
        cols = jax.lax.dynamic_slice(w_out, (layer, 0, start), (1, d, c))[0].astype(jnp.float32)  # [d, c]
        m = jax.lax.dynamic_slice(coef, (layer, start), (1, c))[0].astype(jnp.float32)  # [c]
        return score(base[layer][None], m[:, None] * cols.T, base_logp[layer][None])

    k = layers.shape[0]
    out = jax.lax.map(block, jnp.arange(k * blocks)).reshape(k, blocks, c)
    skip = (blocks - 1) * c - (n - c)  # entries of the last block already covered by the one before
    rows = jnp.concatenate([out[:, :-1].reshape(k, -1), out[:, -1, skip:]], axis=1)
    return jnp.full((n_l, n), -jnp.inf, jnp.float32).at[layers].set(rows)


class _Captured(NamedTuple):
    """What every score reads, at the last position: ``h, a, r, f [L, d]``, ``coeff [L, f]``, ``values [L, H*hd]``,
    ``logp_h, logp_r [L, V]`` and ``score(base [n|1, d], delta [n, d], base_logp [n|1, V]) -> [n]``."""

    h: jax.Array
    a: jax.Array
    r: jax.Array
    f: jax.Array
    coeff: jax.Array
    values: jax.Array
    logp_h: jax.Array
    logp_r: jax.Array
    score: Callable


def _capture(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
             target_id: jax.Array, use_rms: jax.Array, all_keys: jax.Array) -> _Captured:
    _, trace = forward_trace(params, cfg, input_ids, attention_mask)
    w_u, norm = _unembedding(params, cfg), _norm(params, cfg, use_rms, _ref_scale(trace.output[0]))
    h, a, r, f = (getattr(trace, k)[:, 0].astype(jnp.float32) for k in ("h", "a", "r", "ffn_out"))
    logp_h, logp_r = jnp.split(jax.nn.log_softmax(_logits(w_u, norm.apply(jnp.concatenate([h, r]))), axis=1), 2)

    def score(base, delta, base_logp):
        return _gain(w_u, target_id, norm.shift(base, delta), base_logp)

    values = jnp.where(all_keys, trace.head_all_keys, trace.head_last_key)  # both come with the forward
    return _Captured(h, a, r, f, trace.coeff[:, 0], values[:, 0], logp_h, logp_r, score)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def _per_example_jit(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                     target_id: jax.Array, use_rms: jax.Array, all_keys: jax.Array, ffn_layers: jax.Array,
                     attn_layers: jax.Array, *, chunk: int) -> Attribution:
    """The per-example route, kept as the reference the batched route is tested and benchmarked against: every
    ``[chunk, d] x [d, V]`` product is paid again for each example.

    ``input_ids, attention_mask [1, T]`` (left padding allowed), ``target_id []``, ``use_rms`` and
    ``all_keys`` boolean scalars (the ``mode`` and ``attention`` options), the layers whose FFN / attention
    neurons are scored (``ffn_layers [K_f]``, ``attn_layers [K_a]``) -> :class:`Attribution`."""
    c = _capture(params, cfg, input_ids, attention_mask, target_id, use_rms, all_keys)
    layers = params["layers"]
    return Attribution(
        layer_attn=c.score(c.h, c.a, c.logp_h),
        layer_ffn=c.score(c.r, c.f, c.logp_r),
        ffn=_neuron_scores(c.r, c.coeff, layers["down_proj"], c.logp_r, c.score, chunk, ffn_layers),
        attn=_neuron_scores(c.h, c.values, layers["o_proj"], c.logp_h, c.score, chunk, attn_layers),
    )


# ------------------------------------------------------------------------------------ the batched route
#
# A neuron's change of logits is linear in its own output column: with ``M_l = W_U diag(gamma) W_out,l`` (``W_out``
# = down_proj for FFN neurons, o_proj for attention neurons),
#   reference:  z_i = scale * m_i * M[:, i]                              (``scale``: one scalar per example)
#   rmsnorm:    z_i = (s_i - s_0) * u + s_i * m_i * M[:, i],  u = W_U (gamma * x)
# where ``s_0 = rsqrt(mean(x^2) + eps)`` is the RMS scale at the base ``x`` and ``s_i`` the one at
# ``x + m_i W_out[:, i]``, which needs only ``W_out[:, i] . x`` and ``|W_out[:, i]|^2``. ``M`` does not depend on the
# example, so each block of its columns is formed once and every example of the batch is scored from it with an
# elementwise pass (``expm1``, weighted sum) over the block.


class _Batch(NamedTuple):
    """What the neuron scores read, per layer and example at the last position: ``h, r [L, E, d]``, ``coeff
    [L, E, f]``, ``values [L, E, H*hd]``, ``logp_h, logp_r [L, E, V]`` (``log_softmax`` at ``h``, ``r``),
    ``u_h, u_r [L, E, V]`` (``W_U (gamma * x)``; mode ``rmsnorm`` only, else ``None``), ``scale [E]`` (the reference
    normaliser), ``targets [E]``; and the layer scores ``layer_attn, layer_ffn [E, L]``."""

    h: jax.Array
    r: jax.Array
    coeff: jax.Array
    values: jax.Array
    logp_h: jax.Array
    logp_r: jax.Array
    u_h: jax.Array | None
    u_r: jax.Array | None
    scale: jax.Array
    targets: jax.Array
    layer_attn: jax.Array
    layer_ffn: jax.Array


def _capture_batch(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                   targets: jax.Array, all_keys: jax.Array, rms: bool) -> _Batch:
    """One forward of ``input_ids [E, T]`` and the ``2 L E`` projections of the bases and layer scores."""
    _, trace = forward_trace(params, cfg, input_ids, attention_mask)
    w_u = _unembedding(params, cfg)
    scale = _ref_scale(trace.output)[:, 0]  # [E]
    norm = _norm(params, cfg, rms, jnp.tile(scale, cfg.num_layers)[:, None])  # rows ordered [L, E]
    n_l, e, d = trace.h.shape
    h, a, r, f = (getattr(trace, k).astype(jnp.float32).reshape(n_l * e, d) for k in ("h", "a", "r", "ffn_out"))
    rows = jnp.tile(targets, n_l)
    logp_h, logp_r = (jax.nn.log_softmax(_logits(w_u, norm.apply(x)), axis=1) for x in (h, r))
    layer_attn = _gain(w_u, rows, norm.shift(h, a), logp_h).reshape(n_l, e).T
    layer_ffn = _gain(w_u, rows, norm.shift(r, f), logp_r).reshape(n_l, e).T
    gamma = params["final_norm"].astype(jnp.float32)
    u_h, u_r = (_logits(w_u, gamma * x).reshape(n_l, e, -1) for x in (h, r)) if rms else (None, None)
    values = jnp.where(all_keys, trace.head_all_keys, trace.head_last_key)
    return _Batch(h.reshape(n_l, e, d), r.reshape(n_l, e, d), trace.coeff, values, logp_h.reshape(n_l, e, -1),
                  logp_r.reshape(n_l, e, -1), u_h, u_r, scale, targets, layer_attn, layer_ffn)


def _block_gain(m_block: jax.Array, a: jax.Array | None, b: jax.Array, u: jax.Array | None, logp: jax.Array,
                targets: jax.Array) -> jax.Array:
    """Scores ``[E, c]`` of ``c`` neurons in every example: ``z = a u + b M`` (``M = m_block [c, V]``, ``a, b
    [E, c]``, ``u [E, V]``, ``a = u = None`` in mode ``reference``), then ``z_w - log(1 + sum_v p_v expm1(z_v))`` as
    in :func:`_gain`, with the ``logsumexp`` fallback only for blocks that hold a row needing it.

    One example at a time (a sequential map): each step is one fused pass over ``M`` that writes only ``c`` sums,
    so memory stays at one ``[c, V]`` block and no ``[E, c, V]`` array is formed. (A single fused pass over all
    examples broadcasts ``p`` along the middle axis, which XLA's CPU backend runs several times slower.)"""

    def z_of(a_e, b_e, u_e):  # [c], [c], [V] -> [c, V]
        z = b_e[:, None] * m_block
        return z if a_e is None else z + a_e[:, None] * u_e[None]

    def one(x):  # one example: ``(a [c], b [c], u [V], logp [V]) -> [c]``
        a_e, b_e, u_e, logp_e = x
        p = jax.lax.optimization_barrier(jnp.exp(logp_e))  # [V] once, not again for every neuron
        small = jnp.sum(jnp.expm1(z_of(a_e, b_e, u_e)) * p[None], axis=1)
        near = jnp.log1p(jnp.maximum(small, -0.5))
        far = ~(small >= -0.5) | ~jnp.isfinite(small)  # NaN (0 * inf) compares false
        return jax.lax.cond(jnp.any(far), lambda: jnp.where(
            far, jax.nn.logsumexp(z_of(a_e, b_e, u_e) + logp_e[None], axis=1), near), lambda: near)

    lse = jax.lax.map(one, (a, b, u, logp))
    z_w = b * m_block[:, targets].T
    if a is not None:
        z_w = z_w + a * jnp.take_along_axis(u, targets[:, None], axis=1)
    return z_w - lse


def _neuron_scores_batch(w_u: jax.Array, gamma: jax.Array, eps: float, base: jax.Array, coef: jax.Array,
                         w_out: jax.Array, logp: jax.Array, u: jax.Array | None, scale: jax.Array,
                         targets: jax.Array, chunk: int, layers: jax.Array) -> jax.Array:
    """Scores ``[E, L, n]`` of the ``n`` neurons writing through ``w_out [L, d, n]`` in the layers ``layers [K]``
    (other rows ``-inf``), for every example: ``base [L, E, d]`` (the residual the neurons add to), ``coef
    [L, E, n]``, ``logp [L, E, V]``, ``u [L, E, V]`` or ``None`` (mode ``reference``), ``scale [E]``, ``targets
    [E]``. Blocks as in :func:`_neuron_scores` (``c`` evenly sized columns, the last shifted back to end at
    ``n``); each block of ``M`` is one ``[c, d] x [d, V]`` product, whatever ``E``."""
    n_l, d, n = w_out.shape
    e = base.shape[1]
    chex.assert_shape([base], (n_l, e, d))
    chex.assert_shape([coef], (n_l, e, n))
    blocks = -(-n // chunk)
    c = -(-n // blocks)

    def block(i: jax.Array) -> jax.Array:
        layer, start = layers[i // blocks], jnp.minimum((i % blocks) * c, n - c)
        # The layer first, then its columns: on a mesh that splits ``n`` over ``tensor``, a block of columns that
        # crosses the shards makes XLA gather what it slices, and a slice of the whole stack gathered all ``L``
        # layers (a replicated copy of ``w_out`` held through the loop); a slice of one layer gathers one layer.
        cols = jax.lax.dynamic_slice_in_dim(w_out[layer], start, c, axis=1).astype(jnp.float32)  # [d, c]
        m = jax.lax.dynamic_slice(coef, (layer, 0, start), (1, e, c))[0].astype(jnp.float32)  # [E, c]
        # The operand laid out as [c, d] before the product. Left to itself XLA folds the transpose into the
        # product (contracting the left operand's first axis), which its CPU backend runs on a generic dot instead
        # of the YNNPACK kernel that takes the plain [c, d] x [V, d]^T form (as the per-example route's operand,
        # which comes out of a fusion in that layout): the batched route then cost 1.5x the per-example route at
        # E = 1 (experiments/bench/RESULTS.md). The barrier keeps the transpose a copy of c d floats.
        lhs = jax.lax.optimization_barrier((gamma[:, None] * cols).T)
        m_block = _logits(w_u, lhs)  # [c, V]
        if u is None:
            return _block_gain(m_block, None, scale[:, None] * m, None, logp[layer], targets)
        x = base[layer]  # [E, d]
        ms0 = jnp.mean(x * x, axis=1, keepdims=True) + eps
        dots = jnp.einsum("ed,dc->ec", x, cols, precision=jax.lax.Precision.HIGHEST)
        grow = (2 * m * dots + m * m * jnp.sum(cols * cols, axis=0)) / (d * ms0)
        rho_m1 = jnp.expm1(-0.5 * jnp.log1p(grow))  # s_i / s_0 - 1, formed without cancellation
        s0 = jax.lax.rsqrt(ms0)
        return _block_gain(m_block, s0 * rho_m1, s0 * (1 + rho_m1) * m, u[layer], logp[layer], targets)

    k = layers.shape[0]
    out = jax.lax.map(block, jnp.arange(k * blocks)).reshape(k, blocks, e, c)
    skip = (blocks - 1) * c - (n - c)  # entries of the last block already covered by the one before
    rows = jnp.concatenate([out[:, :-1].transpose(2, 0, 1, 3).reshape(e, k, -1),
                            out[:, -1, :, skip:].transpose(1, 0, 2)], axis=2)  # [E, K, n]
    return jnp.full((e, n_l, n), -jnp.inf, jnp.float32).at[:, layers].set(rows)


@functools.partial(jax.jit, static_argnames=("cfg", "rms"))
def _layer_scores_batch_jit(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                            targets: jax.Array, all_keys: jax.Array, *, rms: bool) -> tuple[jax.Array, jax.Array]:
    """``(layer_attn [E, L], layer_ffn [E, L])`` alone: one forward and ``2 L E`` vocabulary projections."""
    c = _capture_batch(params, cfg, input_ids, attention_mask, targets, all_keys, rms)
    return c.layer_attn, c.layer_ffn


@functools.partial(jax.jit, static_argnames=("cfg", "rms", "chunk"))
def _attribution_batch_jit(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                           targets: jax.Array, all_keys: jax.Array, ffn_layers: jax.Array, attn_layers: jax.Array,
                           *, rms: bool, chunk: int) -> Attribution:
    """``input_ids, attention_mask [E, T]`` (left padding allowed), ``targets [E]``, ``all_keys`` (the
    ``attention`` option, traced), the layers whose neurons are scored -> :class:`Attribution` with a leading
    ``[E]`` axis."""
    c = _capture_batch(params, cfg, input_ids, attention_mask, targets, all_keys, rms)
    layers, w_u = params["layers"], _unembedding(params, cfg)
    common = (w_u, params["final_norm"].astype(jnp.float32), cfg.rms_norm_eps)
    ffn = _neuron_scores_batch(*common, c.r, c.coeff, layers["down_proj"], c.logp_r, c.u_r, c.scale, targets,
                               chunk, ffn_layers)
    attn = _neuron_scores_batch(*common, c.h, c.values, layers["o_proj"], c.logp_h, c.u_h, c.scale, targets,
                                chunk, attn_layers)
    return Attribution(layer_attn=c.layer_attn, layer_ffn=c.layer_ffn, ffn=ffn, attn=attn)


def _as_row(input_ids: Any, name: str) -> jax.Array:
    ids = jnp.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise DataError(f"{name} must have shape [T] or [1, T] with T >= 1 (one example); got {ids.shape}.")
    return ids


def _batch(input_ids: Any, attention_mask: Any | None) -> tuple[jax.Array, jax.Array]:
    """``input_ids [E, T]`` and its mask (default: no padding) as int32 arrays, checked."""
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        what = "the batch is empty" if ids.ndim == 2 and ids.shape[0] == 0 else f"got shape {ids.shape}"
        raise DataError(f"input_ids must have shape [E, T] with E >= 1 examples and T >= 1 tokens; {what}.")
    mask = jnp.ones_like(ids) if attention_mask is None else jnp.asarray(attention_mask)
    if mask.shape != ids.shape:
        raise DataError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}; they must match.")
    return ids.astype(jnp.int32), mask.astype(jnp.int32)


def _targets(target_ids: Any, cfg: ModelConfig, n: int) -> jax.Array:
    """``target_ids`` as int32 ``[n]``: one per example, each inside the vocabulary (checked unless traced)."""
    targets = target_ids if isinstance(target_ids, jax.core.Tracer) else np.asarray(target_ids)
    if targets.shape != (n,):
        raise DataError(f"target_ids has shape {tuple(targets.shape)} for a batch of {n} example(s); give one "
                        "target token per example.")
    if isinstance(targets, np.ndarray):
        bad = targets[(targets < 0) | (targets >= cfg.vocab_size)]
        if bad.size:
            raise DataError(f"target token {int(bad[0])} is outside the vocabulary [0, {cfg.vocab_size}).")
    return jnp.asarray(targets, jnp.int32)


def _layer_list(layers: Any, cfg: ModelConfig, name: str) -> jax.Array:
    """``layers`` (``None`` = all) as a sorted int32 array of distinct layer indices."""
    if layers is None:
        return jnp.arange(cfg.num_layers, dtype=jnp.int32)
    arr = np.unique(np.asarray(layers, np.int64).reshape(-1))
    if arr.size == 0 or arr[0] < 0 or arr[-1] >= cfg.num_layers:
        raise ConfigError(f"{name}={np.asarray(layers).tolist()} must name layers in [0, {cfg.num_layers}).")
    return jnp.asarray(arr, jnp.int32)


def attribution_batch(params: Params, cfg: ModelConfig, input_ids: Any, target_ids: Any,
                      attention_mask: Any | None = None, mode: str = "reference", attention: str = "last_key",
                      chunk: int = DEFAULT_CHUNK, ffn_layers: Any | None = None,
                      attn_layers: Any | None = None) -> Attribution:
    """Attribution scores of ``E`` examples at once (SPEC §3.1), each as :func:`attribution` computes it alone.

    ``input_ids [E, T]`` (left padding marked by ``attention_mask [E, T]``, so examples of mixed lengths share a
    batch), ``target_ids [E]``. One forward of the batch, then one loop over the scored layers' neurons in blocks
    of at most ``chunk``: each block of ``M = W_U diag(gamma) W_out`` is one ``[chunk, d] x [d, V]`` product shared
    by all ``E`` examples, which then pay only an elementwise pass over it. ``mode``, ``attention``,
    ``ffn_layers`` and ``attn_layers`` (shared by the batch) as in :func:`attribution`. Returns
    ``layer_attn, layer_ffn [E, L]``, ``ffn [E, L, f]``, ``attn [E, L, H*hd]`` (float32).

    Errors (before any work): :class:`DataError` for an empty batch, a mask or target list that does not match
    the batch, a target outside the vocabulary; :class:`ConfigError` for an unknown option or layer.
    """
    _check_options(mode, attention, chunk)
    ids, mask = _batch(input_ids, attention_mask)
    n = ids.shape[0]
    out = _attribution_batch_jit(params, cfg, ids, mask, _targets(target_ids, cfg, n),
                                 jnp.asarray(attention == "all_keys"), _layer_list(ffn_layers, cfg, "ffn_layers"),
                                 _layer_list(attn_layers, cfg, "attn_layers"), rms=mode == "rmsnorm", chunk=chunk)
    chex.assert_shape([out.layer_attn, out.layer_ffn], (n, cfg.num_layers))
    chex.assert_shape(out.ffn, (n, cfg.num_layers, cfg.intermediate_size))
    chex.assert_shape(out.attn, (n, cfg.num_layers, cfg.q_dim))
    return out


def attribution(params: Params, cfg: ModelConfig, input_ids: Any, target_id: Any, mode: str = "reference",
                attention: str = "last_key", chunk: int = DEFAULT_CHUNK, attention_mask: Any | None = None,
                ffn_layers: Any | None = None, attn_layers: Any | None = None) -> Attribution:
    """Attribution scores of one example (SPEC §3.1): how much each layer and neuron raises ``log p(target)``.

    ``input_ids [T]`` or ``[1, T]`` (no padding, or left padding marked by ``attention_mask`` of the same shape);
    ``target_id`` the token predicted after the last position. ``mode``: ``"reference"`` (the authors'
    normalisation by a scalar from the last layer's output) or ``"rmsnorm"`` (the model's final RMSNorm);
    ``attention``: ``"last_key"`` (``alpha_{last->last} v_last`` per head, the reference) or ``"all_keys"`` (the
    head's full output at the last position). At most ``chunk`` neurons are scored per ``[chunk, d] x [d, V]`` block.
    ``ffn_layers`` / ``attn_layers``: score the neurons of these layers only (default all); the rows of the
    others are ``-inf``. Returns ``layer_attn [L]``, ``layer_ffn [L]``, ``ffn [L, f]``, ``attn [L, H*hd]``
    (float32). :func:`attribution_batch` with one example.
    """
    ids = _as_row(input_ids, "input_ids")
    mask = None if attention_mask is None else _as_row(attention_mask, "attention_mask")
    target = target_id if isinstance(target_id, jax.core.Tracer) else np.reshape(np.asarray(target_id), (1,))
    out = attribution_batch(params, cfg, ids, target, mask, mode, attention, chunk, ffn_layers, attn_layers)
    return jax.tree.map(lambda x: x[0], out)


def _per_example(params: Params, cfg: ModelConfig, input_ids: Any, target_id: int, mode: str = "reference",
                 attention: str = "last_key", chunk: int = DEFAULT_CHUNK, attention_mask: Any | None = None,
                 ffn_layers: Any | None = None, attn_layers: Any | None = None) -> Attribution:
    """:func:`attribution` by the per-example route (:func:`_per_example_jit`), for tests and benchmarks."""
    _check_options(mode, attention, chunk)
    ids = _as_row(input_ids, "input_ids")
    mask = jnp.ones_like(ids) if attention_mask is None else _as_row(attention_mask, "attention_mask")
    return _per_example_jit(params, cfg, ids, mask, _targets(np.reshape(target_id, (1,)), cfg, 1)[0], jnp.asarray(mode == "rmsnorm"),
                            jnp.asarray(attention == "all_keys"), _layer_list(ffn_layers, cfg, "ffn_layers"),
                            _layer_list(attn_layers, cfg, "attn_layers"), chunk=chunk)


def attribution_target(tokenizer, example: dict[str, Any]) -> tuple[np.ndarray, int]:
    """``(input_ids [T] int32, target_id)`` of a chat example (SPEC §3.1).

    ``text = user prompt + response`` with the characters ``. " space ) \\n , ]`` stripped from the end of the
    response; tokenized without BOS (no special tokens); inputs are all tokens but the last, the target is the last.
    """
    check_example(example)
    prompt, response = prompt_and_response(example)
    ids = list(tokenizer(prompt + response.rstrip(TRAILING), add_special_tokens=False)["input_ids"])
    if len(ids) < 2:
        raise DataError("attribution needs at least two tokens (inputs and a target); the example is too short.")
    return np.asarray(ids[:-1], np.int32), int(ids[-1])


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, (int, np.integer)):
            return int(value)
    return 0


class _Group(NamedTuple):
    """Examples scored together: their positions in the caller's list, ``ids, mask [E, T]``, ``targets [E]``."""

    index: list[int]
    ids: np.ndarray
    mask: np.ndarray
    targets: np.ndarray


def _groups(items: Sequence[tuple[np.ndarray, int]], pad_id: int, bucket: int, batch: int) -> list[_Group]:
    """``(ids, target)`` pairs sorted by length and cut into batches of at most ``batch``, each left-padded to a
    multiple of ``bucket`` (masked, so the scores do not change) so that few shapes get compiled."""
    if batch < 1 or bucket < 1:
        raise ConfigError(f"batch={batch} and bucket={bucket} must be positive integers.")
    order = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    out = []
    for part in iter_chunks(order, batch):
        rows = [Tokenized(items[i][0], items[i][0]) for i in part]
        b = pad_left(rows, pad_id, bucket_length(max(len(r.ids) for r in rows), bucket))
        out.append(_Group(list(part), b.ids, b.mask, np.asarray([items[i][1] for i in part], np.int32)))
    return out


def _top_layers(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best layers of ``scores [..., L]`` (ties to the lower index, as :func:`pktjax.select.select`)."""
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k]


def _examples_or_error(tokenizer, examples: Sequence[dict[str, Any]], mode: str, attention: str, chunk: int,
                       layers: int | None, cfg: ModelConfig) -> list[tuple[np.ndarray, int]]:
    _check_options(mode, attention, chunk)
    if not examples:
        raise DataError("locate needs at least one example; the split is empty.")
    if layers is not None and not 1 <= layers <= cfg.num_layers:
        raise ConfigError(f"layers={layers} must be between 1 and the model's {cfg.num_layers} layers.")
    return [attribution_target(tokenizer, ex) for ex in examples]


def locate(params: Params, cfg: ModelConfig, tokenizer, examples: Sequence[dict[str, Any]],
           mode: str = "reference", attention: str = "last_key", chunk: int = DEFAULT_CHUNK,
           bucket: int = 32, layers: int | None = None, batch: int = 16) -> Attribution:
    """Attribution summed over ``examples`` (chat examples; SPEC §3.1: scores add up).

    ``layers=K`` (below ``L``) scores neurons only where :func:`pktjax.select.select` with ``n_layers=K`` looks:
    the layer scores of all examples are summed first, then the neurons of the top ``K`` attention and top ``K``
    FFN layers are scored (the other rows are ``-inf``). The selection is the same as from the full scores, at
    about ``K / L`` of the cost. Examples are scored ``batch`` at a time (:func:`attribution_batch`), left-padded
    to a multiple of ``bucket`` tokens.
    """
    items = _examples_or_error(tokenizer, examples, mode, attention, chunk, layers, cfg)
    groups = _groups(items, _pad_id(tokenizer), bucket, batch)
    chosen: dict[str, Any] = {}
    if layers is not None and layers < cfg.num_layers:
        per = [_layer_scores_batch_jit(params, cfg, jnp.asarray(g.ids), jnp.asarray(g.mask), jnp.asarray(g.targets),
                                       jnp.asarray(attention == "all_keys"), rms=mode == "rmsnorm") for g in groups]
        sums = [sum(np.asarray(p[i], np.float64).sum(0) for p in per) for i in (0, 1)]
        chosen = {name: np.sort(_top_layers(total, layers)) for name, total in zip(("attn_layers", "ffn_layers"),
                                                                                   sums)}
    total = None
    for g in groups:
        attr = attribution_batch(params, cfg, g.ids, g.targets, g.mask, mode, attention, chunk, **chosen)
        attr = jax.tree.map(lambda x: x.sum(0), attr)
        total = attr if total is None else total + attr
    return total


def locate_each(params: Params, cfg: ModelConfig, tokenizer, examples: Sequence[dict[str, Any]],
                mode: str = "reference", attention: str = "last_key", chunk: int = DEFAULT_CHUNK,
                bucket: int = 32, layers: int | None = None, batch: int = 16,
                cache: str | os.PathLike | None = None, progress: str | None = None) -> list[Attribution]:
    """Each example's own attribution (NumPy fields), for all of them in batched passes; what LaTen's steps,
    fuses and seeds select from.

    ``layers=K``: the neuron rows of each example's own top ``K`` attention and FFN layers are scored (the rows
    of a batch's union; rows outside it are ``-inf``), so ``select(scores, K, ...)`` picks what it picks from the
    full scores. ``cache``: a folder for this model's scores (:mod:`pktjax.attribution_cache`); examples found
    there with the rows they need are read back, the rest scored and written. A folder written by another model
    is a :class:`ConfigError`. ``progress``: a description to show progress under (one update per pass; a pass
    of a large model at K = all layers can take many minutes), else silent.
    """
    items = _examples_or_error(tokenizer, examples, mode, attention, chunk, layers, cfg)
    k = cfg.num_layers if layers is None else layers
    fingerprint = model_fingerprint(params, cfg) if cache is not None else ""
    found = [read_entry(cache, fingerprint, ids, t, mode, attention) if cache is not None else None
             for ids, t in items]
    all_layers = np.arange(cfg.num_layers)

    def needed(layer_attn: np.ndarray, layer_ffn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if k == cfg.num_layers:
            return all_layers, all_layers
        return _top_layers(np.asarray(layer_ffn), k), _top_layers(np.asarray(layer_attn), k)

    todo = [i for i, e in enumerate(found) if e is None or not e.covers(*needed(e.attr.layer_attn,
                                                                               e.attr.layer_ffn))]
    if cache is not None:  # the extra fields let a caller (the command line) tally what the cache served
        log.info("%s: %d of %d examples' attribution scores read from the cache, %d located",
                 cache, len(items) - len(todo), len(items), len(todo),
                 extra={"cache_folder": str(cache), "cache_read": len(items) - len(todo), "cache_total": len(items)})
    bar = progress_bar(len(items), progress, unit="ex", enabled=progress is not None, initial=len(items) - len(todo))
    for g in _groups([items[i] for i in todo], _pad_id(tokenizer), bucket, batch):
        bar.set_postfix(pass_examples=len(g.index), tokens=g.ids.shape[1])
        index = [todo[i] for i in g.index]
        ffn_rows, attn_rows = np.zeros((2, len(index), cfg.num_layers), bool)
        if k < cfg.num_layers:  # each example's own top layers, from the layer scores (one cheap forward)
            la, lf = jax.device_get(_layer_scores_batch_jit(
                params, cfg, jnp.asarray(g.ids), jnp.asarray(g.mask), jnp.asarray(g.targets),
                jnp.asarray(attention == "all_keys"), rms=mode == "rmsnorm"))
            for j in range(len(index)):
                f_l, a_l = needed(la[j], lf[j])
                ffn_rows[j, f_l], attn_rows[j, a_l] = True, True
        else:
            ffn_rows[:], attn_rows[:] = True, True
        for j, i in enumerate(index):  # rows scored before stay scored
            if found[i] is not None:
                ffn_rows[j] |= found[i].ffn_rows
                attn_rows[j] |= found[i].attn_rows
        f_union, a_union = np.flatnonzero(ffn_rows.any(0)), np.flatnonzero(attn_rows.any(0))
        attr = jax.device_get(attribution_batch(params, cfg, g.ids, g.targets, g.mask, mode, attention, chunk,
                                                f_union, a_union))
        for j, i in enumerate(index):
            scored = Entry(jax.tree.map(lambda x: np.asarray(x[j]), attr), np.isin(all_layers, f_union),
                           np.isin(all_layers, a_union))
            found[i] = scored
            if cache is not None:
                write_entry(cache, fingerprint, *items[i], mode, attention, scored)
        bar.update(len(index))
    bar.close()
    return [e.attr for e in found]


def matmul_flops(cfg: ModelConfig) -> float:
    """Floating-point operations of the neuron scores' vocabulary products: ``2 L (f + H*hd) d V``."""
    return 2.0 * math.prod((cfg.num_layers, cfg.intermediate_size + cfg.q_dim, cfg.hidden_size, cfg.vocab_size))
