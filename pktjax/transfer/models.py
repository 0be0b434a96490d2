"""The transfer job's models: a spec (path, ``registry:``, ``tiny:``, hub id) as a local path or a config; the
pair check of the job's methods."""

from __future__ import annotations

from pathlib import Path

from pktjax.checkpoint import read_model_config
from pktjax.config import ModelConfig
from pktjax.errors import CheckpointError, ConfigError
from pktjax.lora import TARGETS
from pktjax.pair import check_pair
from pktjax.registry import hub_snapshot, packaged_path, parse_hub_id
from pktjax.settings import LatenSettings, SeekingSettings
from pktjax.tiny import save_random_model, tiny_config


def parse_tiny(spec: str) -> tuple[ModelConfig, int, float]:
    """``tiny:hidden=64,layers=4,...,seed=1,std=0.2`` -> ``(config, seed, std)`` of a random model."""
    allowed = "tiny models take hidden, layers, inter, heads, kv_heads, vocab, seed, std and model_type, as k=v"
    try:
        fields = dict(kv.split("=", 1) for kv in spec.split(":", 1)[1].split(",") if kv)
        seed, std = int(fields.pop("seed", 0)), float(fields.pop("std", 0.2))
        model_type = fields.pop("model_type", "llama")
        cfg = tiny_config(model_type=model_type, **{k: int(v) for k, v in fields.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{spec}: {e}; {allowed} (integers; std a number).") from None
    if min(cfg.hidden_size, cfg.num_layers, cfg.intermediate_size, cfg.num_heads, cfg.vocab_size) < 1 or \
            cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ConfigError(f"{spec}: sizes must be positive, hidden a multiple of heads and heads of kv_heads.")
    return cfg, seed, std


def peek_config(spec: str) -> ModelConfig | None:
    """A model spec's config without building, downloading or loading weights; ``None`` for a hub id that is
    not downloaded yet (its config is known only after the download)."""
    if spec.startswith("tiny:"):
        return parse_tiny(spec)[0]
    if parse_hub_id(spec) and not Path(spec).expanduser().exists():
        return None
    return read_model_config(resolve_model(spec, Path()))


def resolve_model(spec: str, folder: Path) -> Path:
    """A model spec as a local path: ``tiny:`` specs are built (once) into ``folder``, ``registry:PAIR/ROLE``
    names an installed packaged model, an existing path is itself, and ``org/name[@revision]`` is a Hugging Face
    repo."""
    if spec.startswith("tiny:"):
        if not ((folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()):
            cfg, seed, std = parse_tiny(spec)  # built atomically; an incomplete older build is rebuilt
            save_random_model(folder, cfg, seed, std=std, overwrite=True)
        return folder
    if spec.startswith("registry:"):
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
    try:
        return hub_snapshot(repo_id)
    except CheckpointError as e:
        raise ConfigError(f"model {e}") from None


def check_job_pair(teacher: ModelConfig, student: ModelConfig, laten: LatenSettings | None,
                   seeking: SeekingSettings | None) -> None:
    """The pair rules of the methods a job runs (:func:`pktjax.pair.check_pair`): LaTen's when ``laten`` has
    seeds, Seeking's when there is a ``seeking`` section with seeds."""
    check_pair(teacher, student,
               laten={"rate": laten.rate, "layers": laten.layers} if laten is not None and laten.seeds else None,
               seeking_targets=(seeking.targets or TARGETS) if seeking is not None and seeking.seeds else None)
