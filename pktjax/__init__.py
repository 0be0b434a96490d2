"""pktjax: cross-scale parametric knowledge transfer (LaTen and Seeking) between LLMs, in JAX.

The public names below are imported on first use (a module-level ``__getattr__``), so ``import pktjax`` and the
command line (``pktjax --help``) load no array library until a name that needs one is touched.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

from pktjax.errors import CheckpointError, ConfigError, DataError, PairError, PktjaxError

__version__ = "0.1.0"  # as in pyproject.toml

# public name -> the module that defines it (a module's own name: the module itself)
_LAZY = {
    "Model": "pktjax.checkpoint", "load_model": "pktjax.checkpoint", "save_model": "pktjax.checkpoint",
    "ModelConfig": "pktjax.config",
    "Adapter": "pktjax.model", "Trace": "pktjax.model", "forward": "pktjax.model", "forward_modules": "pktjax.model",
    "forward_trace": "pktjax.model", "hidden_states": "pktjax.model",
    "load_tokenizer": "pktjax.tokenizer",
    "attribution": "pktjax.attribution", "attribution_batch": "pktjax.attribution",
    "attribution_target": "pktjax.attribution", "locate": "pktjax.attribution", "locate_each": "pktjax.attribution",
    "Attribution": "pktjax.select", "Selection": "pktjax.select", "select": "pktjax.select",
    "sensitivity": "pktjax.sensitivity",
    "extract": "pktjax.extract",
    "align": "pktjax.align", "init_aligner": "pktjax.align",
    "inject": "pktjax.inject",
    "TrainConfig": "pktjax.train_aligner", "train_aligner": "pktjax.train_aligner",
    "fuse": "pktjax.fuse",
    "generate": "pktjax.generate",
    "evaluate": "pktjax.evaluate",
    "lora": None, "seeking": None, "analysis": None, "sandbox": None,
}

__all__ = ["CheckpointError", "ConfigError", "DataError", "PairError", "PktjaxError", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pktjax' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name] or f"pktjax.{name}")
    value = module if _LAZY[name] is None else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


# Functions named like their module (``pktjax.extract`` is the function of ``pktjax/extract.py``): importing the
# submodule would set the package attribute to the module; the function stays the public name instead (the
# module is still in ``sys.modules`` for ``from pktjax.extract import ...``).
_FUNCTIONS_NAMED_LIKE_MODULES = {n for n, m in _LAZY.items() if m == f"pktjax.{n}"}


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name in _FUNCTIONS_NAMED_LIKE_MODULES and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
