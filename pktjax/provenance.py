"""What produced a result: software versions, the pktjax commit, the devices, and hashes of the config and data.

``provenance(config, data_files)`` returns a JSON-ready dict that every evaluation report and every transfer
run's ``transfer.json`` carry under ``"provenance"``, so that a number can be traced to the code, the libraries,
the hardware and the exact inputs that made it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

PACKAGES = ("jax", "jaxlib", "flax", "optax", "transformers", "numpy")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=256)
def _file_hash(path: str, size: int, mtime_ns: int) -> str:  # keyed by size and mtime: a changed file re-hashes
    return sha256_file(path)


def config_hash(config: Any) -> str:
    """sha256 of the config as canonical JSON (sorted keys; paths and other objects as strings)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def version() -> str:
    """pktjax's version: the installed distribution's, else the package's ``__version__``."""
    try:
        return metadata.version("pktjax")
    except metadata.PackageNotFoundError:
        from pktjax import __version__

        return __version__


@functools.lru_cache(maxsize=1)
def git_commit() -> dict[str, Any] | None:
    """``{"commit", "dirty"}`` of the checkout pktjax runs from; None when it is not a git checkout (an
    installed wheel) or git is missing."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():  # do not report an unrelated repository that happens to hold site-packages
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def devices() -> dict[str, Any]:
    """The JAX backend, process count and device kinds with their counts (``{"TPU v4": 4}``)."""
    import jax

    kinds: dict[str, int] = {}
    for d in jax.devices():
        kinds[d.device_kind] = kinds.get(d.device_kind, 0) + 1
    return {"backend": jax.default_backend(), "process_count": jax.process_count(), "kinds": kinds}


def provenance(config: Any = None, data_files: Iterable[str | os.PathLike] = ()) -> dict[str, Any]:
    """pktjax's version and commit, library versions, Python, the devices, ``config``'s hash and the sha256 of
    every file in ``data_files`` (a missing file is recorded as None)."""
    hashes = {}
    for f in data_files:
        p = Path(f).expanduser()
        st = p.stat() if p.is_file() else None
        hashes[str(p)] = _file_hash(str(p.resolve()), st.st_size, st.st_mtime_ns) if st else None
    return {"pktjax": version(), "git": git_commit(), "packages": _package_versions(),
            "python": platform.python_version(), "platform": platform.platform(), "devices": devices(),
            "config_sha256": config_hash(config), "data_sha256": hashes}
