"""Folders written all at once: :func:`atomic_folder` yields a temporary sibling that replaces the target only
when the block succeeds, so a crash never leaves a half-written folder."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pktjax.errors import CheckpointError


@contextlib.contextmanager
def atomic_folder(path: Path, what: str = "output", overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only when the block finishes without error.

    A non-empty ``path`` is refused unless ``overwrite``; on any error the temporary folder is removed, so a
    crash never leaves a half-written ``path``.
    """
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{path}: folder exists and is not empty; choose a new {what} folder.")
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
