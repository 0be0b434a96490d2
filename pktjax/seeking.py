"""Seeking Neural Nuggets (Post-Align PKT, SPEC §4): choose teacher layers by sensitivity, cut the most sensitive
contiguous sub-matrix of the student's shape out of every adapted teacher matrix, and factor it by SVD into a LoRA
initialisation for the student.

Sub-matrices are searched with a summed-area table: every window sum at once, instead of a loop over positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pktjax.checkpoint import Model
from pktjax.config import ModelConfig
from pktjax.data import SEEKING_TASKS, seeking_file
from pktjax.errors import PairError
from pktjax.lora import (LINEAR_NAMES, TARGETS, TOP_TARGETS, LoRA, check_rank, check_targets, set_factors,
                         svd_factors, target_shape, tie_head, top_key, weight)
from pktjax.sensitivity import seed_batches, sensitivity

Params = dict[str, Any]


def task_file(task: str, kind: str) -> Path:
    """A Seeking task name (gsm, mmlu, super_ni, lima) -> its shared file (``kind``: sample | train); else a path."""
    return seeking_file(task, kind) if task in SEEKING_TASKS else Path(task).expanduser()


def layer_scores(sens: Params) -> np.ndarray:
    """Per-layer sum of every sensitivity under ``sens["layers"]`` (norms and biases included): ``[L]`` float64."""
    totals = [np.asarray(jnp.sum(x.reshape(x.shape[0], -1), axis=1, dtype=jnp.float32), np.float64)
              for x in jax.tree.leaves(sens["layers"])]
    return np.sum(totals, axis=0)


def select_layers(sens: Params, n_layers: int) -> list[int]:
    """The ``n_layers`` layers of largest total sensitivity (ties: lower index), in ascending index order."""
    scores = layer_scores(sens)
    if not 1 <= n_layers <= len(scores):
        raise PairError(f"cannot keep {n_layers} layers of a teacher with {len(scores)}: the teacher needs at least "
                        "as many layers as the student.")
    order = np.argsort(-scores, kind="stable")
    return sorted(int(i) for i in order[:n_layers])


def window_sums(m: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Sums of every ``rows x cols`` window of ``m [R, C]``: ``[R - rows + 1, C - cols + 1]`` (float64).

    From the summed-area table ``S[i, j] = Σ m[:i, :j]``: window ``(i, j)`` sums to
    ``S[i+rows, j+cols] - S[i, j+cols] - S[i+rows, j] + S[i, j]``. A full-height or full-width window first
    reduces that axis, so embedding-sized matrices never need a 2-D table.
    """
    m = np.asarray(m)
    chex.assert_rank(m, 2)
    if rows == m.shape[0]:
        m = m.sum(axis=0, dtype=np.float64, keepdims=True)
        rows = 1
    if cols == m.shape[1]:
        m = m.sum(axis=1, dtype=np.float64, keepdims=True)
        cols = 1
    table = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.float64)
    np.cumsum(np.cumsum(m, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
    r, c = m.shape[0] - rows + 1, m.shape[1] - cols + 1
    return table[rows:, cols:] - table[:r, cols:] - table[rows:, :c] + table[:r, :c]


def max_submatrix(sens_matrix: Any, rows: int, cols: int) -> tuple[int, int]:
    """``(top, left)`` of the contiguous ``rows x cols`` window of ``sens_matrix [R, C]`` with the largest sum;
    the first maximum in row-major order of the top-left corner.

    Window sums come from a float64 summed-area table, whose differences carry rounding errors up to about
    ``4 (R + C) eps Σ|m|``; windows within that of the maximum count as ties, so equal sums (a constant matrix,
    say) still pick the first window.
    """
    m = np.asarray(jax.device_get(sens_matrix))
    chex.assert_rank(m, 2)
    if not (1 <= rows <= m.shape[0] and 1 <= cols <= m.shape[1]):
        raise PairError(f"a {rows} x {cols} window does not fit a {m.shape[0]} x {m.shape[1]} matrix: the teacher "
                        "must be at least as large as the student in every dimension.")
    sums = window_sums(m, rows, cols)
    tol = 4.0 * (m.shape[0] + m.shape[1]) * np.finfo(np.float64).eps * float(np.abs(m).sum(dtype=np.float64))
    flat = int(np.argmax(sums.ravel() >= sums.max() - tol))
    top, left = divmod(flat, sums.shape[1])
    return int(top), int(left)


def check_seeking_pair(teacher_cfg: ModelConfig, student_cfg: ModelConfig, targets: Iterable[str]) -> None:
    """Seeking's pair rules: one model family and vocabulary, a teacher at least as large in every target."""
    if teacher_cfg.model_type != student_cfg.model_type or teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise PairError(f"teacher ({teacher_cfg.model_type}, vocabulary {teacher_cfg.vocab_size}) and student "
                        f"({student_cfg.model_type}, vocabulary {student_cfg.vocab_size}) must come from one family "
                        "and share the vocabulary.")
    if teacher_cfg.num_layers < student_cfg.num_layers:
        raise PairError(f"the teacher has {teacher_cfg.num_layers} layers, fewer than the student's "
                        f"{student_cfg.num_layers}.")
    for t in targets:
        (to, ti), (so, si) = target_shape(teacher_cfg, t), target_shape(student_cfg, t)
        if to < so or ti < si:
            raise PairError(f"the teacher's {t} [{to}, {ti}] is narrower than the student's [{so}, {si}]; Seeking "
                            "needs a teacher at least as large as the student in every dimension.")


def plan(sens: Params, teacher_cfg: ModelConfig, student_cfg: ModelConfig,
         targets: Iterable[str] = TARGETS) -> dict[str, Any]:
    """Where to cut: ``{"layers": [L_S teacher layers], "windows": {target: [(top, left), ...]}}`` (one window per
    selected layer for q..down, one for embed_tokens / lm_head), in LoRA orientation (:func:`pktjax.lora.weight`)."""
    targets = check_targets(targets)
    check_seeking_pair(teacher_cfg, student_cfg, targets)
    layers = select_layers(sens, student_cfg.num_layers)
    windows = {}
    for t in targets:
        s, (rows, cols) = weight(sens, t), target_shape(student_cfg, t)
        mats = [s[i] for i in layers] if t in LINEAR_NAMES else [s]
        windows[t] = [max_submatrix(x, rows, cols) for x in mats]
    return {"layers": layers, "windows": windows}


def extract_matrices(teacher_params: Params, student_cfg: ModelConfig, cut: dict[str, Any]) -> dict[str, jax.Array]:
    """The teacher sub-matrices a :func:`plan` names: ``[L_S, out_S, in_S]`` per layer target, ``[out_S, in_S]``
    for embed_tokens (``[d_S, V]``) and lm_head (``[V, d_S]``)."""
    out = {}
    for t, corners in cut["windows"].items():
        rows, cols = target_shape(student_cfg, t)
        w = weight(teacher_params, t)
        mats = [w[i] for i in cut["layers"]] if t in LINEAR_NAMES else [w]
        subs = [m[top:top + rows, left:left + cols] for m, (top, left) in zip(mats, corners)]
        out[t] = jnp.stack(subs) if t in LINEAR_NAMES else subs[0]
    return out


def extract_lora(teacher: Model, student_cfg: ModelConfig, sens: Params, rank: int, *,
                 targets: Iterable[str] = TARGETS, cut: dict[str, Any] | None = None) -> LoRA:
    """Seeking's extracted LoRA for the student: per target ``b = U_r Σ_r``, ``a = V_rᵀ`` of the teacher's most
    sensitive sub-matrix (``b @ a`` approximates it). ``sens``: :func:`pktjax.sensitivity` of the teacher.

    The ``i``-th selected teacher layer feeds student layer ``i``. A student with tied embeddings gets head
    factors equal to its embedding factors (:func:`pktjax.lora.tie_head`), so the shared matrix has one update.
    """
    targets = check_targets(targets)
    check_rank(student_cfg, targets, rank)
    cut = cut or plan(sens, teacher.config, student_cfg, targets)
    cut = {"layers": cut["layers"], "windows": {t: cut["windows"][t] for t in targets}}
    lora: LoRA = {}
    for t, m in extract_matrices(teacher.params, student_cfg, cut).items():
        b, a = svd_factors(m, rank)
        lora = set_factors(lora, t, {"a": a, "b": b})
    if student_cfg.tie_word_embeddings and {"embed_tokens", "lm_head"} <= set(targets):
        lora = tie_head(lora)
    return lora


def top_keys(params: Params, targets: Iterable[str]) -> set[str]:
    """The entries outside ``params["layers"]`` that :func:`pktjax.lora.weight` reads for ``targets``."""
    return {top_key(params, t) for t in targets if t in TOP_TARGETS}


def extract_for_examples(teacher: Model, student_cfg: ModelConfig, tokenizer, examples: list[dict[str, Any]],
                         rank: int, *, targets: Iterable[str] = TARGETS,
                         cutoff_len: int = 2048) -> tuple[LoRA, dict[str, Any]]:
    """The whole extraction from seed examples: sensitivity on the teacher, plan, SVD. Returns ``(lora, plan)``."""
    targets = check_targets(targets)
    sens = sensitivity(teacher.params, teacher.config, seed_batches(tokenizer, examples, cutoff_len),
                       top=top_keys(teacher.params, targets))
    cut = plan(sens, teacher.config, student_cfg, targets)
    return extract_lora(teacher, student_cfg, sens, rank, targets=targets, cut=cut), cut
