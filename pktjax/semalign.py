"""SemAlign (Gu et al., arXiv 2510.24208 v1): knowledge moved through layer outputs instead of parameters.

1. *Layer attribution* on the teacher (:func:`layer_attribution`): Layer Gradient × Activation per layer,
   ``Σ |h_ℓ ⊙ ∂L/∂h_ℓ|`` over the seed examples' response positions, where ``h_ℓ`` is layer ``ℓ``'s residual
   output and ``L`` each example's mean response-token cross-entropy; the top layer is the critical one ``ℓ*_T``.
2. *Depth-aware pairing* (:func:`pair_layers`, layers counted from 1 as in the paper):
   ``ℓ^T_k = max(1, ⌊L_T k / L_S⌋)``, the student layer ``k† = min{k : ℓ^T_k ≥ ℓ*_T}`` and the teacher target
   ``h̃_T = (1 − λ) h_T^(a) + λ h_T^(b)`` with ``u = L_T k† / L_S``, ``a = max(1, min(⌊u⌋, L_T − 1))``,
   ``b = a + 1``, ``λ = clip(u − a, 0, 1)``.
3. *Semantic bases* (:func:`semantic_bases`): ``s_v = W⁺ e_v / ‖W⁺ e_v‖`` from each LM head ``W [V, d]``, so
   ``S [d, V]``; teacher and student must share the vocabulary.
4. *Decompose and recompose* (:func:`recompose`): ``a = S_Tᵀ h̃_T / ‖h̃_T‖`` (``V`` cosines), ``h*_S = S_S a``.
   Both steps are linear, so training uses the ``[d_S, d_T]`` map ``M = S_S S_Tᵀ`` (:func:`alignment_map`)
   and never holds a ``[tokens, V]`` array.
5. *Loss* (:func:`loss_sums`): ``(1 − mean cos(h^(k†), h*_S)) + (1 − mean cos(z, onehot(y)))`` over the
   response positions, ``z`` the logits; only layer ``k†`` is trained (:class:`Objective`), through the whole
   student.

Where the paper is silent, this module chooses (and the names say so):

- *Response positions* are the positions whose next token is a response token (the positions the LM loss
  scores), for the attribution and both loss terms alike.
- *Which output is compared* (``compare``): ``"ffn"`` (default) is the pre-residual sub-layer output, the MLP's
  ``down_proj`` output before it is added to the residual stream, of both teacher and student layers;
  ``"update"`` is the whole layer's pre-residual contribution ``attention + MLP``; ``"residual"`` the layer's
  residual output ``h + attention + MLP``.
- *Recomposition frame* (``frame``): ``"paper"`` is the formula above. The columns of ``S`` are an
  overcomplete, non-tight frame (``S Sᵀ ≠ c I``), so even with equal heads ``S Sᵀ h`` is not parallel to ``h``;
  ``"dual"`` recomposes with the canonical dual frame, ``M = (S_S S_Sᵀ)⁺ S_S S_Tᵀ``, which is the identity
  (exact recomposition) when the two heads are equal.
- The bases use the LM head alone (not the final RMSNorm's scale), as the paper states.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from functools import partial
from typing import Any, Iterable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pktjax import lora as L
from pktjax.config import ModelConfig
from pktjax.data import IGNORE, Batch, Tokenized, iter_chunks, pad_left, bucket_length
from pktjax.errors import ConfigError, PairError
from pktjax.losses import mean_token_ce
from pktjax.model import LINEAR_NAMES, Adapter, LoraSpec, forward_modules
from pktjax.settings import COMPARES, FRAMES, SEMALIGN_MODES as MODES, SEMALIGN_TARGETS as DEFAULT_TARGETS
from pktjax.settings import semalign_lr as default_lr  # the paper's rate: 3e-5 for HumanEval, else 3e-4

Params = dict[str, Any]
# compare -> the forward outputs summed (pktjax.model.forward's modules)
COMPARE = dict(zip(COMPARES, (("down_proj",), ("o_proj", "down_proj"), ("output",))))
_HI = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------ attribution

def response_positions(labels: jax.Array) -> jax.Array:
    """``labels [B, T]`` -> ``[B, T]`` bool: the positions whose next token is a response token (not ``IGNORE``)."""
    nxt = labels[:, 1:] != IGNORE
    return jnp.concatenate([nxt, jnp.zeros_like(nxt[:, :1])], axis=1)


@partial(jax.jit, static_argnums=1)
def _attribution_batch(params: Params, cfg: ModelConfig, ids: jax.Array, mask: jax.Array,
                       labels: jax.Array) -> jax.Array:
    """``Σ |h ⊙ ∂L/∂h|`` per layer ``[L]`` for ``ids, mask, labels [B, T]``; ``L`` = the sum of each row's mean
    response-token CE, so row ``b``'s activations get row ``b``'s own gradient."""
    def loss(shifts):
        logits, outs = forward_modules(params, cfg, ids, mask, modules=("output",), shifts=shifts)
        return mean_token_ce(logits, labels).sum(), outs["output"]

    shifts = jnp.zeros((cfg.num_layers, *ids.shape, cfg.hidden_size), jnp.float32)
    grads, h = jax.grad(loss, has_aux=True)(shifts)
    where = response_positions(labels)[None, :, :, None]
    return jnp.sum(jnp.where(where, jnp.abs(h.astype(jnp.float32) * grads), 0.0), axis=(1, 2, 3))


def layer_attribution(params: Params, cfg: ModelConfig, batches: Iterable[Batch]) -> np.ndarray:
    """Layer Gradient × Activation of every layer: ``[L]`` float64, ``Σ_examples Σ_positions Σ_i |h_ℓ ⊙ ∂L/∂h_ℓ|``
    with ``h_ℓ [T, d]`` layer ``ℓ``'s residual output, ``L`` the example's mean response-token cross-entropy and
    the positions those of :func:`response_positions`. ``batches``: e.g.
    :func:`pktjax.sensitivity.seed_batches` (Seeking tokenization)."""
    total = np.zeros(cfg.num_layers, np.float64)
    for b in batches:
        chex.assert_equal_shape([b.ids, b.mask, b.labels])
        total += np.asarray(_attribution_batch(params, cfg, jnp.asarray(b.ids), jnp.asarray(b.mask),
                                               jnp.asarray(b.labels)), np.float64)
    return total


def critical_layer(scores: Sequence[float]) -> int:
    """The critical teacher layer ``ℓ*_T``: the top attribution score, counted from 1 (ties: the lower layer)."""
    return int(np.argmax(np.asarray(scores))) + 1


# ------------------------------------------------------------------------------------------------ pairing

@dataclasses.dataclass(frozen=True)
class Pairing:
    """The depth-aware pairing, layers counted from 1: ``schedule[k-1] = ℓ^T_k`` for ``k = 1..L_S``, the critical
    teacher layer, the student layer ``k†`` and the teacher interpolation ``(1 − lam) h^(a) + lam h^(b)``."""

    critical: int
    schedule: tuple[int, ...]
    student_layer: int
    a: int
    b: int
    lam: float

    @property
    def student_index(self) -> int:
        """``k† − 1``: the student layer as an index into the stacked parameters."""
        return self.student_layer - 1

    @property
    def teacher_indices(self) -> tuple[int, int]:
        return self.a - 1, self.b - 1


def interpolation(student_layer: int, n_teacher: int, n_student: int) -> tuple[int, int, float]:
    """``(a, b, λ)`` for student layer ``k`` (from 1): ``u = L_T k / L_S`` (exact, as a fraction),
    ``a = max(1, min(⌊u⌋, L_T − 1))``, ``b = a + 1``, ``λ = clip(u − a, 0, 1)``."""
    if n_teacher < 2:
        raise PairError(f"the teacher has {n_teacher} layer(s); SemAlign interpolates between two teacher layers "
                        "and needs at least 2.")
    if not 1 <= student_layer <= n_student:
        raise ConfigError(f"student layer {student_layer} is outside 1..{n_student}.")
    u = Fraction(n_teacher * student_layer, n_student)
    a = max(1, min(math.floor(u), n_teacher - 1))
    return a, a + 1, float(min(max(u - a, 0), 1))


def pair_layers(critical: int, n_teacher: int, n_student: int, student_layer: int | None = None) -> Pairing:
    """The pairing for critical teacher layer ``ℓ*_T`` (from 1): ``ℓ^T_k = max(1, ⌊L_T k / L_S⌋)`` and
    ``k† = min{k : ℓ^T_k ≥ ℓ*_T}`` (``L_S`` when none), or ``student_layer`` when given."""
    if not 1 <= critical <= n_teacher:
        raise ConfigError(f"critical teacher layer {critical} is outside 1..{n_teacher}.")
    schedule = tuple(max(1, n_teacher * k // n_student) for k in range(1, n_student + 1))
    if student_layer is None:
        student_layer = next((k for k, t in enumerate(schedule, 1) if t >= critical), n_student)
    a, b, lam = interpolation(student_layer, n_teacher, n_student)
    return Pairing(critical=critical, schedule=schedule, student_layer=student_layer, a=a, b=b, lam=lam)


# ------------------------------------------------------------------------------------------------ semantic bases

def head_of(params: Params) -> jax.Array:
    """The LM head ``W [V, d]`` (the embedding when tied)."""
    return params["lm_head"] if "lm_head" in params else params["embed"]


def default_rcond(d: int) -> float:
    """Relative cut-off for ``W⁺``: ``√d · eps32``. Rounding the stored float32 weights moves ``W`` by at most
    ``eps32/2 · ‖W‖_F ≤ eps32/2 · √d · σ_max`` in spectral norm, so a singular value below ``√d · eps32 · σ_max``
    is indistinguishable from that noise and is treated as zero (as ``pinv`` cut-offs do)."""
    return math.sqrt(d) * float(np.finfo(np.float32).eps)


def _rows(w: Any, chunk: int) -> Iterable[tuple[slice, np.ndarray]]:
    """Row blocks of ``w [V, d]`` as float64 numpy (``[c, d]``)."""
    n = w.shape[0]
    for start in range(0, n, chunk):
        sl = slice(start, min(start + chunk, n))
        yield sl, np.asarray(jax.device_get(w[sl]), np.float64)


def gram_pinv(w: Any, rcond: float | None = None, chunk: int = 16384) -> np.ndarray:
    """``(WᵀW)⁺ [d, d]`` (float64) of ``w [V, d]``, so that ``W⁺ = (WᵀW)⁺ Wᵀ``.

    Numerics: the Gram is summed in float64 over row blocks (``[V, d]`` never needs a float64 copy) and
    eigen-decomposed (``eigh``); eigenvalues ``λ_i = σ_i²`` at or below ``(rcond · σ_max)²`` count as zero
    (:func:`default_rcond`). ``eigh`` in float64 resolves eigenvalues to about ``d · eps64 · λ_max``, which is
    ``≥ 100×`` below that cut-off for the default ``rcond``, so the squared condition number of the Gram costs no
    accuracy that float32 weights had."""
    d = w.shape[1]
    g = np.zeros((d, d), np.float64)
    for _, block in _rows(w, chunk):
        g += block.T @ block
    lam, q = np.linalg.eigh(g)
    cut = (default_rcond(d) if rcond is None else rcond) ** 2 * max(float(lam.max()), 0.0)
    inv = np.where(lam > cut, 1.0 / np.where(lam > cut, lam, 1.0), 0.0)
    return (q * inv) @ q.T


def _unit_columns(x: np.ndarray) -> np.ndarray:
    """Columns scaled to unit length (a zero column stays zero)."""
    n = np.linalg.norm(x, axis=0, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def head_pinv(w: Any, rcond: float | None = None, chunk: int = 16384) -> np.ndarray:
    """The pseudo-inverse ``W⁺ [d, V]`` (float32) of an LM head ``w [V, d]``, via :func:`gram_pinv` (each
    ``[d, c]`` block computed in float64, then rounded)."""
    gp = gram_pinv(w, rcond, chunk)
    out = np.empty((w.shape[1], w.shape[0]), np.float32)
    for sl, block in _rows(w, chunk):
        out[:, sl] = gp @ block.T
    return out


def semantic_bases(w: Any, rcond: float | None = None, chunk: int = 16384) -> np.ndarray:
    """``S [d, V]`` (float32): column ``v`` is ``s_v = W⁺ e_v / ‖W⁺ e_v‖`` for the LM head ``w [V, d]``.

    Memory: ``S`` itself is ``4 d V`` bytes (0.9 GB for d 1536, V 152k); :func:`alignment_map` needs only
    ``[d_S, d_T]`` and streams over the vocabulary instead."""
    gp = gram_pinv(w, rcond, chunk)
    out = np.empty((w.shape[1], w.shape[0]), np.float32)
    for sl, block in _rows(w, chunk):
        out[:, sl] = _unit_columns(gp @ block.T)
    return out


def check_shared_vocabulary(w_t: Any, w_s: Any) -> None:
    """Both heads must cover one vocabulary (the same ``V``, the rows standing for the same tokens)."""
    if w_t.shape[0] != w_s.shape[0]:
        raise PairError(f"the teacher's LM head has {w_t.shape[0]} vocabulary rows and the student's "
                        f"{w_s.shape[0]}: SemAlign's semantic bases need one shared vocabulary (the same "
                        "tokenizer); pick a pair from one model family.")


def alignment_map(w_t: Any, w_s: Any, frame: str = "paper", rcond: float | None = None,
                  chunk: int = 16384) -> np.ndarray:
    """The linear map ``M [d_S, d_T]`` (float32) with ``recompose(h) = M h / ‖h‖`` for heads ``w_t [V, d_T]``,
    ``w_s [V, d_S]``: ``S_S S_Tᵀ`` (``frame="paper"``) or ``(S_S S_Sᵀ)⁺ S_S S_Tᵀ`` (``"dual"``). Summed over
    vocabulary blocks in float64; neither ``S`` is ever held whole."""
    if frame not in FRAMES:
        raise ConfigError(f"unknown recomposition frame {frame!r}; choose from {', '.join(FRAMES)}.")
    check_shared_vocabulary(w_t, w_s)
    gt, gs = gram_pinv(w_t, rcond, chunk), gram_pinv(w_s, rcond, chunk)
    m = np.zeros((w_s.shape[1], w_t.shape[1]), np.float64)
    f = np.zeros((w_s.shape[1], w_s.shape[1]), np.float64)
    for (sl, bt), (_, bs) in zip(_rows(w_t, chunk), _rows(w_s, chunk)):
        st, ss = _unit_columns(gt @ bt.T), _unit_columns(gs @ bs.T)
        m += ss @ st.T
        if frame == "dual":
            f += ss @ ss.T
    if frame == "dual":
        m = np.linalg.pinv(f, hermitian=True) @ m
    return m.astype(np.float32)


def recompose(h_t: jax.Array, s_t: jax.Array, s_s: jax.Array) -> jax.Array:
    """The paper's decomposition and recomposition, literally: ``h_t [..., d_T]``, ``s_t [d_T, V]``,
    ``s_s [d_S, V]`` -> ``h*_S = S_S a [..., d_S]`` with ``a = S_Tᵀ h_t / ‖h_t‖ [..., V]`` (a zero ``h_t`` gives 0).
    Holds ``[..., V]``; training uses :func:`apply_map` with :func:`alignment_map` instead."""
    a = jnp.einsum("...d,dv->...v", _unit(h_t), s_t, precision=_HI)
    return jnp.einsum("...v,ev->...e", a, s_s, precision=_HI)


def apply_map(h_t: jax.Array, m: jax.Array) -> jax.Array:
    """``M h_t / ‖h_t‖``: ``h_t [..., d_T]``, ``m [d_S, d_T]`` -> ``[..., d_S]``."""
    return jnp.einsum("...d,ed->...e", _unit(h_t), m.astype(jnp.float32), precision=_HI)


def _unit(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    n = jnp.linalg.norm(x, axis=-1, keepdims=True)
    return x / jnp.where(n > 0, n, 1.0)


# ------------------------------------------------------------------------------------------------ loss

def _cos(x: jax.Array, y: jax.Array) -> jax.Array:
    """Cosine along the last axis (0 where either side is zero)."""
    num = jnp.sum(x * y, axis=-1)
    den = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def loss_sums(h: jax.Array, target: jax.Array, logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(Σ_t [(1 − cos(h_t, h*_t)) + (1 − cos(z_t, onehot(y_{t+1})))], n)`` over the response positions ``t``
    (:func:`response_positions`) of ``h, target [B, T, d_S]``, ``logits [B, T, V]``, ``labels [B, T]``; the mean
    ``sum / n`` is the SemAlign loss. ``cos(z, onehot(y)) = z_y / ‖z‖``."""
    chex.assert_equal_shape([h, target])
    where = response_positions(labels)
    h, target, z = h.astype(jnp.float32), target.astype(jnp.float32), logits.astype(jnp.float32)
    nxt = jnp.concatenate([labels[:, 1:], labels[:, :1]], axis=1)
    z_y = jnp.take_along_axis(z, jnp.where(where, nxt, 0)[..., None], axis=-1)[..., 0]
    zn = jnp.linalg.norm(z, axis=-1)
    cos_out = jnp.where(zn > 0, z_y / jnp.where(zn > 0, zn, 1.0), 0.0)
    per = (1.0 - _cos(h, target)) + (1.0 - cos_out)
    return jnp.sum(jnp.where(where, per, 0.0)), jnp.sum(where)


def loss(h: jax.Array, target: jax.Array, logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The SemAlign loss (mean over the response positions, see :func:`loss_sums`); 0 without any."""
    total, n = loss_sums(h, target, logits, labels)
    return total / jnp.maximum(n, 1)


def compared_output(outs: dict[str, jax.Array], compare: str) -> jax.Array:
    """The compared layer outputs ``[L, B, T, d]`` from :func:`pktjax.model.forward`'s ``modules=COMPARE[compare]``."""
    return sum(outs[m] for m in COMPARE[compare])


# ------------------------------------------------------------------------------------------------ the trainable layer

@dataclasses.dataclass(frozen=True)
class SemAlignConfig:
    """SemAlign's own settings (the optimizer and batching come from :class:`pktjax.lora_train.TrainConfig`).

    ``mode``: ``"lora"`` (a LoRA of ``TrainConfig.rank`` on ``targets`` of layer ``k†``) or ``"weights"`` (the
    ``targets`` matrices of layer ``k†`` themselves). ``compare``, ``frame``: see the module docstring.
    ``layer``: the student layer ``k†`` (from 1) instead of the attribution's. ``samples``: seed examples for the
    attribution."""

    mode: str = "lora"
    targets: tuple[str, ...] = DEFAULT_TARGETS
    compare: str = "ffn"
    frame: str = "paper"
    layer: int | None = None
    samples: int = 32

    def validate(self, n_student_layers: int | None = None) -> None:
        bad = [msg for ok, msg in (
            (self.mode in MODES, f"mode {self.mode!r}: choose {' or '.join(MODES)}"),
            (self.compare in COMPARE, f"compare {self.compare!r}: choose from {', '.join(COMPARE)}"),
            (self.frame in FRAMES, f"frame {self.frame!r}: choose {' or '.join(FRAMES)}"),
            (bool(self.targets) and all(t in LINEAR_NAMES for t in self.targets),
             f"targets {list(self.targets)}: name one or more of {', '.join(LINEAR_NAMES)}"),
            (self.samples >= 1, "samples must be at least 1"),
            (self.layer is None or self.layer >= 1, "layer counts from 1"),
            (self.layer is None or n_student_layers is None or self.layer <= n_student_layers,
             f"layer {self.layer} is beyond the student's {n_student_layers} layers")) if not ok]
        if bad:
            raise ConfigError(f"bad SemAlign config: {'; '.join(bad)}.")


def init_trainable(params: Params, cfg: ModelConfig, layer: int, sc: SemAlignConfig, rank: int, alpha: float,
                   seed: int) -> Params:
    """The trained part of student layer ``layer`` (0-based), float32: ``{"layers": {t: {"a": [r, in],
    "b": [out, r]}}}`` (PEFT's standard init, the slice of :func:`pktjax.lora.init`'s) or ``{"layers": {t: [out,
    in]}}`` (the layer's own weights)."""
    if sc.mode == "weights":
        return {"layers": {t: params["layers"][t][layer].astype(jnp.float32) for t in sc.targets}}
    _, full = L.init(params, cfg, rank, alpha, sc.targets, "default", key=jax.random.key(seed))
    return {"layers": {t: {k: v[layer] for k, v in ab.items()} for t, ab in full["layers"].items()}}


def layer_lora(trainable: Params, n_layers: int, layer: int) -> Params:
    """A stacked LoRA ``[L, ...]`` that is ``trainable``'s factors at ``layer`` and zero elsewhere."""
    return {"layers": {t: {k: jnp.zeros((n_layers, *v.shape), v.dtype).at[layer].set(v) for k, v in ab.items()}
                       for t, ab in trainable["layers"].items()}}


def with_trainable(base: Params, trainable: Params, layer: int, mode: str) -> tuple[Params, Params | None]:
    """``(params, lora)`` for the forward: LoRA mode keeps ``base`` and adds :func:`layer_lora`; weights mode
    puts the trained matrices into layer ``layer`` of ``base``."""
    if mode == "lora":
        n = jax.tree.leaves(base["layers"])[0].shape[0]
        return base, layer_lora(trainable, n, layer)
    stacked = {t: jnp.asarray(base["layers"][t]).at[layer].set(jnp.asarray(w, base["layers"][t].dtype))
               for t, w in trainable["layers"].items()}
    return {**base, "layers": {**base["layers"], **stacked}}, None


@dataclasses.dataclass(frozen=True)
class Objective:
    """The SemAlign loss of a micro-batch as a :func:`pktjax.lora_train.fit` objective: ``batch = (ids, mask,
    labels [B, T], target [B, T, d_S])``; the student's ``compare`` output of layer ``layer`` (0-based) against
    ``target``, plus the output term. Returns ``(loss sum, positions)``."""

    layer: int
    mode: str
    compare: str

    def __call__(self, trainable: Params, base: Params, cfg: ModelConfig, batch: tuple[jax.Array, ...],
                 spec: LoraSpec) -> tuple[jax.Array, jax.Array]:
        ids, mask, labels, target = batch
        params, lora = with_trainable(base, trainable, self.layer, self.mode)
        logits, outs = forward_modules(params, cfg, ids, mask, modules=COMPARE[self.compare],
                                       adapter=Adapter(lora, spec))
        return loss_sums(compared_output(outs, self.compare)[self.layer], target, logits, labels)


@partial(jax.jit, static_argnums=(1, 4))
def _teacher_target(params: Params, cfg: ModelConfig, ids: jax.Array, mask: jax.Array, compare: str,
                    ia: jax.Array, ib: jax.Array, lam: jax.Array, m: jax.Array) -> jax.Array:
    """``M h̃ / ‖h̃‖ [B, T, d_S]``, ``h̃ = (1 − lam) h^(ia) + lam h^(ib)`` of the teacher's compared outputs."""
    _, outs = forward_modules(params, cfg, ids, mask, modules=COMPARE[compare])
    h = compared_output(outs, compare).astype(jnp.float32)
    return apply_map((1.0 - lam) * h[ia] + lam * h[ib], m)


def teacher_targets(params: Params, cfg: ModelConfig, items: Sequence[Tokenized], pairing: Pairing,
                    m: np.ndarray, compare: str, *, pad_id: int, micro_batch: int = 8,
                    bucket: int = 64) -> list[np.ndarray]:
    """The recomposed teacher targets ``h*_S [T_i, d_S]`` (float32 numpy) of every item, at every position.

    Items go through the teacher in a fixed order (sorted by length), so a rerun gives the same arrays."""
    ia, ib = (jnp.int32(i) for i in pairing.teacher_indices)
    lam, mj = jnp.float32(pairing.lam), jnp.asarray(m)
    out: list[np.ndarray | None] = [None] * len(items)
    order = sorted(range(len(items)), key=lambda i: (len(items[i].ids), i))
    for chunk in iter_chunks(order, micro_batch):
        group = [items[i] for i in chunk]
        b = pad_left(group, pad_id, bucket_length(max(len(t.ids) for t in group), bucket))
        tgt = np.asarray(_teacher_target(params, cfg, jnp.asarray(b.ids), jnp.asarray(b.mask), compare, ia, ib,
                                         lam, mj))
        for row, i in enumerate(chunk):
            out[i] = tgt[row, tgt.shape[1] - len(items[i].ids):]
    return out  # type: ignore[return-value]


def merged_params(params: Params, trainable: Params, layer: int, sc: SemAlignConfig, scale: float) -> Params:
    """The student's parameters with the trained layer in place (a LoRA merged with ``scale``; the tied head
    stays tied since only layer matrices change)."""
    if sc.mode == "lora":
        n = jax.tree.leaves(params["layers"])[0].shape[0]
        return L.merge(params, layer_lora(trainable, n, layer), scale)
    return with_trainable(params, trainable, layer, "weights")[0]
