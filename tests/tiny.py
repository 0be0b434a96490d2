"""Tiny random checkpoints built with ``transformers`` and saved as safetensors, for the tests."""

from __future__ import annotations

from pathlib import Path

import torch

from pktjax.tiny import build_tokenizer

FAMILIES = ("llama2", "llama3", "qwen2", "mistral")
VOCAB = 260  # the byte-level test tokenizer: 4 specials + 256 bytes


def hf_config(family: str, *, hidden: int = 32, layers: int = 2, inter: int = 48, heads: int = 4,
              kv_heads: int | None = None, vocab: int = VOCAB):
    """A tiny config of one family: Llama-2 (MHA), Llama-3 (GQA, llama3 rope, tied), Qwen2 (GQA, biases, tied),
    Mistral (GQA, sliding window)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=256, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family == "llama2":
        return LlamaConfig(num_key_value_heads=kv_heads or heads, **common)
    if family == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        return LlamaConfig(num_key_value_heads=kv_heads or heads // 2, tie_word_embeddings=True,
                           rope_parameters=rope, **common)
    if family == "qwen2":
        return Qwen2Config(num_key_value_heads=kv_heads or heads // 2, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
    if family == "mistral":
        return MistralConfig(num_key_value_heads=kv_heads or heads // 2, sliding_window=5, **common)
    raise ValueError(family)


def build(family: str, folder: Path, seed: int = 0, **kw) -> Path:
    """Save a random tiny ``family`` model (float32 safetensors) into ``folder``; returns the folder."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # wider than the default init so that layers matter
        for p in model.parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    build_tokenizer().save_pretrained(folder)
    return folder


def torch_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
