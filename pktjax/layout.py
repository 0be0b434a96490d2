"""The parameter layout of :mod:`pktjax.model`: weight shapes per decoder layer and at the top, and the
Hugging Face tensor name of every leaf. Depends on the model config only, so the checkpoint readers and the
sharding rules share it without importing each other."""

from __future__ import annotations

from typing import Iterator

from pktjax.config import ModelConfig

LAYER_NAMES = {
    "input_norm": "input_layernorm.weight", "post_attn_norm": "post_attention_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight", "down_proj": "mlp.down_proj.weight",
}
TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer weight shapes ``[out, in]`` of one decoder layer (no leading ``L``)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "input_norm": (d,), "post_attn_norm": (d,),
        "q_proj": (cfg.q_dim, d), "k_proj": (cfg.kv_dim, d), "v_proj": (cfg.kv_dim, d), "o_proj": (d, cfg.q_dim),
        "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
    }
    if cfg.attention_bias:
        shapes.update(q_bias=(cfg.q_dim,), k_bias=(cfg.kv_dim,), v_bias=(cfg.kv_dim,))
    return shapes


def top_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def hf_layer_name(key: str, layer: int) -> str:
    return f"model.layers.{layer}.{LAYER_NAMES[key]}"


def hf_tensor_names(cfg: ModelConfig) -> Iterator[tuple[tuple[str, ...], str]]:
    """``(pytree path, HF name)`` for every tensor; layer tensors give ``("layers", key, str(layer))``."""
    for key in top_shapes(cfg):
        yield (key,), TOP_NAMES[key]
    for key in layer_shapes(cfg):
        for i in range(cfg.num_layers):
            yield ("layers", key, str(i)), hf_layer_name(key, i)
