"""Tiny random models and a byte-level tokenizer, for offline demos and tests (no hub, no torch)."""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp

from pktjax.checkpoint import Model, layer_shapes, top_shapes, write_model
from pktjax.config import ModelConfig
from pktjax.runfolder import atomic_folder, fault_point

BYTE_VOCAB = 260  # 4 special tokens + 256 bytes


def build_tokenizer():
    """A byte-level tokenizer (no merges) of 260 tokens: ``<unk> <s> </s> <pad>`` then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet())):
        vocab[ch] = 4 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def tiny_config(hidden: int = 32, layers: int = 2, inter: int = 48, heads: int = 4, kv_heads: int | None = None,
                model_type: str = "llama", vocab: int = BYTE_VOCAB) -> ModelConfig:
    """A small Llama-family config (MHA unless ``kv_heads`` is given)."""
    return ModelConfig(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_layers=layers, num_heads=heads, num_kv_heads=kv_heads or heads, head_dim=hidden // heads,
                       rms_norm_eps=1e-5, attention_bias=model_type == "qwen2", bos_token_id=1, eos_token_id=2,
                       max_position_embeddings=2048)


def random_params(cfg: ModelConfig, key: jax.Array, std: float = 0.2, dtype=jnp.float32) -> dict:
    """Random parameters: norms near 1, matrices N(0, std^2)."""
    shapes = {**top_shapes(cfg), **{("layers", k): (cfg.num_layers, *s) for k, s in layer_shapes(cfg).items()}}
    keys = dict(zip(shapes, jax.random.split(key, len(shapes))))
    params: dict = {"layers": {}}
    for name, shape in shapes.items():
        is_vector = len(shape) - (1 if isinstance(name, tuple) else 0) == 1
        value = (1.0 + 0.1 * jax.random.normal(keys[name], shape)) if is_vector else std * jax.random.normal(keys[name], shape)
        if isinstance(name, tuple):
            params["layers"][name[1]] = value.astype(dtype)
        else:
            params[name] = value.astype(dtype)
    return params


def save_random_model(folder: str | os.PathLike, cfg: ModelConfig, seed: int = 0, std: float = 0.2,
                      overwrite: bool = False) -> Path:
    """Write a random ``cfg`` model plus the byte tokenizer as a Hugging Face checkpoint folder. Wide models need
    ``std`` near ``1 / sqrt(hidden)`` to keep activations finite. Weights, config and tokenizer land in one
    atomic folder: a kill leaves either the whole model or nothing (``overwrite`` replaces an existing one)."""
    folder = Path(folder).expanduser()
    with atomic_folder(folder, "model", overwrite=overwrite) as tmp:
        write_model(Model(params=random_params(cfg, jax.random.key(seed), std), config=cfg), tmp)
        fault_point("tiny:before-tokenizer")
        build_tokenizer().save_pretrained(tmp)
    return folder
