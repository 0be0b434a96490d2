"""LoRA adapters as parameter pytrees: initialisation (standard, PiSSA, Seeking), the forward, merging, and PEFT files.

A LoRA pytree mirrors the model's parameters (``[out, in]`` as in Hugging Face, layers stacked on ``L``)::

    lora = {
      "layers":  {"q_proj": {"a": [L, r, in], "b": [L, out, r]}, ...},   # any of q/k/v/o/gate/up/down
      "embed":   {"a": [r, V], "b": [d, r]},                             # target "embed_tokens"
      "lm_head": {"a": [r, d], "b": [V, r]},
    }

Every adapted weight ``W`` is read in *LoRA orientation* ``[out, in]`` so that its update is ``scale * b @ a``;
for the embedding (``[V, d]``) that orientation is its transpose ``[d, V]``, which is PEFT's convention
(``lora_embedding_A [r, V]``, ``lora_embedding_B [d, r]``). ``scale = alpha / r``.

With tied embeddings the embedding and the output head share one matrix: an initialisation that changes the
base weights (PiSSA, Seeking) needs identical updates on both uses (then the shared matrix is corrected once),
and :func:`merge` unties the two (the merged model gets its own ``lm_head``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pktjax.checkpoint import Model, hf_layer_name, layer_shapes
from pktjax.config import ModelConfig
from pktjax.errors import CheckpointError, ConfigError
from pktjax.model import LINEAR_NAMES, Adapter, LoraSpec, forward
from pktjax.runfolder import atomic_folder
from pktjax.safetensors_io import SafetensorsFile, write_safetensors

LoRA = dict[str, Any]
Params = dict[str, Any]
TOP_TARGETS = ("embed_tokens", "lm_head")
TARGETS = LINEAR_NAMES + TOP_TARGETS
METHODS = ("default", "pissa", "seeking")
_TOP_KEY = {"embed_tokens": "embed", "lm_head": "lm_head"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ----------------------------------------------------------------------------------------------- targets and views

def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Validate target module names (PEFT's: q_proj ... down_proj, embed_tokens, lm_head); canonical order."""
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ConfigError(f"unknown LoRA target module(s) {', '.join(map(repr, unknown))}; "
                          f"choose from {', '.join(TARGETS)}.")
    if not targets:
        raise ConfigError(f"no LoRA target modules given; choose from {', '.join(TARGETS)}.")
    return tuple(t for t in TARGETS if t in targets)


def targets_of(lora: LoRA) -> tuple[str, ...]:
    """The target names a LoRA pytree covers, in canonical order."""
    present = set(lora.get("layers", {})) | {t for t, k in _TOP_KEY.items() if k in lora}
    return tuple(t for t in TARGETS if t in present)


def factors(lora: LoRA, target: str) -> dict[str, jax.Array]:
    """``{"a", "b"}`` of one target."""
    return lora["layers"][target] if target in LINEAR_NAMES else lora[_TOP_KEY[target]]


def set_factors(lora: LoRA, target: str, ab: dict[str, jax.Array]) -> LoRA:
    if target in LINEAR_NAMES:
        return {**lora, "layers": {**lora.get("layers", {}), target: ab}}
    return {**lora, _TOP_KEY[target]: ab}


def target_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """``(out, in)`` of a target in LoRA orientation (per layer for q..down)."""
    if target in LINEAR_NAMES:
        return layer_shapes(cfg)[target]
    if target == "embed_tokens":
        return cfg.hidden_size, cfg.vocab_size
    return cfg.vocab_size, cfg.hidden_size


def top_key(params: Params, target: str) -> str:
    """The entry outside ``params["layers"]`` that holds ``embed_tokens`` or ``lm_head`` (the embedding when tied)."""
    return "lm_head" if target == "lm_head" and "lm_head" in params else "embed"


def weight(params: Params, target: str) -> jax.Array:
    """A target's weight in LoRA orientation: ``[L, out, in]`` for layers, ``[d, V]`` (embedding transposed),
    ``[V, d]`` for the head (the embedding when tied). Works on any pytree shaped like the parameters."""
    if target in LINEAR_NAMES:
        return params["layers"][target]
    w = params[top_key(params, target)]
    return w.T if target == "embed_tokens" else w


def with_weight(params: Params, target: str, w: jax.Array) -> Params:
    """Inverse of :func:`weight`: a new params pytree with the target's weight replaced."""
    if target in LINEAR_NAMES:
        return {**params, "layers": {**params["layers"], target: w}}
    return {**params, top_key(params, target): w.T if target == "embed_tokens" else w}


def check_rank(cfg: ModelConfig, targets: Sequence[str], rank: int) -> None:
    """A rank must be positive and no larger than either dimension of every target matrix."""
    for t in targets:
        out, inp = target_shape(cfg, t)
        if not 1 <= rank <= min(out, inp):
            raise ConfigError(f"LoRA rank {rank} does not fit {t} of shape [{out}, {inp}]; "
                              f"choose a rank between 1 and {min(out, inp)}.")


def scale_of(alpha: float, rank: int) -> float:
    """PEFT's ``scaling = lora_alpha / r``."""
    return float(alpha) / float(rank)


def delta(lora: LoRA, target: str, scale: float) -> jax.Array:
    """``scale * b @ a``: the update of a target in LoRA orientation (``[L, out, in]`` or ``[out, in]``)."""
    ab = factors(lora, target)
    return scale * jnp.einsum("...or,...ri->...oi", ab["b"], ab["a"], precision=jax.lax.Precision.HIGHEST)


def tie_head(lora: LoRA) -> LoRA:
    """Head factors equal to the embedding's (``a_h = b_eᵀ``, ``b_h = a_eᵀ``): the same ``[V, d]`` update on both
    uses of a tied matrix."""
    e = lora["embed"]
    return {**lora, "lm_head": {"a": e["b"].T, "b": e["a"].T}}


# ------------------------------------------------------------------------------------------------ initialisation

def svd_factors(m: jax.Array, rank: int, split: bool = False) -> tuple[jax.Array, jax.Array]:
    """Rank-``r`` SVD factors of ``m [..., out, in]``: ``(b [..., out, r], a [..., r, in])``.

    ``split=False``: ``b = U_r Σ_r``, ``a = V_rᵀ`` (Seeking). ``split=True``: ``b = U_r Σ_r^½``, ``a = Σ_r^½ V_rᵀ``
    (PiSSA). Computed in float32 at the highest precision.
    """
    chex.assert_rank(m, {2, 3})
    # One SVD at a time: two LAPACK SVDs dispatched concurrently on the CPU backend can deadlock (seen with
    # jaxlib 0.10 on the Qwen2.5-0.5B shapes), so wait for each before the caller dispatches the next.
    return jax.block_until_ready(_svd_factors(m.astype(jnp.float32), rank, split))


@jax.jit
def _svd(m: jax.Array):
    return jnp.linalg.svd(m, full_matrices=False)


def _svd_factors(m, rank, split):
    u, s, vt = _svd(m)
    u, s, vt = u[..., :rank], s[..., :rank], vt[..., :rank, :]
    if split:
        root = jnp.sqrt(s)
        return u * root[..., None, :], root[..., :, None] * vt
    return u * s[..., None, :], vt


def _pissa_factors(params: Params, target: str, rank: int, scale: float) -> dict[str, jax.Array]:
    """PiSSA from the model's own weight, as PEFT computes it: the singular values are divided by ``scale`` first,
    so that ``scale * b @ a`` is exactly the rank-``r`` principal part ``U_r Σ_r V_rᵀ``."""
    b, a = svd_factors(weight(params, target) / scale, rank, split=True)
    return {"a": a, "b": b}


def init(student_params: Params, cfg: ModelConfig, rank: int, alpha: float, targets: Iterable[str] = TARGETS,
         method: str = "default", *, key: jax.Array | None = None,
         teacher_lora: LoRA | None = None) -> tuple[Params, LoRA]:
    """A LoRA for the student and the base weights it trains on: ``(base_params, lora)``.

    ``default``: PEFT's standard init (the base is the student). ``pissa``: factors from the student's own
    weights (:func:`_pissa_factors`). ``seeking``: the factors ``teacher_lora`` extracted from a teacher
    (:func:`pktjax.seeking.extract_lora`). For ``pissa``/``seeking`` the base becomes ``W - scale * b @ a`` with
    ``scale = alpha / rank``, so ``apply(base, lora)`` equals the student's forward before training.
    """
    targets = check_targets(targets)
    if method not in METHODS:
        raise ConfigError(f"unknown LoRA init {method!r}; choose from {', '.join(METHODS)}.")
    check_rank(cfg, targets, rank)
    scale = scale_of(alpha, rank)
    if method == "default":
        shapes = tuple((t, tuple(weight(student_params, t).shape)) for t in targets)
        return student_params, _default_lora(jax.random.key(0) if key is None else key, shapes, rank)
    if method == "pissa":
        lora = _pissa_lora(student_params, targets, rank, scale)
        if cfg.tie_word_embeddings and "embed_tokens" in targets:
            lora = tie_head(lora)
    else:
        lora = _teacher_subset(teacher_lora, cfg, targets, rank)
    return residual(student_params, lora, scale), lora


@partial(jax.jit, static_argnums=(1, 2))
def _default_lora(key: jax.Array, shapes: tuple[tuple[str, tuple[int, ...]], ...], rank: int) -> LoRA:
    """PEFT's standard init. Linear: ``a`` Kaiming-uniform with ``a=sqrt(5)`` (bound ``1/sqrt(in)``), ``b = 0``.
    Embedding: ``a = 0``, ``b ~ N(0, 1)``. One uniform and one normal draw, sliced per target."""
    sizes = [(t, (*lead, rank, inp), (*lead, out, rank)) for t, (*lead, out, inp) in shapes]
    linear = [(t, a, b) for t, a, b in sizes if t != "embed_tokens"]
    u = jax.random.uniform(jax.random.fold_in(key, 0), (sum(math.prod(a) for _, a, _ in linear),), jnp.float32, -1, 1)
    lora: LoRA = {}
    offset = 0
    for t, a, b in linear:
        n = math.prod(a)
        ab = {"a": u[offset:offset + n].reshape(a) / math.sqrt(a[-1]), "b": jnp.zeros(b, jnp.float32)}
        lora, offset = set_factors(lora, t, ab), offset + n
    for t, a, b in sizes:
        if t == "embed_tokens":
            lora = set_factors(lora, t, {"a": jnp.zeros(a, jnp.float32),
                                         "b": jax.random.normal(jax.random.fold_in(key, 1), b, jnp.float32)})
    return lora


def _pissa_lora(params: Params, targets: tuple[str, ...], rank: int, scale: float) -> LoRA:
    # not jitted: inside one traced computation the per-target SVDs could run concurrently (see svd_factors)
    lora: LoRA = {}
    for t in targets:
        lora = set_factors(lora, t, _pissa_factors(params, t, rank, scale))
    return lora


def _teacher_subset(teacher_lora: LoRA | None, cfg: ModelConfig, targets: Sequence[str], rank: int) -> LoRA:
    if teacher_lora is None:
        raise ConfigError("the seeking initialisation needs teacher_lora (from pktjax.seeking.extract_lora).")
    missing = [t for t in targets if t not in targets_of(teacher_lora)]
    if missing:
        raise ConfigError(f"the extracted teacher LoRA has no factors for {', '.join(missing)}; extract them or "
                          "drop them from the targets.")
    lora: LoRA = {}
    for t in targets:
        ab = {k: jnp.asarray(v, jnp.float32) for k, v in factors(teacher_lora, t).items()}
        check_factor_shapes(cfg, t, ab, rank)
        lora = set_factors(lora, t, ab)
    return lora


def check_factor_shapes(cfg: ModelConfig, target: str, ab: dict[str, Any], rank: int) -> None:
    """Factors ``{"a", "b"}`` of one target must have this model's shapes at ``rank``."""
    out, inp = target_shape(cfg, target)
    lead = (cfg.num_layers,) if target in LINEAR_NAMES else ()
    want = {"a": (*lead, rank, inp), "b": (*lead, out, rank)}
    for k in ("a", "b"):
        if tuple(ab[k].shape) != want[k]:
            raise ConfigError(f"LoRA factor {target}.{k} has shape {list(ab[k].shape)}, but a rank-{rank} adapter of "
                              f"this model needs {list(want[k])}.")


def residual(params: Params, lora: LoRA, scale: float) -> Params:
    """``W - scale * b @ a`` for every target (a tied matrix once, after checking that both uses agree)."""
    tops = [t for t in TOP_TARGETS if t in targets_of(lora)]
    tied = "lm_head" not in params and bool(tops)
    if tied and len(tops) == 1:
        raise ConfigError("the model ties its embedding and output head; an initialisation that changes the base "
                          "weights (PiSSA, Seeking) changes that shared matrix, so target both embed_tokens and "
                          "lm_head or neither.")
    if tied:
        gap, size = _head_gap(lora)
        if float(gap) > 1e-5 * max(float(size), 1e-30):
            raise ConfigError("the model ties its embedding and output head, but the embed_tokens and lm_head "
                              "factors give different updates; use identical factors (pktjax.lora.tie_head).")
    return _shift(params, lora, -scale, tied)


@jax.jit
def _head_gap(lora: LoRA) -> tuple[jax.Array, jax.Array]:
    e, h = delta(lora, "embed_tokens", 1.0).T, delta(lora, "lm_head", 1.0)
    return jnp.max(jnp.abs(e - h)), jnp.max(jnp.abs(e))


@partial(jax.jit, static_argnums=(2, 3))
def _shift(params: Params, lora: LoRA, scale: float, skip_head: bool) -> Params:
    """``W + scale * b @ a`` for every target of ``lora`` (the head skipped when ``skip_head``)."""
    for t in targets_of(lora):
        if not (skip_head and t == "lm_head"):
            w, d = weight(params, t), delta(lora, t, scale)
            chex.assert_equal_shape([w, d])
            params = with_weight(params, t, (w.astype(jnp.float32) + d).astype(w.dtype))
    return params


# ------------------------------------------------------------------------------------------------ forward and merge

def apply(base_params: Params, cfg: ModelConfig, lora: LoRA, input_ids: jax.Array,
          attention_mask: jax.Array | None = None, *, scale: float, dropout: float = 0.0,
          rng: jax.Array | None = None) -> jax.Array:
    """Logits ``[B, T, V]`` of the base model with the LoRA added inside the forward (no merged copy)."""
    spec = LoraSpec(scale=scale, dropout=dropout, rng=rng)
    return forward(base_params, cfg, input_ids, attention_mask, adapter=Adapter(lora, spec))


def merge(params: Params, lora: LoRA, scale: float) -> Params:
    """``W + scale * b @ a`` for every target. A tied model (no ``lm_head`` in ``params``) whose embedding or head
    is adapted comes back untied, with its own ``lm_head``: use :func:`merged_config` for its config."""
    targets = targets_of(lora)
    if "lm_head" not in params and any(t in targets for t in TOP_TARGETS):
        params = {**params, "lm_head": params["embed"]}
    return _shift(params, lora, scale, False)


def merged_config(cfg: ModelConfig, params: Params) -> ModelConfig:
    """The config for merged params: untied when :func:`merge` gave the model its own ``lm_head``."""
    if cfg.tie_word_embeddings and "lm_head" in params:
        return dataclasses.replace(cfg, tie_word_embeddings=False)
    return cfg


def merge_model(model: Model, lora: LoRA, scale: float) -> Model:
    """:func:`merge` on a :class:`~pktjax.checkpoint.Model`, with its config untied where needed."""
    params = merge(model.params, lora, scale)
    return Model(params=params, config=merged_config(model.config, params), source=model.source)


def convert_to_original(lora: LoRA, initial: LoRA) -> LoRA:
    """A LoRA trained on a residual base (PiSSA, Seeking) as a rank-``2r`` LoRA of the original weights:
    ``b a - b0 a0 = [b | -b0] [a ; a0]`` (what PEFT does for PiSSA). Keep the scale (double alpha with r)."""
    if targets_of(lora) != targets_of(initial):
        raise ConfigError("the trained and the initial LoRA cover different target modules.")
    out: LoRA = {}
    for t in targets_of(lora):
        ab, ab0 = factors(lora, t), factors(initial, t)
        out = set_factors(out, t, {"a": jnp.concatenate([ab["a"], ab0["a"]], axis=-2),
                                    "b": jnp.concatenate([ab["b"], -ab0["b"]], axis=-1)})
    return out


def rank_of(lora: LoRA) -> int:
    ranks = {int(factors(lora, t)["a"].shape[-2]) for t in targets_of(lora)}
    if len(ranks) != 1:
        raise ConfigError(f"the LoRA mixes ranks {sorted(ranks)}; pktjax adapters use one rank for every target.")
    return ranks.pop()


# ------------------------------------------------------------------------------------------------------ PEFT files

def _module_name(target: str, layer: int | None = None) -> str:
    """Hugging Face module path of a target (``model.layers.3.self_attn.q_proj``, ``model.embed_tokens``)."""
    if target in LINEAR_NAMES:
        return hf_layer_name(target, layer).removesuffix(".weight")
    return "model.embed_tokens" if target == "embed_tokens" else "lm_head"


def _peft_tensors(lora: LoRA) -> list[tuple[str, np.ndarray]]:
    out = []
    for t in targets_of(lora):
        ab = {k: np.asarray(jax.device_get(v), np.float32) for k, v in factors(lora, t).items()}
        if t == "embed_tokens":
            prefix = f"base_model.model.{_module_name(t)}"
            out += [(f"{prefix}.lora_embedding_A", ab["a"]), (f"{prefix}.lora_embedding_B", ab["b"])]
        elif t == "lm_head":
            out += [(f"base_model.model.lm_head.lora_{k.upper()}.weight", ab[k]) for k in ("a", "b")]
        else:
            for i in range(ab["a"].shape[0]):
                prefix = f"base_model.model.{_module_name(t, i)}"
                out += [(f"{prefix}.lora_A.weight", ab["a"][i]), (f"{prefix}.lora_B.weight", ab["b"][i])]
    return out


def peft_config(lora: LoRA, alpha: float, dropout: float = 0.05, base_model: str | None = None) -> dict[str, Any]:
    """An ``adapter_config.json`` dict for PEFT's ``LoraConfig`` (causal LM, no bias, no DoRA). A ``base_model``
    in Hugging Face's cache is recorded as its hub id and commit."""
    from pktjax.registry import hub_origin

    origin = hub_origin(base_model) or {"repo_id": base_model, "revision": None}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": origin["repo_id"],
        "r": rank_of(lora), "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets_of(lora)),
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": origin["revision"],
    }


def export_peft(lora: LoRA, cfg: ModelConfig, folder: str | os.PathLike, *, alpha: float, dropout: float = 0.05,
                initial: LoRA | None = None, base_model: str | None = None, overwrite: bool = False) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's format and key names, atomically.

    ``initial``: the LoRA at the start of training on a residual base (PiSSA, Seeking); the file then holds the
    rank-``2r`` equivalent for the *original* student (:func:`convert_to_original`), loadable on it with
    ``PeftModel.from_pretrained``. Without it the adapter applies to the base it was trained on.
    """
    for t in targets_of(lora):
        check_factor_shapes(cfg, t, factors(lora, t), rank_of(lora))
    if initial is not None:
        lora, alpha = convert_to_original(lora, initial), 2 * alpha
    folder = Path(folder).expanduser()
    with atomic_folder(folder, "adapter", overwrite=overwrite) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(peft_config(lora, alpha, dropout, base_model), indent=2))
        write_safetensors(tmp / ADAPTER_WEIGHTS, _peft_tensors(lora))
    return folder


_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|"
                     r"lora_embedding_B)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?$")
_LAYER_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<name>\w+)$")


def _parse_module(module: str) -> tuple[str, int | None]:
    m = _LAYER_RE.match(module)
    if m and m["name"] in LINEAR_NAMES:
        return m["name"], int(m["layer"])
    if module in ("model.embed_tokens", "lm_head"):
        return ("embed_tokens" if module == "model.embed_tokens" else "lm_head"), None
    raise CheckpointError(f"adapter tensor for module {module!r}, which pktjax cannot adapt (targets: "
                          f"{', '.join(TARGETS)}).")


def _read_peft_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_CONFIG}; point at a PEFT LoRA adapter folder.")
    conf = json.loads(path.read_text())
    problems = [msg for bad, msg in (
        (conf.get("peft_type", "LORA") != "LORA", f"peft_type {conf.get('peft_type')!r} (only LORA)"),
        (conf.get("use_dora"), "DoRA"), (conf.get("fan_in_fan_out"), "fan_in_fan_out"),
        (conf.get("bias", "none") != "none", f"bias={conf.get('bias')!r}"),
        (bool(conf.get("modules_to_save")), "modules_to_save"), (conf.get("lora_bias"), "lora_bias")) if bad]
    if problems:
        raise CheckpointError(f"{path}: unsupported adapter feature(s): {', '.join(problems)}.")
    return conf


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _module_scale(conf: dict[str, Any], module: str | None = None) -> float:
    """PEFT's scaling of one module (``rank_pattern``/``alpha_pattern`` applied), or the global one."""
    r, alpha = int(conf["r"]), float(conf.get("lora_alpha", 8))
    if module is not None:
        r = int(_pattern_value(conf.get("rank_pattern") or {}, module, r))
        alpha = float(_pattern_value(conf.get("alpha_pattern") or {}, module, alpha))
    return alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r


def import_peft(folder: str | os.PathLike, cfg: ModelConfig) -> tuple[LoRA, float]:
    """Read a PEFT LoRA folder as ``(lora, scale)`` for a model of config ``cfg``.

    Layers the file leaves out get zero factors; per-module ranks (``rank_pattern``) are zero-padded to the
    largest rank and per-module scales folded into ``b``, so ``scale * b @ a`` is always PEFT's update.
    """
    folder = Path(folder).expanduser()
    conf = _read_peft_config(folder)
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS} (pktjax reads safetensors adapters only).")
    scale = _module_scale(conf)
    entries: dict[tuple[str, int | None], dict[str, np.ndarray]] = {}
    file = SafetensorsFile(folder / ADAPTER_WEIGHTS)
    for key in file.keys():
        m = _KEY_RE.match(key)
        if m is None:
            continue  # e.g. saved base-layer embedding weights: the base model is given separately
        target, layer = _parse_module(m["module"])
        arr = file.get(key).astype(np.float32)
        if m["kind"].endswith("B"):
            arr = arr * (_module_scale(conf, m["module"]) / scale)
        entries.setdefault((target, layer), {})["a" if m["kind"].endswith("A") else "b"] = arr
    file.close()
    if not entries:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS}: no LoRA tensors found.")
    return _stack_entries(entries, cfg), scale


def _stack_entries(entries: dict[tuple[str, int | None], dict[str, np.ndarray]], cfg: ModelConfig) -> LoRA:
    rank = max(ab["a"].shape[0] for ab in entries.values())
    lora: LoRA = {}
    for t in TARGETS:
        keys = [k for k in entries if k[0] == t]
        if not keys:
            continue
        out, inp = target_shape(cfg, t)
        layers = [None] if t in TOP_TARGETS else range(cfg.num_layers)
        a = np.zeros((len(layers), rank, inp), np.float32)
        b = np.zeros((len(layers), out, rank), np.float32)
        for i, layer in enumerate(layers):
            ab = entries.get((t, layer))
            if ab is not None:
                _place(a[i], ab.get("a"), t, "A", layer)
                _place(b[i], ab.get("b"), t, "B", layer)
        if any(k[1] is not None and k[1] >= cfg.num_layers for k in keys):
            raise CheckpointError(f"the adapter adapts layer(s) beyond the model's {cfg.num_layers} layers.")
        ab = {"a": jnp.asarray(a), "b": jnp.asarray(b)} if t in LINEAR_NAMES else {"a": jnp.asarray(a[0]),
                                                                                 "b": jnp.asarray(b[0])}
        lora = set_factors(lora, t, ab)
    return lora


def _place(dest: np.ndarray, src: np.ndarray | None, target: str, kind: str, layer: int | None) -> None:
    where = f"{target}" + (f" of layer {layer}" if layer is not None else "")
    if src is None:
        raise CheckpointError(f"the adapter has no lora_{kind} for {where}.")
    r = src.shape[0] if kind == "A" else src.shape[1]
    want = dest[:r].shape if kind == "A" else dest[:, :r].shape
    if src.shape != want:
        raise CheckpointError(f"adapter lora_{kind} for {where} has shape {list(src.shape)}; this model needs "
                              f"{list(want)}. The adapter belongs to a different model.")
    if kind == "A":
        dest[:r] = src
    else:
        dest[:, :r] = src

