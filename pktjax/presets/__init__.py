"""Shape-only model configs (Hugging Face ``config.json`` contents) for planning memory without weights.

``pktjax plan --teacher llama-2-13b`` reads ``llama-2-13b.json`` from this folder.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from pktjax.config import ModelConfig
from pktjax.errors import ConfigError


def preset_names() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".json"))


def load_config(name_or_path: str) -> ModelConfig:
    """A :class:`ModelConfig` from a preset name, a ``config.json`` path or a checkpoint folder."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return ModelConfig.from_file(path)
    if name_or_path in preset_names():
        raw = json.loads(resources.files(__name__).joinpath(f"{name_or_path}.json").read_text())
        return ModelConfig.from_hf_dict(raw, source=f"preset {name_or_path}")
    raise ConfigError(f"{name_or_path!r} is neither a config.json / checkpoint folder nor a preset "
                      f"({', '.join(preset_names())}).")
