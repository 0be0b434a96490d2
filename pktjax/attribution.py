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
import math
from typing import Any, Callable, NamedTuple, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pktjax.config import ModelConfig
from pktjax.data import Tokenized, bucket_length, check_example, pad_left, prompt_and_response
from pktjax.errors import ConfigError, DataError
from pktjax.model import Params, Trace, forward, rms_norm
from pktjax.select import Attribution
from pktjax.settings import ATTENTION, MODES

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


def _norm(params: Params, cfg: ModelConfig, use_rms: jax.Array, output: jax.Array) -> _Norm:
    """``use_rms`` false (mode ``reference``): ``gamma * x * (sigma + 1e-6)^(-1/2)`` with
    ``sigma = sqrt(Var(output) + 1e-5)``, one scalar from the last layer's output ``output [d]``; true (mode
    ``rmsnorm``): the model's final RMSNorm of each row. The flag is traced: both forms cost ``O(n d)``, next to
    the ``O(n d V)`` projection, so one compiled function serves both modes."""
    gamma = params["final_norm"].astype(jnp.float32)
    scale = jax.lax.rsqrt(jnp.sqrt(jnp.var(output.astype(jnp.float32)) + 1e-5) + 1e-6)
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
    ``base_logp [n|1, V]`` (``log_softmax`` at ``x``): ``z_w - log sum_v p_v e^{z_v}`` with ``z = W_U shift``.

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
    return jnp.take(z, target, axis=1) - lse


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
    _, trace = forward(params, cfg, input_ids, attention_mask, capture=True)
    w_u, norm = _unembedding(params, cfg), _norm(params, cfg, use_rms, trace.output[0])
    h, a, r, f = (getattr(trace, k)[:, 0].astype(jnp.float32) for k in ("h", "a", "r", "ffn_out"))
    logp_h, logp_r = jnp.split(jax.nn.log_softmax(_logits(w_u, norm.apply(jnp.concatenate([h, r]))), axis=1), 2)

    def score(base, delta, base_logp):
        return _gain(w_u, target_id, norm.shift(base, delta), base_logp)

    values = jnp.where(all_keys, trace.head_all_keys, trace.head_last_key)  # both come with the forward
    return _Captured(h, a, r, f, trace.coeff[:, 0], values[:, 0], logp_h, logp_r, score)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _layer_scores_jit(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                      target_id: jax.Array, use_rms: jax.Array, all_keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(layer_attn [L], layer_ffn [L])`` alone: one forward and ``2 L`` vocabulary projections."""
    c = _capture(params, cfg, input_ids, attention_mask, target_id, use_rms, all_keys)
    return c.score(c.h, c.a, c.logp_h), c.score(c.r, c.f, c.logp_r)


@functools.partial(jax.jit, static_argnames=("cfg", "chunk"))
def _attribution_jit(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array,
                     target_id: jax.Array, use_rms: jax.Array, all_keys: jax.Array, ffn_layers: jax.Array,
                     attn_layers: jax.Array, *, chunk: int) -> Attribution:
    """``input_ids, attention_mask [1, T]`` (left padding allowed), ``target_id []``, ``use_rms`` and
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


def _as_row(input_ids: Any, name: str) -> jax.Array:
    ids = jnp.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
        raise DataError(f"{name} must have shape [T] or [1, T] with T >= 1 (one example); got {ids.shape}.")
    return ids


def _check_target(target_id: Any, cfg: ModelConfig) -> jax.Array:
    if isinstance(target_id, (int, np.integer)) and not 0 <= int(target_id) < cfg.vocab_size:
        raise DataError(f"target token {int(target_id)} is outside the vocabulary [0, {cfg.vocab_size}).")
    return jnp.asarray(target_id, jnp.int32)


def _prepared(input_ids: Any, attention_mask: Any | None) -> tuple[jax.Array, jax.Array]:
    ids = _as_row(input_ids, "input_ids")
    mask = jnp.ones_like(ids) if attention_mask is None else _as_row(attention_mask, "attention_mask")
    chex.assert_equal_shape([ids, mask])
    return ids, mask


def _layer_list(layers: Any, cfg: ModelConfig, name: str) -> jax.Array:
    """``layers`` (``None`` = all) as a sorted int32 array of distinct layer indices."""
    if layers is None:
        return jnp.arange(cfg.num_layers, dtype=jnp.int32)
    arr = np.unique(np.asarray(layers, np.int64).reshape(-1))
    if arr.size == 0 or arr[0] < 0 or arr[-1] >= cfg.num_layers:
        raise ConfigError(f"{name}={np.asarray(layers).tolist()} must name layers in [0, {cfg.num_layers}).")
    return jnp.asarray(arr, jnp.int32)


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
    (float32).
    """
    _check_options(mode, attention, chunk)
    ids, mask = _prepared(input_ids, attention_mask)
    out = _attribution_jit(params, cfg, ids, mask, _check_target(target_id, cfg), jnp.asarray(mode == "rmsnorm"),
                           jnp.asarray(attention == "all_keys"), _layer_list(ffn_layers, cfg, "ffn_layers"),
                           _layer_list(attn_layers, cfg, "attn_layers"), chunk=chunk)
    chex.assert_shape([out.layer_attn, out.layer_ffn], (cfg.num_layers,))
    chex.assert_shape(out.ffn, (cfg.num_layers, cfg.intermediate_size))
    chex.assert_shape(out.attn, (cfg.num_layers, cfg.q_dim))
    return out


def layer_scores(params: Params, cfg: ModelConfig, input_ids: Any, target_id: Any, mode: str = "reference",
                 attention: str = "last_key", attention_mask: Any | None = None) -> tuple[jax.Array, jax.Array]:
    """``(layer_attn [L], layer_ffn [L])`` of one example, without the neuron scores (one forward and ``2 L``
    vocabulary projections): what :func:`locate` ranks layers by before scoring neurons in the top ones."""
    _check_options(mode, attention, DEFAULT_CHUNK)
    ids, mask = _prepared(input_ids, attention_mask)
    return _layer_scores_jit(params, cfg, ids, mask, _check_target(target_id, cfg), jnp.asarray(mode == "rmsnorm"),
                             jnp.asarray(attention == "all_keys"))


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


def locate(params: Params, cfg: ModelConfig, tokenizer, examples: Sequence[dict[str, Any]],
           mode: str = "reference", attention: str = "last_key", chunk: int = DEFAULT_CHUNK,
           bucket: int = 32, layers: int | None = None) -> Attribution:
    """Attribution summed over ``examples`` (chat examples; SPEC §3.1: scores add up).

    ``layers=K`` (below ``L``) scores neurons only where :func:`pktjax.select.select` with ``n_layers=K`` looks:
    the layer scores of all examples are summed first, then the neurons of the top ``K`` attention and top ``K``
    FFN layers are scored (the other rows are ``-inf``). The selection is the same as from the full scores, at
    about ``K / L`` of the cost. Inputs are left-padded to a multiple of ``bucket`` tokens (masked, so the scores
    do not change) so that one compiled function serves examples of similar length.
    """
    _check_options(mode, attention, chunk)
    if not examples:
        raise DataError("locate needs at least one example; the split is empty.")
    if layers is not None and not 1 <= layers <= cfg.num_layers:
        raise ConfigError(f"layers={layers} must be between 1 and the model's {cfg.num_layers} layers.")
    batches = []
    for ex in examples:
        ids, target = attribution_target(tokenizer, ex)
        batches.append((pad_left([Tokenized(ids, ids)], _pad_id(tokenizer), bucket_length(len(ids), bucket)),
                        target))
    chosen: dict[str, Any] = {}
    if layers is not None and layers < cfg.num_layers:
        sums = [sum(pair) for pair in zip(*(layer_scores(params, cfg, b.ids, t, mode, attention, b.mask)
                                            for b, t in batches))]
        chosen = {name: jnp.sort(jax.lax.top_k(total, layers)[1]) for name, total in zip(("attn_layers",
                                                                                          "ffn_layers"), sums)}
    total = None
    for batch, target in batches:
        attr = attribution(params, cfg, batch.ids, target, mode, attention, chunk, batch.mask, **chosen)
        total = attr if total is None else total + attr
    return total


def matmul_flops(cfg: ModelConfig) -> float:
    """Floating-point operations of the neuron scores' vocabulary products: ``2 L (f + H*hd) d V``."""
    return 2.0 * math.prod((cfg.num_layers, cfg.intermediate_size + cfg.q_dim, cfg.hidden_size, cfg.vocab_size))
