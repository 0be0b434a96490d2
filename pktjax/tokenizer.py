"""Tokenizers: a ``transformers`` tokenizer from a checkpoint folder or from a GGUF file's metadata."""

from __future__ import annotations

import os
from pathlib import Path

from pktjax.errors import CheckpointError


def load_tokenizer(path: str | os.PathLike):
    """The ``transformers`` tokenizer of a checkpoint folder or ``.gguf`` file (offline, local files only)."""
    from transformers import AutoTokenizer

    path = Path(path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        try:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        except Exception as e:  # transformers' GGUF path fails in many library-specific ways
            raise CheckpointError(f"{path}: cannot build a tokenizer from this GGUF file's metadata "
                                  f"({type(e).__name__}: {e}). Load the tokenizer from the model's Hugging Face "
                                  "folder instead.") from None
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder or .gguf file for a tokenizer.")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: no usable tokenizer files here ({e}).") from None
