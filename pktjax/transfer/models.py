"""The transfer job's models: a spec (path, ``registry:``, ``tiny:``, hub id) as a local path; the pair check."""

from __future__ import annotations

from pathlib import Path

from pktjax.config import ModelConfig
from pktjax.errors import CheckpointError, ConfigError
from pktjax.registry import parse_hub_id


def parse_tiny(spec: str) -> tuple[ModelConfig, int, float]:
    """``tiny:hidden=64,layers=4,...,seed=1,std=0.2`` -> ``(config, seed, std)`` of a random model."""
    from pktjax.tiny import tiny_config

    fields = dict(kv.split("=", 1) for kv in spec.split(":", 1)[1].split(",") if kv)
    seed, std = int(fields.pop("seed", 0)), float(fields.pop("std", 0.2))
    model_type = fields.pop("model_type", "llama")
    try:
        return tiny_config(model_type=model_type, **{k: int(v) for k, v in fields.items()}), seed, std
    except TypeError as e:
        raise ConfigError(f"{spec}: {e}; tiny models take hidden, layers, inter, heads, kv_heads, vocab, seed, "
                          "std and model_type.") from None


def resolve_model(spec: str, folder: Path) -> Path:
    """A model spec as a local path: ``tiny:`` specs are built (once) into ``folder``, ``registry:PAIR/ROLE``
    names an installed packaged model, an existing path is itself, and ``org/name[@revision]`` is a Hugging Face
    repo."""
    if spec.startswith("tiny:"):
        from pktjax.tiny import save_random_model

        if not (folder / "config.json").is_file():
            cfg, seed, std = parse_tiny(spec)
            save_random_model(folder, cfg, seed, std=std)
        return folder
    if spec.startswith("registry:"):
        from pktjax.registry import packaged_path

        return packaged_path(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if parse_hub_id(spec):
        return hub_model(spec)
    raise ConfigError(f"model {spec!r} does not exist; give a checkpoint folder, a .gguf file, "
                      "registry:qwen2.5-coder/teacher|student (after `pktjax models install qwen2.5-coder`), "
                      "a Hugging Face repo id org/name[@revision], or tiny:...")


def hub_model(repo_id: str) -> Path:
    """A Hugging Face repo ``org/name[@revision]``: its snapshot in the standard cache, downloaded when online."""
    from pktjax.registry import hub_snapshot

    try:
        return hub_snapshot(repo_id)
    except CheckpointError as e:
        raise ConfigError(f"model {e}") from None


def check_pair(teacher: Path, student: Path) -> None:
    """Refuse a pair that does not share a vocabulary or whose teacher is the smaller model (configs only)."""
    from pktjax.checkpoint import read_model_config

    t, s = read_model_config(teacher), read_model_config(student)
    if t.vocab_size != s.vocab_size:
        raise ConfigError(f"teacher vocabulary {t.vocab_size} != student vocabulary {s.vocab_size}: "
                          "the pair must share a tokenizer.")
    if (t.hidden_size, t.num_layers) < (s.hidden_size, s.num_layers) or t.hidden_size < s.hidden_size:
        raise ConfigError(f"the teacher (d={t.hidden_size}, L={t.num_layers}) is smaller than the student "
                          f"(d={s.hidden_size}, L={s.num_layers}); swap them.")
