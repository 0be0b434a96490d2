"""Numerical agreement between the baseline's and pktjax's outputs of each stage (pktjax is the reference)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _leaves(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}{k}/"))
        return out
    return {prefix.rstrip("/"): np.asarray(tree, np.float64)}


def max_diffs(ours: Any, ref: Any) -> tuple[float, float]:
    """``(max |a - b|, max over leaves of max |a - b| / max |b|)`` over matching leaves of two trees."""
    a, b = _leaves(ours), _leaves(ref)
    if a.keys() != b.keys():
        raise ValueError(f"outputs differ in structure: {sorted(a.keys() ^ b.keys())}")
    abs_d = rel_d = 0.0
    for k in b:
        if a[k].shape != b[k].shape:
            raise ValueError(f"{k}: shape {a[k].shape} vs {b[k].shape}")
        d = float(np.max(np.abs(a[k] - b[k]), initial=0.0))
        abs_d = max(abs_d, d)
        rel_d = max(rel_d, d / max(float(np.max(np.abs(b[k]), initial=0.0)), 1e-30))
    return abs_d, rel_d


def _pairs(layers: np.ndarray, neurons: np.ndarray) -> set[tuple[int, int]]:
    return {(int(l), int(n)) for l, row in zip(layers, neurons) for n in row}


def selection_agreement(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, Any]:
    """Identical arrays, the fraction of selected layers and (layer, neuron) pairs both sides chose, and, where the
    layers agree, in how many slots of the ``[n_layers, k]`` neuron lists (descending score order) the neuron
    differs: the same neurons in another order means near-equal scores swapped places."""
    same = all(np.array_equal(ours[k], ref[k]) for k in ref)
    out = {"identical": bool(same)}
    for kind in ("ffn", "attn"):
        lo, lr = ours[f"{kind}_layers"], ref[f"{kind}_layers"]
        no, nr = ours[f"{kind}_neurons"], ref[f"{kind}_neurons"]
        out[f"{kind}_layer_overlap"] = len(set(lo.tolist()) & set(lr.tolist())) / len(lr)
        pr = _pairs(lr, nr)
        out[f"{kind}_neuron_overlap"] = len(_pairs(lo, no) & pr) / len(pr)
        if np.array_equal(lo, lr) and no.shape == nr.shape:
            out[f"{kind}_slots_differ"] = int(np.sum(no != nr))
    return out


def _updates(result: dict[str, Any], initial: Any) -> dict[str, np.ndarray]:
    after, before = _leaves(result["params"]), _leaves(initial)
    return {k: after[k] - before[k] for k in before}


def step_agreement(ours: dict[str, Any], ref: dict[str, Any], initial: Any) -> dict[str, float]:
    """Loss, gradient (the one the optimizer applies) and parameter-update differences of one training step from
    the same start. Adam's first step is ``lr g / (|g| + eps)``: where ``|g|`` is near ``eps`` a rounding-level
    gradient difference moves the update by up to ``2 lr``, so the update's relative difference can be far above
    the gradient's (the tests check the optimizers apart, on one gradient)."""
    upd_abs, upd_rel = max_diffs(_updates(ours, initial), _updates(ref, initial))
    grad_abs, grad_rel = max_diffs(ours["grads"], ref["grads"])
    return {"loss_abs_diff": abs(ours["loss"] - ref["loss"]),
            "loss_rel_diff": abs(ours["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30),
            "grad_max_abs_diff": grad_abs, "grad_max_rel_diff": grad_rel,
            "update_max_abs_diff": upd_abs, "update_max_rel_diff": upd_rel}


def _float64_fields(torch_out: dict[str, Any], jax_out: dict[str, Any], out: dict[str, dict[str, Any]]) -> None:
    """How far each side's scores and selections are from the float64 recomputation."""
    for i, model in enumerate(("teacher", "student")):
        ref = torch_out["float64"][model]
        stage = f"attribution_{model}"
        for side, res in (("pktjax", jax_out), ("torch", torch_out)):
            a, r = max_diffs(res[stage], ref["scores"])
            out[stage].update({f"{side}_vs_float64_max_abs": a, f"{side}_vs_float64_max_rel": r})
            out["select"][model][f"{side}_matches_float64"] = selection_agreement(res["select"][i],
                                                                                  ref["picked"])["identical"]


def agreement(torch_out: dict[str, Any], jax_out: dict[str, Any], work) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for stage in ("attribution_teacher", "attribution_student"):
        a, r = max_diffs(torch_out[stage], jax_out[stage])
        out[stage] = {"scores_max_abs_diff": a, "scores_max_rel_diff": r}
    sel = [selection_agreement(t, j) for t, j in zip(torch_out["select"], jax_out["select"])]
    out["select"] = {"selection_identical": sel[0]["identical"] and sel[1]["identical"],
                     "teacher": sel[0], "student": sel[1]}
    if torch_out.get("float64"):
        _float64_fields(torch_out, jax_out, out)
    out["extract"] = {"knowledge_max_abs_diff": max_diffs(torch_out["extract"], jax_out["extract"])[0]}
    for stage in ("aligner_step", "aligner_step_weights"):
        out[stage] = step_agreement(torch_out[stage], jax_out[stage], work.aligner)
    out["lora_step"] = step_agreement(torch_out["lora_step"], jax_out["lora_step"], work.lora)
    return out
