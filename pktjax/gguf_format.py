"""A fast reader of the GGUF container: metadata as Python values, tensors as zero-copy views of a memory map.

``gguf.GGUFReader`` builds a numpy view for every part of every metadata field; a Qwen2.5 file carries 151,936
vocabulary strings and as many merges, which takes it tens of seconds. This reader walks the same layout with
``struct`` over one ``mmap`` (well under a second) and leaves dequantization to ``gguf.quants``.

Layout (little-endian, version 2 or 3): magic ``GGUF``, ``u32`` version, ``u64`` tensor count, ``u64`` field count;
the fields (``string`` key, ``u32`` value type, value); the tensor infos (``string`` name, ``u32`` n_dims, ``u64``
dims innermost first, ``u32`` ggml type, ``u64`` offset); then, aligned to ``general.alignment`` (default 32), the
tensor data.
"""

from __future__ import annotations

import dataclasses
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from pktjax.errors import CheckpointError

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor: ``shape`` in numpy (= Hugging Face) order, ``data`` the raw bytes as ``[rows, bytes per row]``
    (a view into the file's memory map; a row is one innermost-dimension line of ``shape[-1]`` values)."""

    name: str
    shape: tuple[int, ...]
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{path}: not a readable GGUF file: {why}")


class _Cursor:
    """Sequential little-endian reads from a buffer, with errors that say the file is cut short."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _bad(self.path, "GGUF header ends early (truncated file); re-download it.")
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return out[0] if len(out) == 1 else out

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise _bad(self.path, "GGUF string runs past the end of the file (truncated or corrupt).")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def numbers(self, vtype: int, count: int) -> list:
        dtype = np.dtype(_NUMPY[vtype])
        if self.pos + count * dtype.itemsize > len(self.buf):
            raise _bad(self.path, "GGUF metadata runs past the end of the file (truncated or corrupt).")
        arr = np.frombuffer(self.buf, dtype, count, self.pos)
        self.pos += arr.nbytes
        return arr.tolist()

    def value(self, vtype: int) -> Any:
        if vtype in _NUMPY:
            return self.numbers(vtype, 1)[0]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _NUMPY:  # numbers in one read
                return self.numbers(etype, count)
            return [self.value(etype) for _ in range(count)]
        raise _bad(self.path, f"unknown GGUF value type {vtype} at byte {self.pos} (corrupt file).")


@dataclasses.dataclass
class GGUFFile:
    """Metadata ``fields`` (key -> Python value) and ``tensors`` (name -> :class:`TensorInfo`) of one file."""

    path: Path
    fields: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _map: Any = None  # keeps the memory map open while views into it live


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse a GGUF file's header; tensor data stays on disk until read through ``TensorInfo.data``."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)
    with open(path, "rb") as f:
        try:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:
            raise _bad(path, "empty file, not a GGUF model.") from None
    cur = _Cursor(mm, path)
    if len(mm) < 24 or mm[:4] != _MAGIC:
        raise _bad(path, "not a GGUF file (no 'GGUF' magic); give a .gguf model file.")
    cur.pos = len(_MAGIC)
    version, n_tensors, n_fields = cur.unpack("<I"), cur.unpack("<Q"), cur.unpack("<Q")
    if version not in (2, 3):
        raise _bad(path, f"GGUF version {version} is not supported (2 and 3 are; a big-endian file "
                              "reads as a huge version number).")
    fields = {}
    for _ in range(n_fields):
        key = cur.string()
        fields[key] = cur.value(cur.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = cur.string(), cur.unpack("<I")
        dims = [cur.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cur.unpack("<I"), cur.unpack("<Q")))
    align = int(fields.get("general.alignment", 32))
    start = -(-cur.pos // align) * align
    tensors = {}
    for name, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise _bad(path, f"tensor {name!r} has an unknown ggml type {type_id}.") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
        row_bytes = dims[0] // block * type_size
        if start + offset + rows * row_bytes > len(mm):
            raise _bad(path, f"tensor {name!r} runs past the end of the file (truncated download?); "
                                  "re-download it.")
        data = np.frombuffer(mm, np.uint8, rows * row_bytes, start + offset).reshape(rows, row_bytes)
        tensors[name] = TensorInfo(name, tuple(int(d) for d in reversed(dims)), qtype, data)
    return GGUFFile(path, fields, tensors, mm)
