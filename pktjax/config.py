"""Model configuration: a frozen dataclass parsed from a Hugging Face ``config.json`` dict.

The config is hashable so it can be a static argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from pktjax.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "swish")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only model (Llama-2/3, Qwen2/2.5, Mistral)."""

    model_type: str
    vocab_size: int
    hidden_size: int  # d
    intermediate_size: int  # f
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # KV (== H for multi-head attention)
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Rope scaling as a sorted tuple of (key, value) pairs so the config stays hashable.
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    sliding_window: int | None = None  # Mistral-style local attention
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    torch_dtype: str = "float32"

    @property
    def d(self) -> int:
        return self.hidden_size

    @property
    def f(self) -> int:
        return self.intermediate_size

    @property
    def q_dim(self) -> int:
        """Width of the attention output before o_proj (number of attention neurons)."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def is_gqa(self) -> bool:
        return self.num_kv_heads != self.num_heads

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, tuple):
            return self.eos_token_id
        return (self.eos_token_id,)

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies ``[head_dim // 2]`` in float64, scaled as the config says."""
        d = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
        rope = self.rope
        kind = rope.get("rope_type", "default")
        if kind == "linear":
            inv = inv / float(rope["factor"])
        elif kind == "llama3":
            inv = _llama3_inv_freq(inv, rope)
        return inv

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Parse a Hugging Face config dict (old ``rope_theta``/``rope_scaling`` keys or ``rope_parameters``)."""
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; pktjax reads "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} checkpoints."
            )
        act = raw.get("hidden_act", "silu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act {act!r} is not supported (expected silu).")
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            layers = int(raw["num_hidden_layers"])
            inter = int(raw["intermediate_size"])
            vocab = int(raw["vocab_size"])
        except KeyError as e:
            raise ConfigError(f"{source}: required key {e.args[0]!r} is missing.") from None
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        head_dim = int(raw.get("head_dim") or hidden // heads)
        if heads % kv_heads:
            raise ConfigError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}.")
        theta, scaling = _rope_from_raw(raw, source)
        window = None
        if model_type == "mistral":
            window = raw.get("sliding_window")
        elif model_type == "qwen2" and raw.get("use_sliding_window"):
            raise ConfigError(f"{source}: Qwen2 use_sliding_window=true is not supported.")
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(int(e) for e in eos)
        return cls(
            model_type=model_type,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", model_type == "qwen2")),
            sliding_window=int(window) if window else None,
            max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=eos,
            torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf_dict(read_config_json(path), source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers`` reads back as the same model."""
        archs = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        out: dict[str, Any] = {
            "architectures": [archs[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) or None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "torch_dtype": self.torch_dtype,
        }
        if self.model_type == "llama":
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = False
        if self.model_type == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            out["use_sliding_window"] = False
        return out


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Read ``config.json`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{path}: no config.json here. Point pktjax at a Hugging Face checkpoint folder "
            "(config.json + *.safetensors) or a .gguf file."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}).") from None


def _rope_from_raw(raw: dict[str, Any], source: str) -> tuple[float, tuple[tuple[str, Any], ...]]:
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(raw.get("rope_theta", 10000.0))
        scaling = dict(raw.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    scaling.pop("type", None)
    kind = scaling.get("rope_type", "default")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"{source}: rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)}).")
    if kind == "default":
        scaling = {}
    return theta, tuple(sorted((k, _freeze(v)) for k, v in scaling.items()))


def _freeze(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _llama3_inv_freq(inv: np.ndarray, rope: dict[str, Any]) -> np.ndarray:
    factor = float(rope["factor"])
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled)
