"""Neural-incompatibility analysis (SPEC §6): how much a teacher and a student have in common.

*Parametric similarity* compares a LoRA initialisation ``ΔW = scale · B A`` of each layer with the weight it was
built for: its cosine with the remaining weight ``W − ΔW`` and with the student's original ``W`` (flattened
matrices). A PiSSA init (top singular part of ``W``) is orthogonal to its remainder and aligned with ``W``; a
Seeking init (extracted from the teacher) need not be either.

*Representation similarity* compares module outputs (``up_proj``, ``down_proj``, ``v_proj``, ``o_proj``) of every
student layer with every teacher layer on the same probe tokens, giving a ``[L_S, L_T]`` matrix per module:

- ``"cka"``: linear CKA, ``‖X̃ᵀỸ‖²_F / (‖X̃ᵀX̃‖_F ‖ỸᵀỸ‖_F)`` with ``X̃, Ỹ`` the outputs centred over tokens. It lies in
  ``[0, 1]``, is 1 for identical inputs and does not change under orthogonal maps or isotropic scaling of either
  side, so layers of different widths compare directly.
- ``"cosine"``: the *mean cosine of token-similarity profiles*. Outputs of different widths cannot be compared
  coordinate by coordinate, so each layer is described by how it relates the probe tokens to one another: centre
  the outputs over tokens, unit-normalise each token, and take the token-by-token cosine matrix ``S = X̂ X̂ᵀ``
  (``[n, n]``) without its diagonal. Token ``i``'s profile is row ``S[i]``; the metric is the mean over tokens of
  ``cos(S_x[i], S_y[i])``. It lies in ``[−1, 1]`` (negative when the two layers order the tokens' similarities
  oppositely), is 1 for identical inputs and has the same invariances as CKA.

CKA is computed in one of two exact ways (``route``): ``"features"`` streams over token batches and keeps the
running co-moments ``X̃ᵀX̃, ỸᵀỸ, X̃ᵀỸ`` (merged batch by batch with Chan et al.'s update, so centring never
subtracts large sums); its memory does not grow with the number of tokens but grows with
``L_S·L_T·d_S·d_T``. ``"tokens"`` keeps the probe outputs and builds centred Gram matrices ``[n, n]`` per layer;
its memory grows with ``n²`` but not with the widths. ``"auto"`` takes ``features`` when its state fits
``state_budget_bytes``. The cosine metric always uses ``tokens``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable, Iterator, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pktjax.config import ModelConfig
from pktjax.data import Tokenized, bucket_length, check_example, pad_left, tokenize_laten
from pktjax.errors import ConfigError, PairError
from pktjax.model import LINEAR_NAMES, forward_modules
from pktjax.tokenizer import load_tokenizer

DEFAULT_MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")
METRICS = ("cka", "cosine")
_HI = jax.lax.Precision.HIGHEST


def _mm(eq: str, *xs: jax.Array) -> jax.Array:
    return jnp.einsum(eq, *xs, precision=_HI)


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, and 0 where ``den`` is 0 (a side without variance has no direction)."""
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# --------------------------------------------------------------------------------------------------------------
# Parametric similarity
# --------------------------------------------------------------------------------------------------------------

def _cosine(u: jax.Array, v: jax.Array) -> jax.Array:
    """Cosine of two equally shaped arrays, flattened; 0 when either is zero."""
    return _safe_div(jnp.sum(u * v), jnp.linalg.norm(u) * jnp.linalg.norm(v))


def _layer_cosines(w: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``w [L, out, in], a [L, r, in], b [L, out, r]`` -> ``(cos(ΔW, W − ΔW), cos(ΔW, W))``, each ``[L]``, one
    layer at a time so only one ``[out, in]`` product lives at once."""

    def one(args):
        wl, al, bl = (x.astype(jnp.float32) for x in args)
        delta = scale * _mm("or,ri->oi", bl, al)
        return _cosine(delta, wl - delta), _cosine(delta, wl)

    return jax.lax.map(one, (w, a, b))


@jax.jit
def _all_cosines(ws: dict[str, jax.Array], factors: dict[str, dict[str, jax.Array]], scale: jax.Array):
    """:func:`_layer_cosines` of every module in one compiled call."""
    return {n: _layer_cosines(ws[n], factors[n]["a"], factors[n]["b"], scale) for n in ws}


def parametric_similarity(student_params: dict[str, Any], cfg: ModelConfig, lora: dict[str, Any],
                          scale: float = 1.0, modules: Sequence[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-layer cosine of ``ΔW = scale · B A`` with the remaining weight ``W − ΔW`` and with the original ``W``.

    ``student_params``: the student's original parameters (``layers[name]: [L, out, in]``); ``lora["layers"][name]
    = {"a": [L, r, in], "b": [L, out, r]}``; ``modules``: which projections (default: every one the adapter has).
    Returns ``{module: {"vs_remaining": [L], "vs_original": [L]}}`` (numpy float32).
    """
    layers = lora.get("layers", {})
    names = tuple(modules) if modules is not None else tuple(n for n in LINEAR_NAMES if n in layers)
    missing = [n for n in names if n not in layers]
    if missing:
        raise ConfigError(f"the adapter has no {missing[0]!r}; it adapts {sorted(layers)}.")
    ws = {n: student_params["layers"][n] for n in names}
    factors = {n: {"a": jnp.asarray(layers[n]["a"], jnp.float32), "b": jnp.asarray(layers[n]["b"], jnp.float32)}
               for n in names}
    for n in names:
        w, a, b = ws[n], factors[n]["a"], factors[n]["b"]
        chex.assert_rank([w, a, b], 3)
        chex.assert_shape(w, (cfg.num_layers, None, None))
        chex.assert_shape(a, (cfg.num_layers, a.shape[1], w.shape[2]))
        chex.assert_shape(b, (cfg.num_layers, w.shape[1], a.shape[1]))
    cos = _all_cosines(ws, factors, jnp.float32(scale))
    return {n: {"vs_remaining": np.asarray(cos[n][0]), "vs_original": np.asarray(cos[n][1])} for n in names}


# --------------------------------------------------------------------------------------------------------------
# Streaming co-moments and linear CKA
# --------------------------------------------------------------------------------------------------------------

@struct.dataclass
class Moments:
    """Running statistics of student outputs ``x`` and teacher outputs ``y`` over the tokens seen so far.

    n [] tokens; mx [Ls, ds], my [Lt, dt] means; cxx [Ls, ds, ds], cyy [Lt, dt, dt], cxy [Ls, Lt, ds, dt]
    sums of centred outer products (co-moments). All float32.
    """

    n: jax.Array
    mx: jax.Array
    my: jax.Array
    cxx: jax.Array
    cyy: jax.Array
    cxy: jax.Array


def moments_init(ls: int, ds: int, lt: int, dt: int) -> Moments:
    """Empty statistics for ``ls`` layers of width ``ds`` against ``lt`` layers of width ``dt``."""
    z = functools.partial(jnp.zeros, dtype=jnp.float32)
    return Moments(n=z(()), mx=z((ls, ds)), my=z((lt, dt)), cxx=z((ls, ds, ds)), cyy=z((lt, dt, dt)),
                   cxy=z((ls, lt, ds, dt)))


def moments_update(m: Moments, x: jax.Array, y: jax.Array, w: jax.Array) -> Moments:
    """Add a batch: ``x [Ls, N, ds]``, ``y [Lt, N, dt]``, ``w [N]`` (1 = real token, 0 = padding). Jitted; the
    old state's buffers are donated (do not reuse ``m``)."""
    return _moments_update_jit(m, x, y, w)


def _moments_update(m: Moments, x: jax.Array, y: jax.Array, w: jax.Array) -> Moments:
    """The batch is centred on its own mean, then merged with the running statistics (Chan, Golub & LeVeque):
    ``C = C_a + C_b + (n_a n_b / n) δ δᵀ`` with ``δ`` the difference of the two means.
    """
    chex.assert_rank([x, y, w], [3, 3, 1])
    chex.assert_equal(x.shape[1], w.shape[0])
    chex.assert_equal(y.shape[1], w.shape[0])
    w = w.astype(jnp.float32)
    nb = jnp.sum(w)
    n = m.n + nb
    bx = _mm("lnd,n->ld", x.astype(jnp.float32), w) / jnp.maximum(nb, 1.0)
    by = _mm("lnd,n->ld", y.astype(jnp.float32), w) / jnp.maximum(nb, 1.0)
    xc = (x - bx[:, None]) * w[None, :, None]
    yc = (y - by[:, None]) * w[None, :, None]
    dx, dy = bx - m.mx, by - m.my
    f = m.n * nb / jnp.maximum(n, 1.0)
    return Moments(
        n=n,
        mx=m.mx + dx * (nb / jnp.maximum(n, 1.0)),
        my=m.my + dy * (nb / jnp.maximum(n, 1.0)),
        cxx=m.cxx + _mm("lnd,lne->lde", xc, xc) + f * _mm("ld,le->lde", dx, dx),
        cyy=m.cyy + _mm("lnd,lne->lde", yc, yc) + f * _mm("ld,le->lde", dy, dy),
        cxy=m.cxy + _mm("snd,tne->stde", xc, yc) + f * _mm("sd,te->stde", dx, dy),
    )


_moments_update_jit = jax.jit(lambda m, x, y, w: _moments_update(m, x, y, w), donate_argnums=0)


@jax.jit
def moments_cka(m: Moments) -> jax.Array:
    """Linear CKA ``[Ls, Lt]`` from the co-moments: ``‖Cxy‖² / (‖Cxx‖ ‖Cyy‖)``, normalised before squaring."""
    nx = jnp.linalg.norm(m.cxx, axis=(1, 2))  # [Ls]
    ny = jnp.linalg.norm(m.cyy, axis=(1, 2))  # [Lt]
    den = jnp.sqrt(nx[:, None] * ny[None, :])
    scaled = m.cxy / jnp.where(den > 0, den, 1.0)[..., None, None]
    return jnp.where(den > 0, jnp.sum(scaled * scaled, axis=(2, 3)), 0.0)


def _centre(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return x - jnp.mean(x, axis=0, keepdims=True)


@jax.jit
def _cka_dense(x: jax.Array, y: jax.Array) -> jax.Array:
    """One-shot linear CKA of ``x [n, d1]`` and ``y [n, d2]`` in whichever form is smaller (features or Grams)."""
    xc, yc = _centre(x), _centre(y)
    n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
    if d1 * d2 <= n * n:
        cxy, cxx, cyy = _mm("nd,ne->de", xc, yc), _mm("nd,ne->de", xc, xc), _mm("nd,ne->de", yc, yc)
        den = jnp.sqrt(jnp.linalg.norm(cxx) * jnp.linalg.norm(cyy))
        return jnp.sum(jnp.square(_safe_div(cxy, den)))
    kx, ky = _unit(_mm("id,jd->ij", xc, xc)), _unit(_mm("id,jd->ij", yc, yc))
    return jnp.sum(kx * ky)


def _unit(k: jax.Array) -> jax.Array:
    return _safe_div(k, jnp.linalg.norm(k))


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA of ``x [n, d1]`` and ``y [n, d2]`` (the same ``n`` examples, any widths): a float in [0, 1]."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    chex.assert_rank([x, y], 2)
    chex.assert_equal(x.shape[0], y.shape[0])
    return float(_cka_dense(x, y))


# --------------------------------------------------------------------------------------------------------------
# Token-space (Gram) forms, and the mean cosine of token-similarity profiles
# --------------------------------------------------------------------------------------------------------------

def _gram_cka(x: jax.Array) -> jax.Array:
    """``x [n, d]`` -> centred Gram ``[n, n]`` scaled to unit Frobenius norm."""
    xc = _centre(x)
    return _unit(_mm("id,jd->ij", xc, xc))


def _gram_profiles(x: jax.Array) -> jax.Array:
    """``x [n, d]`` -> token-similarity profiles ``[n, n]``: cosines of centred tokens, diagonal removed, each row
    scaled to unit norm."""
    xc = _centre(x)
    xh = xc / jnp.maximum(jnp.linalg.norm(xc, axis=1, keepdims=True), 1e-30)
    s = _mm("id,jd->ij", xh, xh) * (1.0 - jnp.eye(x.shape[0], dtype=jnp.float32))
    return s / jnp.maximum(jnp.linalg.norm(s, axis=1, keepdims=True), 1e-30)


_GRAMS = {"cka": _gram_cka, "cosine": _gram_profiles}


@functools.partial(jax.jit, static_argnums=1)
def _grams(x: jax.Array, metric: str) -> jax.Array:
    """``x [L, n, d]`` -> ``[L, n, n]``, one layer at a time."""
    return jax.lax.map(_GRAMS[metric], x)


@functools.partial(jax.jit, static_argnums=2)
def _gram_similarity(gx: jax.Array, gy: jax.Array, metric: str) -> jax.Array:
    """``gx [Ls, n, n], gy [Lt, n, n]`` -> ``[Ls, Lt]``."""
    sim = _mm("sij,tij->st", gx, gy)
    return sim / gx.shape[1] if metric == "cosine" else sim


def mean_cosine(x: Any, y: Any) -> float:
    """The mean cosine of token-similarity profiles (see the module docstring) of ``x [n, d1]`` and ``y [n, d2]``:
    a float in [−1, 1]. Needs ``n >= 3`` so that a profile has at least two entries."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    chex.assert_rank([x, y], 2)
    chex.assert_equal(x.shape[0], y.shape[0])
    if x.shape[0] < 3:
        raise ConfigError("mean_cosine needs at least 3 tokens.")
    return float(_gram_similarity(_grams(x[None], "cosine"), _grams(y[None], "cosine"), "cosine")[0, 0])


# --------------------------------------------------------------------------------------------------------------
# Probe set and module outputs
# --------------------------------------------------------------------------------------------------------------

def probe_tokens(examples: Iterable[Any], tokenizer=None, cutoff_len: int = 768) -> list[np.ndarray]:
    """Token ids ``[T_i]`` of each example: chat examples through the LaTen tokenization (SPEC §2), sequences of
    ints as they are."""
    out = []
    for i, ex in enumerate(examples):
        if isinstance(ex, dict):
            if tokenizer is None:
                raise ConfigError("chat examples need a tokenizer (pass tokenizer=...).")
            check_example(ex, f"example {i}")
            out.append(tokenize_laten(tokenizer, ex, cutoff_len).ids)
        else:
            out.append(np.asarray(ex, np.int32)[:cutoff_len])
    if not out or not all(len(t) for t in out):
        raise ConfigError("the probe set is empty (or holds an empty example).")
    return out


def probe_batches(tokens: Sequence[np.ndarray], batch_size: int, pad_id: int,
                  max_tokens: int | None = None) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Left-padded batches ``(ids [B, T], mask [B, T], weight [B*T])``; ``weight`` marks the real tokens counted
    (at most ``max_tokens`` over the whole probe set). Every batch has ``batch_size`` rows (short ones are padded
    with empty rows) and ``T`` a multiple of 64, so jitted code sees few shapes."""
    budget = max_tokens if max_tokens is not None else math.inf
    for start in range(0, len(tokens), batch_size):
        if budget <= 0:
            return
        chunk = [Tokenized(t, t) for t in tokens[start:start + batch_size]]
        chunk += [Tokenized(np.zeros(0, np.int32), np.zeros(0, np.int32))] * (batch_size - len(chunk))
        batch = pad_left(chunk, pad_id, bucket_length(max(len(t.ids) for t in chunk)))
        weight = batch.mask.reshape(-1).astype(np.float32)
        keep = np.cumsum(weight) <= budget
        weight = weight * keep
        budget -= int(weight.sum())
        yield batch.ids, batch.mask, weight


@functools.partial(jax.jit, static_argnums=(1, 4))
def module_outputs(params: dict[str, Any], cfg: ModelConfig, ids: jax.Array, mask: jax.Array,
                   modules: tuple[str, ...]) -> dict[str, jax.Array]:
    """``ids, mask [B, T]`` -> ``{module: [L, B*T, out]}``, the module outputs at every position."""
    _, outs = forward_modules(params, cfg, ids, mask, modules=modules)
    return {k: v.reshape(v.shape[0], -1, v.shape[-1]) for k, v in outs.items()}


def output_width(cfg: ModelConfig, module: str) -> int:
    """Width of a module's output."""
    widths = {"q_proj": cfg.q_dim, "k_proj": cfg.kv_dim, "v_proj": cfg.kv_dim, "o_proj": cfg.hidden_size,
              "gate_proj": cfg.intermediate_size, "up_proj": cfg.intermediate_size, "down_proj": cfg.hidden_size,
              "coeff": cfg.intermediate_size, "output": cfg.hidden_size}
    if module not in widths:
        raise ConfigError(f"unknown module {module!r}; choose from {sorted(widths)}.")
    return widths[module]


def feature_state_bytes(teacher_cfg: ModelConfig, student_cfg: ModelConfig, module: str) -> int:
    """Bytes of the streaming (``features``) CKA state of one module."""
    ls, lt = student_cfg.num_layers, teacher_cfg.num_layers
    ds, dt = output_width(student_cfg, module), output_width(teacher_cfg, module)
    return 4 * (ls * ds * ds + lt * dt * dt + ls * lt * ds * dt)


# --------------------------------------------------------------------------------------------------------------
# Representation similarity
# --------------------------------------------------------------------------------------------------------------

def representation_similarity(teacher, student, examples: Iterable[Any],
                              modules: Sequence[str] = DEFAULT_MODULES, metric: str = "cka", *, tokenizer=None,
                              batch_size: int = 4, cutoff_len: int = 768, max_tokens: int | None = 4096,
                              route: str = "auto", state_budget_bytes: int = 1 << 30) -> dict[str, np.ndarray]:
    """Layer-by-layer similarity of module outputs on a probe set: ``{module: [L_S, L_T]}`` (numpy float32).

    ``teacher``, ``student``: :class:`pktjax.checkpoint.Model` sharing a tokenizer; ``examples``: chat examples
    (tokenized with ``tokenizer``, by default the student's own) or token-id sequences. Only real tokens count,
    at most ``max_tokens`` of them. ``metric``: ``"cka"`` or ``"cosine"``; ``route``: ``"auto"``, ``"features"``
    or ``"tokens"`` (see the module docstring).
    """
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose from {METRICS}.")
    if route not in ("auto", "features", "tokens"):
        raise ConfigError(f"unknown route {route!r}; choose auto, features or tokens.")
    if max_tokens is not None and max_tokens < 1:
        raise ConfigError("max_tokens must be at least 1 (or None for every probe token).")
    modules = tuple(modules)
    for m in modules:
        output_width(student.config, m)
    tokens = probe_tokens(examples, _tokenizer_for(student, tokenizer), cutoff_len)
    _check_vocab(tokens, teacher.config, student.config)
    pad = student.config.eos_ids[0] if student.config.eos_ids else 0
    batches = functools.partial(probe_batches, tokens, batch_size, pad, max_tokens)
    if metric == "cka" and route != "tokens":
        fits = all(feature_state_bytes(teacher.config, student.config, m) <= state_budget_bytes for m in modules)
        if route == "features" or fits:
            return _by_features(teacher, student, batches(), modules)
    return _by_tokens(teacher, student, batches(), modules, metric)


def _tokenizer_for(student, tokenizer):
    if tokenizer is not None or not getattr(student, "source", None):
        return tokenizer
    return load_tokenizer(student.source)


def _check_vocab(tokens: Sequence[np.ndarray], teacher_cfg: ModelConfig, student_cfg: ModelConfig) -> None:
    top = max(int(t.max()) for t in tokens)
    if top >= min(teacher_cfg.vocab_size, student_cfg.vocab_size):
        raise PairError(f"token id {top} is outside a vocabulary (teacher {teacher_cfg.vocab_size}, student "
                        f"{student_cfg.vocab_size}); teacher and student must share the tokenizer.")


@functools.partial(jax.jit, static_argnums=(6, 7, 8), donate_argnums=0)
def _feature_step(state: dict[str, Moments], t_params, s_params, ids: jax.Array, mask: jax.Array, w: jax.Array,
                  t_cfg: ModelConfig, s_cfg: ModelConfig, modules: tuple[str, ...]) -> dict[str, Moments]:
    """Both forwards on one batch ``ids, mask [B, T]`` (``w [B*T]`` real-token weights) and the co-moment update
    of every module, in one compiled call."""
    xs = module_outputs(s_params, s_cfg, ids, mask, modules)
    ys = module_outputs(t_params, t_cfg, ids, mask, modules)
    return {m: _moments_update(state[m], xs[m], ys[m], w) for m in modules}


def _by_features(teacher, student, batches, modules) -> dict[str, np.ndarray]:
    """Streaming CKA: one pass over the probe batches, co-moments per module."""
    t_cfg, s_cfg = teacher.config, student.config
    state = {m: moments_init(s_cfg.num_layers, output_width(s_cfg, m), t_cfg.num_layers, output_width(t_cfg, m))
             for m in modules}
    for ids, mask, weight in batches:
        if weight.any():
            state = _feature_step(state, teacher.params, student.params, ids, mask, weight, t_cfg, s_cfg, modules)
    return {m: np.asarray(moments_cka(state[m])) for m in modules}


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _outputs_pair(t_params, s_params, ids: jax.Array, mask: jax.Array, t_cfg: ModelConfig, s_cfg: ModelConfig,
                  modules: tuple[str, ...]) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(student outputs, teacher outputs)``, each ``{module: [L, B*T, out]}``, in one compiled call."""
    return module_outputs(s_params, s_cfg, ids, mask, modules), module_outputs(t_params, t_cfg, ids, mask, modules)


@functools.partial(jax.jit, static_argnums=2)
def _gram_heatmap(x: jax.Array, y: jax.Array, metric: str) -> jax.Array:
    """``x [Ls, n, ds]``, ``y [Lt, n, dt]`` -> ``[Ls, Lt]``."""
    return _gram_similarity(_grams(x, metric), _grams(y, metric), metric)


def _by_tokens(teacher, student, batches, modules, metric) -> dict[str, np.ndarray]:
    """Gram route: gather the real-token outputs ``[L, n, d]`` on the host, then compare per-layer ``[n, n]``
    matrices, one module at a time (device memory: one module's outputs and ``(Ls + Lt) n²`` Gram entries)."""
    xs: dict[str, list] = {m: [] for m in modules}
    ys: dict[str, list] = {m: [] for m in modules}
    for ids, mask, weight in batches:
        keep = np.flatnonzero(weight)
        if keep.size == 0:
            continue
        outs = _outputs_pair(teacher.params, student.params, ids, mask, teacher.config, student.config, modules)
        for store, out in zip((xs, ys), outs):
            for m in modules:
                store[m].append(np.asarray(out[m])[:, keep])
    n = sum(a.shape[1] for a in xs[modules[0]])
    if metric == "cosine" and n < 3:
        raise ConfigError("the cosine metric needs at least 3 probe tokens.")
    return {m: np.asarray(_gram_heatmap(np.concatenate(xs.pop(m), axis=1), np.concatenate(ys.pop(m), axis=1),
                                        metric)) for m in modules}


def alignment_cka(teacher, before, after, examples: Iterable[Any], layer: int, module: str = "down_proj", *,
                  tokenizer=None, batch_size: int = 4, cutoff_len: int = 768,
                  max_tokens: int | None = 4096) -> dict[str, np.ndarray]:
    """SemAlign's "before / after alignment" view: linear CKA of student layer ``layer`` (0-based) with every
    teacher layer, for the student before and after training: ``{"before": [L_T], "after": [L_T]}``.

    ``before``, ``after``: :class:`pktjax.checkpoint.Model` of one config; ``module``: the output compared
    (``down_proj`` for SemAlign's default, ``output`` for a layer's residual output). The rows come from
    :func:`representation_similarity` (same probe tokens for both students)."""
    if before.config != after.config:
        raise ConfigError("the students before and after alignment must share one config.")
    if not 0 <= layer < before.config.num_layers:
        raise ConfigError(f"layer {layer} is outside the student's 0..{before.config.num_layers - 1}.")
    kw = dict(tokenizer=tokenizer, batch_size=batch_size, cutoff_len=cutoff_len, max_tokens=max_tokens)
    examples = list(examples)
    return {name: representation_similarity(teacher, model, examples, (module,), "cka", **kw)[module][layer]
            for name, model in (("before", before), ("after", after))}


# --------------------------------------------------------------------------------------------------------------
# Summaries and the markdown report
# --------------------------------------------------------------------------------------------------------------

def triangle_mask(shape: tuple[int, int]) -> np.ndarray:
    """``[L_S, L_T]`` boolean: the cells with teacher index ≥ student index (the part the paper shows)."""
    s, t = np.indices(shape)
    return t >= s


def heatmap_summary(mat: np.ndarray, triangle: bool = True) -> dict[str, float]:
    """Mean and standard deviation of a ``[L_S, L_T]`` matrix over the cells shown (the triangle, or all)."""
    mat = np.asarray(mat, np.float64)
    vals = mat[triangle_mask(mat.shape)] if triangle else mat.ravel()
    return {"mean": float(vals.mean()), "std": float(vals.std())}


def _fmt(v: float) -> str:
    """``+0.123``; a value that rounds to zero prints as ``+0.000``, never ``-0.000``."""
    return f"{round(float(v), 3) + 0.0:+.3f}"


def markdown_report(parametric: dict[str, dict[str, dict[str, np.ndarray]]],
                    representation: dict[str, dict[str, np.ndarray]], meta: dict[str, Any],
                    triangle: bool = True) -> str:
    """A short markdown summary. ``parametric``: ``{init: {module: {"vs_remaining", "vs_original"}}}``;
    ``representation``: ``{metric: {module: [L_S, L_T]}}``; ``meta``: key/values listed first."""
    lines = ["# Neural-incompatibility analysis", ""]
    lines += [f"- **{k}**: {v}" for k, v in meta.items()] + [""]
    if parametric:
        lines += ["## Parametric similarity (cosine of the LoRA init `BA`, mean over layers)", "",
                  "| init | module | vs remaining `W − BA` | vs original `W` |", "|---|---|---|---|"]
        for init, per_module in parametric.items():
            for m, r in per_module.items():
                rem, orig = (_fmt(np.mean(r[k])) for k in ("vs_remaining", "vs_original"))
                lines.append(f"| {init} | {m} | {rem} | {orig} |")
        lines.append("")
    where = "cells with teacher layer ≥ student layer" if triangle else "all cells"
    for metric, mats in representation.items():
        lines += [f"## Representation similarity ({metric}; mean and std over {where})", "",
                  "| module | mean | std | diagonal mean | shape [L_S, L_T] |", "|---|---|---|---|---|"]
        for m, mat in mats.items():
            s = heatmap_summary(mat, triangle)
            diag = float(np.mean(np.diagonal(mat)))
            lines.append(f"| {m} | {s['mean']:.3f} | {s['std']:.3f} | {diag:.3f} | {list(np.shape(mat))} |")
        lines.append("")
    return "\n".join(lines)
