"""The decoder: pure functions over a parameter pytree (Llama-2/3, Qwen2/2.5, Mistral).

Parameters (``[out_features, in_features]`` as in Hugging Face; layers stacked on a leading axis ``L``)::

    params = {
      "embed":      [V, d],
      "final_norm": [d],
      "lm_head":    [V, d]            # absent when cfg.tie_word_embeddings
      "layers": {
        "input_norm": [L, d],  "post_attn_norm": [L, d],
        "q_proj": [L, H*hd, d],  "k_proj": [L, KV*hd, d],  "v_proj": [L, KV*hd, d],  "o_proj": [L, d, H*hd],
        "q_bias": [L, H*hd],  "k_bias": [L, KV*hd],  "v_bias": [L, KV*hd],      # only when cfg.attention_bias
        "gate_proj": [L, f, d],  "up_proj": [L, f, d],  "down_proj": [L, d, f],
      },
    }

A LoRA pytree (see :mod:`pktjax.lora`) mirrors it: ``lora["layers"][name] = {"a": [L, r, in], "b": [L, out, r]}``
and ``lora["embed"|"lm_head"] = {"a": [r, in], "b": [out, r]}``; the forward adds ``scale * B A x`` without
merging. A sparse delta adapter (LaTen's injection during aligner training, :func:`pktjax.inject.delta_adapter`)
takes the same place: ``lora["layers"][name] = {"rows": [L, N], "delta": [L, N, in]}`` or ``{"cols": [L, N],
"delta": [L, out, N]}`` adds ``delta`` to those rows / columns of the weight inside the product.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
from flax import struct

from pktjax.config import ModelConfig
from pktjax.partition import TENSOR, constrain_batch

Params = dict[str, Any]
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
LINEAR_NAMES = ATTN_PROJ + MLP_PROJ
_NEG = -1e30  # finite "minus infinity": a fully masked row stays finite


@struct.dataclass
class Trace:
    """What LaTen's attribution reads at the last position, per layer (SPEC §3.1). ``B`` = batch.

    h [L, B, d] layer input; a [L, B, d] attention output (after o_proj); r [L, B, d] = h + a;
    ffn_out [L, B, d]; coeff [L, B, f] = act(gate) * up; head_last_key [L, B, H*hd] = alpha_{last->last} v_last
    per head; head_all_keys [L, B, H*hd] = sum_t alpha_{last->t} v_t per head; output [B, d] last layer output.
    """

    h: jax.Array
    a: jax.Array
    r: jax.Array
    ffn_out: jax.Array
    coeff: jax.Array
    head_last_key: jax.Array
    head_all_keys: jax.Array
    output: jax.Array


@struct.dataclass
class LoraSpec:
    """How a LoRA pytree is applied: ``scale = alpha / r`` and input dropout (training only)."""

    scale: float = struct.field(pytree_node=False, default=1.0)
    dropout: float = struct.field(pytree_node=False, default=0.0)
    rng: jax.Array | None = None


@struct.dataclass
class Adapter:
    """Weights added to the linear layers at run time, without merging them: LoRA factors or a sparse delta
    (the layouts in this module's docstring, ``weights = {"layers": {name: ...}, "embed"?, "lm_head"?}``), and for
    LoRA factors how they apply (``spec``: scale and dropout; ``None`` is scale 1, no dropout)."""

    weights: dict
    spec: LoraSpec | None = None


@struct.dataclass
class InOut:
    """A weight matrix stored transposed, ``w [..., in, out]`` (:func:`with_matmul_dtype`): the layout XLA's CPU
    kernels for bfloat16 products read as it is. Given ``[out, in]`` inside a loop, they transpose a copy of every
    matrix on each call of the decode loop."""

    w: jax.Array


def _dot(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """``einsum(eq, a, b)`` in ``a``'s dtype (``a``: activations, ``b``: weights). Operands of two dtypes (float32
    activations, bfloat16 matrices: :func:`with_matmul_dtype`) multiply in the narrower one and sum in float32,
    which is what bfloat16 matrix units (and XLA's CPU kernels for them) do natively."""
    if a.dtype == b.dtype:
        precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
        return jnp.einsum(eq, a, b, precision=precision)
    low = min(a.dtype, b.dtype, key=lambda t: jnp.dtype(t).itemsize)
    return jnp.einsum(eq, a.astype(low), b.astype(low), preferred_element_type=jnp.float32).astype(a.dtype)


def activation_dtype(params: Params) -> jnp.dtype:
    """The dtype the residual stream (and a KV cache) is kept in: the norms' (the embedding's without them)."""
    return params.get("final_norm", params["embed"]).dtype


def with_matmul_dtype(params: Params, dtype) -> Params:
    """``params`` whose linear layers and LM head multiply in ``dtype`` (:func:`_dot`), activations keeping theirs:
    float32 activations times bfloat16 matrices read half the bytes per decode step. Where ``dtype`` is not the
    matrices' own, they become :class:`InOut` copies in ``dtype`` (a tied model gets its head as ``lm_head``); the
    norms, biases and the embedding table (a lookup, not a product) are left as they are. The layer stacks or the
    per-layer lists of :func:`unstack_layers` alike."""
    dtype = jnp.dtype(dtype)
    if params["embed"].dtype == dtype:
        return params

    def matrix(w):
        return w if isinstance(w, InOut) else InOut(jnp.swapaxes(w, -1, -2).astype(dtype))

    def layer(d: dict) -> dict:
        return {k: matrix(v) if k in LINEAR_NAMES else v for k, v in d.items()}

    layers = params["layers"]
    return {**params, "layers": [layer(d) for d in layers] if isinstance(layers, (list, tuple)) else layer(layers),
            "lm_head": matrix(params.get("lm_head", params["embed"]))}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm as ``transformers`` computes it: statistics in float32, scale in the input dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``positions [B, T]`` -> ``cos, sin [B, T, hd]`` (float32, halves repeated as in ``transformers``)."""
    inv = jnp.asarray(cfg.inv_freq(), dtype=jnp.float32)
    ang = positions.astype(jnp.float32)[..., None] * inv
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """``x [B, T, heads, hd]`` rotated by ``cos, sin [B, T, hd]`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * c + rot * s


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Left-padding aware positions: ``cumsum(mask) - 1``, pads at 0 (what ``generate`` does)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def _dropout(x: jax.Array, spec: LoraSpec | None, salt: int) -> jax.Array:
    if spec is None or spec.dropout == 0.0 or spec.rng is None:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(spec.rng, salt), 1.0 - spec.dropout, x.shape)
    return jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)


def linear(x: jax.Array, w: jax.Array, bias: jax.Array | None = None, lora: dict | None = None,
           spec: LoraSpec | None = None, salt: int = 0) -> jax.Array:
    """``x [..., in] @ w[out, in].T (+ bias) (+ scale * B A dropout(x))``, or with a sparse delta adapter
    (``lora = {"rows" | "cols": [N], "delta": ...}``) the output of ``w`` with those rows / columns changed."""
    y = _dot("...i,io->...o", x, w.w) if isinstance(w, InOut) else _dot("...i,oi->...o", x, w)
    if bias is not None:
        y = y + bias
    if lora is not None and "delta" in lora:
        return _add_sparse_delta(x, y, lora)
    if lora is not None:
        xa = _dot("...i,ri->...r", _dropout(x, spec, salt), lora["a"].astype(x.dtype))
        y = y + (spec.scale if spec else 1.0) * _dot("...r,or->...o", xa, lora["b"].astype(x.dtype))
    return y


def _add_sparse_delta(x: jax.Array, y: jax.Array, adapter: dict) -> jax.Array:
    """``y = x w.T`` -> ``x (w + D).T`` where ``D`` is zero except rows ``adapter["rows"] [N]`` (``delta [N, in]``)
    or columns ``adapter["cols"] [N]`` (``delta [out, N]``); costs ``N / out`` (``N / in``) of the product."""
    delta = adapter["delta"].astype(x.dtype)
    if "rows" in adapter:
        return y.at[..., adapter["rows"]].add(_dot("...i,ni->...n", x, delta))
    return y + _dot("...n,on->...o", jnp.take(x, adapter["cols"], axis=-1), delta)


def embed(params: Params, input_ids: jax.Array, lora: dict | None = None, spec: LoraSpec | None = None) -> jax.Array:
    x = jnp.take(params["embed"], input_ids, axis=0).astype(activation_dtype(params))
    if lora is not None and "embed" in lora:
        a = jnp.take(lora["embed"]["a"].T, input_ids, axis=0).astype(x.dtype)  # [B, T, r]
        x = x + (spec.scale if spec else 1.0) * _dot("...r,or->...o", a, lora["embed"]["b"].astype(x.dtype))
    return x


def unembed(params: Params, cfg: ModelConfig, x: jax.Array, lora: dict | None = None,
            spec: LoraSpec | None = None) -> jax.Array:
    """Final norm then vocabulary projection: ``x [..., d] -> logits [..., V]`` in float32."""
    x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    w = params["lm_head"] if "lm_head" in params else params["embed"]  # a tied model has none (but see InOut)
    head_lora = lora.get("lm_head") if lora is not None else None
    return constrain_batch(linear(x, w, lora=head_lora, spec=spec, salt=10_000).astype(jnp.float32), TENSOR)


def attention_mask_bias(cfg: ModelConfig, q_slots: jax.Array, key_mask: jax.Array) -> jax.Array:
    """Additive bias ``[B, 1, Tq, S]``: query at slot ``q_slots[t]`` sees key slot ``j`` iff ``j <= slot``,
    ``key_mask[b, j]`` and (Mistral) ``slot - j < sliding_window``."""
    j = jnp.arange(key_mask.shape[-1])
    ok = (j[None, :] <= q_slots[:, None])[None] & (key_mask[:, None, :] > 0)
    if cfg.sliding_window is not None:
        ok = ok & ((q_slots[:, None] - j[None, :]) < cfg.sliding_window)[None]
    return jnp.where(ok, 0.0, _NEG)[:, None].astype(jnp.float32)


def _layer_lora(lora: dict | None, name: str) -> dict | None:
    if lora is None:
        return None
    return lora.get("layers", {}).get(name)


def attention(lp: Params, cfg: ModelConfig, x: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array,
              cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None,
              lora: dict | None = None, spec: LoraSpec | None = None, q_block: int = 0):
    """Self-attention of one layer. ``x [B, T, d]``; ``cache = (k [L, B, KV, S, hd], v [L, B, KV, hd, S], index,
    layer)``: the whole KV cache, written at slots ``index`` (``[]`` or per row ``[B]``) of layer ``layer``; a
    ``bias [B, 1, T, W]`` narrower than the cache attends to its first ``W`` slots only (a decode step reads no
    more of the cache than its rows have reached). ``q_block > 0`` (static; a prompt's prefill into a fresh cache,
    whose query ``i`` sits at slot ``i``): queries in blocks of ``q_block``, each attending only to the slots up to
    its last query, which the causal mask allows; then ``probs`` is None. Returns ``(out [B, T, d], ctx [B, T, H,
    hd], probs [B, H, T, S], v [B, KV, hd, S], new_cache (k, v) or None)``. Keys and values are laid out as the
    two products read them (the summed axis last), so that a layer's cache enters them without a transposed
    copy."""
    b, t, _ = x.shape
    hd, n_kv, group = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads

    def proj(name, salt):
        return linear(x, lp[name], lp.get(name.replace("proj", "bias")), _layer_lora(lora, name), spec, salt)

    q = apply_rope(proj("q_proj", 1).reshape(b, t, cfg.num_heads, hd), cos, sin)
    k = apply_rope(proj("k_proj", 2).reshape(b, t, n_kv, hd), cos, sin)
    v = proj("v_proj", 3).reshape(b, t, n_kv, hd)
    new_cache = None
    if cache is not None:  # the whole stack: only the new positions are written, in place
        k_all, v_all, index, layer = cache
        k_all, v_all = _write_cache(k_all, k, index, layer, 2), _write_cache(v_all, v, index, layer, 3)
        w = bias.shape[-1]
        k = jax.lax.dynamic_index_in_dim(k_all, layer, keepdims=False)[:, :, :w]
        v = jax.lax.dynamic_index_in_dim(v_all, layer, keepdims=False)[..., :w]
        new_cache = (k_all, v_all)
    else:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 3, 1)
    qg = q.reshape(b, t, n_kv, group, hd)
    if 0 < q_block < t:
        # causal blocks: the scores of a long prompt are [t, t] per head, and on CPU their softmax passes over
        # memory cost as much as the products; a block's scores stay in cache, and the masked half is never made
        ends = [min(a + q_block, t) for a in range(0, t, q_block)]
        ctx = jnp.concatenate([_attend(qg[:, a:e], k[:, :, :e], v[..., :e], bias[:, :, a:e, :e], x.dtype)[0]
                               for a, e in zip([0] + ends[:-1], ends)], axis=1)
        probs = None
    else:
        ctx, probs = _attend(qg, k, v, bias, x.dtype)
    ctx = ctx.reshape(b, t, cfg.num_heads, hd)
    out = linear(ctx.reshape(b, t, cfg.q_dim), lp["o_proj"], lora=_layer_lora(lora, "o_proj"), spec=spec, salt=4)
    return out, ctx, None if probs is None else probs.reshape(b, cfg.num_heads, t, -1), v, new_cache


def _attend(qg: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """``qg [B, T, KV, G, hd]`` over keys ``k [B, KV, S, hd]``, values ``v [B, KV, hd, S]``, ``bias [B, 1, T, S]``:
    ``(ctx [B, T, KV, G, hd], probs [B, KV, G, T, S])``."""
    scores = _dot("btkgd,bksd->bkgts", qg, k).astype(jnp.float32) * (qg.shape[-1] ** -0.5)
    probs = jax.nn.softmax(scores + bias[:, :, None], axis=-1).astype(dtype)
    return _dot("bkgts,bkds->btkgd", probs, v), probs


def _write_cache(buf: jax.Array, new: jax.Array, index: jax.Array, layer: jax.Array, axis: int) -> jax.Array:
    """Write ``new [B, T, KV, hd]`` into layer ``layer`` of ``buf`` (keys ``[L, B, KV, S, hd]``: ``axis = 2``,
    values ``[L, B, KV, hd, S]``: ``axis = 3``, the slot axis of a layer) from slot ``index``: the same slot for
    every row (``index []``), or each row from its own slot (``index [B]``, continuous batching)."""
    new = new.astype(buf.dtype)
    if index.ndim == 0:
        start = [layer, 0, 0, 0, 0]
        start[1 + axis] = index
        return jax.lax.dynamic_update_slice(buf, jnp.moveaxis(new, 1, axis)[None], start)
    b, t = new.shape[:2]
    rows, slots = jnp.arange(b)[:, None], index[:, None] + jnp.arange(t)[None, :]
    at = (layer, rows, slice(None), slots) if axis == 2 else (layer, rows, slice(None), slice(None), slots)
    return buf.at[at].set(new)  # indexed axes lead: the update is [B, T, KV, hd] either way


def mlp(lp: Params, x: jax.Array, lora: dict | None = None, spec: LoraSpec | None = None):
    """SwiGLU FFN: returns ``(out [B, T, d], coeff [B, T, f])`` with ``coeff = silu(gate) * up``."""
    gate = linear(x, lp["gate_proj"], lora=_layer_lora(lora, "gate_proj"), spec=spec, salt=5)
    up = linear(x, lp["up_proj"], lora=_layer_lora(lora, "up_proj"), spec=spec, salt=6)
    coeff = jax.nn.silu(gate) * up
    return linear(coeff, lp["down_proj"], lora=_layer_lora(lora, "down_proj"), spec=spec, salt=7), coeff


def _fold_layer(spec: LoraSpec | None, i: jax.Array) -> LoraSpec | None:
    if spec is None or spec.rng is None:
        return spec
    return spec.replace(rng=jax.random.fold_in(spec.rng, i))


MODULE_OUTPUTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "coeff", "output")


def _run_layers(params: Params, cfg: ModelConfig, x: jax.Array, cos, sin, bias, *, capture: bool,
                cache: dict | None = None, lora: dict | None = None, spec: LoraSpec | None = None,
                modules: tuple[str, ...] = (), shifts: jax.Array | None = None, q_block: int = 0):
    """The layers in order; returns ``(x, per-layer capture or None, new kv cache or None)``.

    Stacked layer weights (``params["layers"]`` a dict of ``[L, ...]``) run as a ``lax.scan``: one compiled layer,
    but each step slices its layer's weights out of the stacks, a copy of every weight per call on CPU. Per-layer
    weights (a list of ``L`` dicts, :func:`unstack_layers`) run as a Python loop: ``L`` compiled layers reading
    their own buffers, no copy (slower to compile; what a decode step wants).

    ``modules`` names module outputs to collect at every position (``capture`` holds them under ``"modules"``).
    ``shifts [L, B, T, d]`` is added to each layer's output (zeros: the gradient with respect to them is the
    gradient with respect to the layer outputs). ``q_block``: :func:`attention`'s causal blocks (a prefill into a
    fresh cache, without ``capture``).
    """
    layer_lora = None if lora is None else lora.get("layers")
    per_layer = isinstance(params["layers"], (list, tuple))
    xs: dict[str, Any] = {"i": jnp.arange(cfg.num_layers)}
    if not per_layer:
        xs["p"] = params["layers"]
    if layer_lora:
        xs["lora"] = layer_lora
    if shifts is not None:
        xs["shift"] = shifts

    def step(carry, inp):
        h, kv_all = carry  # kv_all: the whole cache stack, carried so that each step writes only new positions
        lp, lspec = (params["layers"][inp["i"]] if per_layer else inp["p"]), _fold_layer(spec, inp["i"])
        ll = {"layers": inp["lora"]} if "lora" in inp else None
        kv = (*kv_all, cache["index"], inp["i"]) if cache is not None else None
        normed = rms_norm(h, lp["input_norm"], cfg.rms_norm_eps)
        a, ctx, probs, v, new_kv = attention(lp, cfg, normed, cos, sin, bias, kv, ll, lspec, q_block)
        r = h + a
        f, coeff = mlp(lp, rms_norm(r, lp["post_attn_norm"], cfg.rms_norm_eps), ll, lspec)
        out = r + f
        ys: dict[str, Any] = {}
        if capture:
            ys["trace"] = _last_position(cfg, h, a, r, f, coeff, ctx, probs, v)
        if modules:
            ys["modules"] = _module_outputs(lp, cfg, modules, normed, r, a, f, coeff, out, ll, lspec)
        out = constrain_batch(out + inp["shift"] if "shift" in inp else out)
        return (out, new_kv), ys

    kv0 = (cache["k"], cache["v"]) if cache is not None else None
    if per_layer:
        carry, outs = (x, kv0), []
        for i in range(cfg.num_layers):
            carry, y = step(carry, {**jax.tree.map(lambda a: a[i], xs), "i": i})  # static layer index
            outs.append(y)
        (x, kv), ys = carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)
    else:
        (x, kv), ys = jax.lax.scan(step, (x, kv0), xs)
    captured = ys.get("trace") if not modules else {**ys.get("trace", {}), "modules": ys["modules"]}
    return x, captured, ({"k": kv[0], "v": kv[1]} if cache is not None else None)


def _module_outputs(lp, cfg, modules, normed, r, a, f, coeff, out, ll, spec) -> dict[str, jax.Array]:
    """Outputs ``[B, T, out]`` of the named modules (recomputed for the cheap projections); ``"output"`` is the
    layer's residual output ``h + a + f``."""
    known = {"o_proj": a, "down_proj": f, "coeff": coeff, "output": out}
    out = {}
    for name in modules:
        if name in known:
            out[name] = known[name]
        elif name in ("q_proj", "k_proj", "v_proj"):
            out[name] = linear(normed, lp[name], lp.get(name.replace("proj", "bias")), _layer_lora(ll, name), spec)
        elif name in ("gate_proj", "up_proj"):
            x2 = rms_norm(r, lp["post_attn_norm"], cfg.rms_norm_eps)
            out[name] = linear(x2, lp[name], lora=_layer_lora(ll, name), spec=spec)
        else:
            raise ValueError(f"unknown module {name!r}; choose from {MODULE_OUTPUTS}.")
    return out


def _last_position(cfg, h, a, r, f, coeff, ctx, probs, v) -> dict[str, jax.Array]:
    b = h.shape[0]
    group = cfg.num_heads // cfg.num_kv_heads
    alpha_last = probs[:, :, -1, -1]  # [B, H] weight of the last query on the last key
    v_last = jnp.repeat(v[..., -1], group, axis=1)  # [B, H, hd]: head k reads kv-head k // group
    return {
        "h": h[:, -1], "a": a[:, -1], "r": r[:, -1], "ffn_out": f[:, -1], "coeff": coeff[:, -1],
        "head_last_key": (alpha_last[..., None] * v_last).reshape(b, cfg.q_dim),
        "head_all_keys": ctx[:, -1].reshape(b, cfg.q_dim),
    }


def _forward(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None,
             adapter: Adapter | None, *, capture: bool = False, modules: tuple[str, ...] = (),
             shifts: jax.Array | None = None):
    """The last layer's output ``[B, T, d]`` and what :func:`_run_layers` captured."""
    chex.assert_rank(input_ids, 2)
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    chex.assert_equal_shape([input_ids, attention_mask])
    positions = positions_from_mask(attention_mask)
    cos, sin = rope_cos_sin(cfg, positions)
    bias = attention_mask_bias(cfg, jnp.arange(input_ids.shape[1]), attention_mask)
    lora, spec = _unpack(adapter)
    x = constrain_batch(embed(params, input_ids, lora, spec))
    x, captured, _ = _run_layers(params, cfg, x, cos, sin, bias, capture=capture, lora=lora, spec=spec,
                                 modules=tuple(modules), shifts=shifts)
    return x, captured


def _unpack(adapter: Adapter | None) -> tuple[dict | None, LoraSpec | None]:
    return (adapter.weights, adapter.spec) if adapter is not None else (None, None)


def _unembed(params: Params, cfg: ModelConfig, x: jax.Array, adapter: Adapter | None) -> jax.Array:
    return unembed(params, cfg, x, *_unpack(adapter))


# The entry points below share one pass (:func:`_forward`) and each returns one type. Jit them with ``cfg``
# static (``jax.jit(forward, static_argnums=1)``) or call them inside a jitted function. ``input_ids,
# attention_mask [B, T]``: left padding is masked out; ``adapter``: unmerged LoRA or sparse-delta weights.

def forward(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
            adapter: Adapter | None = None) -> jax.Array:
    """Logits ``[B, T, V]`` (float32)."""
    x, _ = _forward(params, cfg, input_ids, attention_mask, adapter)
    return _unembed(params, cfg, x, adapter)


def hidden_states(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                  *, adapter: Adapter | None = None) -> jax.Array:
    """The last layer's output ``[B, T, d]`` before the final norm (project a few positions with
    :func:`unembed` rather than the whole ``[B, T, V]``)."""
    return _forward(params, cfg, input_ids, attention_mask, adapter)[0]


def forward_trace(params: Params, cfg: ModelConfig, input_ids: jax.Array,
                  attention_mask: jax.Array | None = None) -> tuple[jax.Array, Trace]:
    """``(logits [B, T, V], Trace)``: the last position's internals that LaTen's attribution reads."""
    x, captured = _forward(params, cfg, input_ids, attention_mask, None, capture=True)
    return unembed(params, cfg, x), Trace(output=x[:, -1], **captured)


def forward_modules(params: Params, cfg: ModelConfig, input_ids: jax.Array, attention_mask: jax.Array | None = None,
                    *, modules: tuple[str, ...], adapter: Adapter | None = None,
                    shifts: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(logits [B, T, V], {name: [L, B, T, out]})``: the outputs of ``modules`` (names of
    :data:`MODULE_OUTPUTS`, e.g. ``("up_proj", "down_proj")``; ``"output"`` is each layer's residual output) at
    every position. ``shifts [L, B, T, d]`` is added to each layer's output (zeros, to differentiate with respect
    to the layer outputs)."""
    if not modules:
        raise ValueError(f"forward_modules: name at least one module of {MODULE_OUTPUTS}.")
    x, captured = _forward(params, cfg, input_ids, attention_mask, adapter, modules=modules, shifts=shifts)
    return _unembed(params, cfg, x, adapter), captured["modules"]


def unstack_layers(params: Params) -> Params:
    """``params`` with the layer stacks split into a list of ``L`` per-layer dicts (``[out, in]`` each): a copy of
    the layer weights that :func:`forward` and the decode loop read without slicing (see :func:`_run_layers`)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda a: a[i], layers) for i in range(n)]}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict[str, jax.Array]:
    """An empty KV cache: ``k [L, B, KV, max_len, hd]``, ``v [L, B, KV, hd, max_len]`` and ``index`` (next free
    slot); see :func:`attention` for the layout."""
    lead = (cfg.num_layers, batch, cfg.num_kv_heads)
    return {"k": jnp.zeros((*lead, max_len, cfg.head_dim), dtype),
            "v": jnp.zeros((*lead, cfg.head_dim, max_len), dtype), "index": jnp.zeros((), jnp.int32)}


def forward_cached(params: Params, cfg: ModelConfig, input_ids: jax.Array, positions: jax.Array,
                   key_mask: jax.Array, cache: dict[str, jax.Array], adapter: Adapter | None = None):
    """One prefill or decode step with a KV cache.

    ``input_ids, positions [B, T]`` are written at cache slots ``index .. index+T``; ``key_mask [B, max_len]``
    marks valid slots (left padding of the prompt = 0). Returns ``(logits [B, T, V], new cache)``.
    """
    t = input_ids.shape[1]
    cos, sin = rope_cos_sin(cfg, positions)
    bias = attention_mask_bias(cfg, cache["index"] + jnp.arange(t), key_mask)
    lora, spec = _unpack(adapter)
    x = embed(params, input_ids, lora, spec)
    x, _, kv = _run_layers(params, cfg, x, cos, sin, bias, capture=False, cache=cache, lora=lora, spec=spec)
    logits = unembed(params, cfg, x, lora, spec)
    return logits, {"k": kv["k"], "v": kv["v"], "index": cache["index"] + t}
