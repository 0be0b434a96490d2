"""Random teacher/student checkpoints written once as safetensors and read by both frameworks."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from experiments.bench.sizes import Shape, Size


def build_checkpoint(shape: Shape, folder: Path, seed: int, storage: str) -> Path:
    """A ``transformers`` Llama model with its own random initialisation, saved in ``storage`` dtype."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(shape.hf_config(), dtype=torch.float32)
    model.to(getattr(torch, storage)).save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()
    return folder


def build_pair(size: Size, root: Path, seed: int = 0) -> tuple[Path, Path]:
    return (build_checkpoint(size.teacher, root / "teacher", seed, size.storage),
            build_checkpoint(size.student, root / "student", seed + 1, size.storage))


def load_torch(folder: Path, device: str) -> torch.nn.Module:
    """The checkpoint in float32 (SDPA attention; the attribution switches to eager itself), frozen, eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(device).eval()
    model.requires_grad_(False)
    return model
