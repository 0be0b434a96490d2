"""Tokenizers: a ``transformers`` tokenizer from a checkpoint folder or from a GGUF file's metadata."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

from pktjax.errors import CheckpointError
from pktjax.registry import home, model_path
from pktjax.runfolder import atomic_folder


def load_tokenizer(path: str | os.PathLike):
    """The ``transformers`` tokenizer of a checkpoint folder or ``.gguf`` file (offline, local files only)."""
    from transformers import AutoTokenizer

    path = model_path(path)
    if path.is_file() and path.suffix == ".gguf":
        return _gguf_tokenizer(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder or .gguf file for a tokenizer.")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no usable tokenizer files here ({e}).") from None


def _cache_folder(path: Path) -> Path:
    """Where the tokenizer built from ``path`` is kept: keyed by the file's absolute path, size and mtime."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return home() / "tokenizers" / f"{path.stem}-{key}"


def _gguf_tokenizer(path: Path):
    """Build the tokenizer from a GGUF file's metadata once (``transformers`` takes tens of seconds for a
    150k-token vocabulary), save it under ``$PKTJAX_HOME/tokenizers/`` and load that copy afterwards."""
    from transformers import AutoTokenizer

    cached = _cache_folder(path)
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as e:  # transformers' GGUF path fails in many library-specific ways
        hint = ("Install pktjax[gguf]: transformers builds GGUF tokenizers through modules that import torch. "
                if importlib.util.find_spec("torch") is None else "")
        raise CheckpointError(f"{path}: cannot build a tokenizer from this GGUF file's metadata "
                              f"({type(e).__name__}: {e}). {hint}Or load the tokenizer from the model's Hugging "
                              "Face folder instead.") from None
    try:
        with atomic_folder(cached, "tokenizer cache", overwrite=True) as tmp:
            tok.save_pretrained(tmp)
    except OSError:  # a read-only cache only costs the rebuild next time
        pass
    return tok
