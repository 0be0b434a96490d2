"""Reading and writing safetensors files tensor by tensor through a memory map.

numpy has no bfloat16, so ``safe_open(framework="numpy")`` cannot read the bf16 checkpoints most models ship;
this reader parses the (simple, documented) safetensors layout itself, maps bf16 to ``ml_dtypes.bfloat16``,
checks every offset against the file size, and hands out one tensor at a time.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path
from typing import Callable, Iterable, Sequence

import ml_dtypes
import numpy as np

from pktjax.errors import CheckpointError

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """One ``.safetensors`` file: ``keys()``, ``shape(name)``, ``get(name) -> np.ndarray`` (a copy)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as fh:
                head = fh.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header). Re-download or re-save it.")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > 100_000_000:
                    raise CheckpointError(f"{self.path}: truncated or corrupt safetensors file (header of {n} bytes "
                                          f"in a file of {size} bytes). Re-download or re-save it.")
                header = json.loads(fh.read(n))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: cannot read safetensors header ({e}).") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        self._entries = header
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}.")
            start, end = e["data_offsets"]
            want = DTYPES[e["dtype"]].itemsize * int(np.prod(e["shape"], dtype=np.int64))
            if end - start != want:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {end - start} bytes for shape {e['shape']}.")
            if self._base + end > size:
                raise CheckpointError(f"{self.path}: truncated safetensors file: tensor {name!r} ends at byte "
                                      f"{self._base + end} but the file has {size}. Re-download or re-save it.")
        self._mm = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return DTYPES[self._entries[name]["dtype"]]

    def get(self, name: str) -> np.ndarray:
        if self._mm is None:
            with open(self.path, "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if self.path.stat().st_size else b""
        e = self._entries[name]
        start, end = e["data_offsets"]
        buf = self._mm[self._base + start: self._base + end]
        return np.frombuffer(buf, dtype=DTYPES[e["dtype"]]).reshape(e["shape"]).copy()

    def close(self) -> None:
        if self._mm is not None and not isinstance(self._mm, bytes):
            self._mm.close()
        self._mm = None


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write ``(name, array)`` pairs to ``path``; arrays must be materialised numpy (any DTYPES dtype)."""
    items = {k: np.ascontiguousarray(v) for k, v in tensors}
    write_safetensors_stream(path, [(k, v.shape, v.dtype) for k, v in items.items()], items.__getitem__, metadata)


def write_safetensors_stream(path: str | Path, specs: Sequence[tuple[str, Sequence[int], np.dtype]],
                             get: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors ``specs = [(name, shape, dtype)]`` to ``path``, calling ``get(name)`` for one array at a
    time (so a model larger than memory can be written)."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        if dtype not in CODES:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors.")
        nbytes = dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape, dtype in specs:
            arr = np.ascontiguousarray(get(name), dtype=dtype)
            if arr.shape != tuple(shape):
                raise CheckpointError(f"tensor {name!r}: shape {arr.shape}, announced {tuple(shape)}.")
            fh.write(arr.tobytes())
        fh.flush()
        os.fsync(fh.fileno())


class SafetensorsSource:
    """All ``*.safetensors`` of a checkpoint folder, through ``model.safetensors.index.json`` when present."""

    def __init__(self, folder: Path):
        self.path = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e}).") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors files. pktjax reads safetensors checkpoints "
                                  "(convert .bin weights with transformers' save_pretrained(safe_serialization=True)).")
        self._files: dict[str, SafetensorsFile] = {}
        for name in files:
            if not (folder / name).is_file():
                raise CheckpointError(f"{index}: names shard {name!r}, which is missing from {folder}.")
            self._files[name] = SafetensorsFile(folder / name)
        self._where = {k: fname for fname, fobj in self._files.items() for k in fobj.keys()}
        if weight_map is not None:
            missing = [k for k, v in weight_map.items() if k not in self._where]
            if missing:
                raise CheckpointError(f"{index}: tensor {missing[0]!r} is listed but not found in its shard.")

    def names(self) -> list[str]:
        return list(self._where)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint.")
        return self._files[self._where[name]]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def location(self, name: str) -> str:
        return str(self._file(name).path)
