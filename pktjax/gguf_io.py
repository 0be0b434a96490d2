"""Reading GGUF files (llama.cpp's format) as a tensor source keyed by Hugging Face names.

:func:`load_gguf` turns a file's metadata into a :class:`~pktjax.config.ModelConfig` and returns a
:class:`GGUFSource` that dequantizes one tensor at a time (any type ``gguf.quants.dequantize`` knows: F32, F16,
BF16, Q8_0, Q4_K, Q6_K, ...), so :func:`pktjax.checkpoint.params_from_source` builds params unchanged.

Three conventions of llama.cpp's converter are undone here:

- GGUF lists dimensions innermost first; the reader already hands out arrays in numpy order, which for a
  linear weight is the Hugging Face ``[out_features, in_features]``.
- For the ``llama`` architecture (Llama and Mistral) the rows of ``q_proj``/``k_proj`` are permuted within each
  head from the "rotate halves" RoPE layout to interleaved pairs; :func:`unpermute_rows` restores them.
- Llama-3 RoPE scaling is stored as a ``rope_freqs`` tensor of per-frequency divisors, not as metadata;
  :func:`llama3_rope_from_factors` recovers an equivalent ``rope_scaling`` dict.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pktjax.config import ModelConfig, _llama3_inv_freq
from pktjax.errors import CheckpointError
from pktjax.gguf_format import read_gguf
from pktjax.safetensors_io import SafetensorsSource, write_safetensors_stream

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
_PERMUTED_ARCHS = ("llama", "mistral")  # llama.cpp permutes q/k rows for these
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(.+)")
_ROPE_FREQS = "rope_freqs.weight"
_REQUIRED = object()


def load_gguf(path: str | Path) -> tuple[ModelConfig, "GGUFSource"]:
    """Open a GGUF file: its config (from metadata) and a tensor source keyed by Hugging Face names."""
    path = Path(path)
    gguf_file = _open_reader(path)
    meta = _Metadata(gguf_file.fields, path)
    arch = meta.architecture()
    tensors = gguf_file.tensors
    cfg = config_from_metadata(meta, arch, tensors, path)
    return cfg, GGUFSource(path, tensors, cfg, permuted=arch in _PERMUTED_ARCHS)


def _open_reader(path: Path):
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file.")
    try:
        import gguf  # noqa: F401  (its quantization tables and kernels)
    except ImportError:
        raise CheckpointError(f"{path}: reading GGUF needs the `gguf` package (pip install gguf).") from None
    try:
        return read_gguf(path)
    except CheckpointError:
        raise
    except (ValueError, KeyError, IndexError, OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file, truncated or corrupt ({e}). "
                              "Re-download or re-convert it.") from None


class _Metadata:
    """Typed access to a GGUF file's key/value metadata, with errors that name the file and the key."""

    def __init__(self, fields: dict[str, Any], path: Path):
        self.fields = fields
        self.path = path

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        if key not in self.fields:
            if default is _REQUIRED:
                raise CheckpointError(f"{self.path}: GGUF metadata key {key!r} is missing; the file is incomplete "
                                      "or was not written by llama.cpp's converter.")
            return default
        return self.fields[key]

    def architecture(self) -> str:
        arch = self.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise CheckpointError(f"{self.path}: GGUF architecture {arch!r} is not supported; pktjax reads "
                                  f"{', '.join(SUPPORTED_ARCHS)} GGUF files. Load the model's Hugging Face "
                                  "checkpoint folder instead.")
        return arch

    def name(self) -> str:
        return " ".join(str(self.get(k, "")) for k in ("general.name", "general.basename")).lower()


def _float(value: float) -> float:
    """The shortest decimal that rounds to this float32 (1e-5 stays 1e-5, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _uniform(value: Any, key: str, path: Path) -> int:
    """An int, or a per-layer list whose entries are all equal."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise CheckpointError(f"{path}: {key} differs across layers ({value}); pktjax needs one value.")
        value = value[0]
    return int(value)


def config_from_metadata(meta: _Metadata, arch: str, tensors: dict[str, Any], path: Path) -> ModelConfig:
    """A :class:`ModelConfig` from ``<arch>.*`` metadata; vocabulary size and tying come from the tensors."""
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight tensor.")
    heads = _uniform(meta.get(f"{arch}.attention.head_count"), "attention.head_count", path)
    kv_heads = _uniform(meta.get(f"{arch}.attention.head_count_kv", heads), "attention.head_count_kv", path)
    hidden = int(meta.get(f"{arch}.embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", 0) or meta.get(f"{arch}.rope.dimension_count", 0)
                   or hidden // heads)
    theta = _float(meta.get(f"{arch}.rope.freq_base", 10000.0))
    window = meta.get(f"{arch}.attention.sliding_window", None)
    model_type = "mistral" if arch == "mistral" or (arch == "llama" and "mistral" in meta.name()) else arch
    eos = meta.get("tokenizer.ggml.eos_token_id", None)
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(tensors["token_embd.weight"].shape[0]),  # numpy order: [V, d]
        hidden_size=hidden,
        intermediate_size=_uniform(meta.get(f"{arch}.feed_forward_length"), "feed_forward_length", path),
        num_layers=int(meta.get(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(meta, arch, tensors, theta, head_dim, path),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        sliding_window=int(window) if window and model_type == "mistral" else None,
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_id=int(eos) if eos is not None else None,
    )


def _rope_scaling(meta: _Metadata, arch: str, tensors: dict[str, Any], theta: float, head_dim: int,
                  path: Path) -> tuple[tuple[str, Any], ...]:
    """Rope scaling as ModelConfig stores it: linear from metadata, llama3 from a ``rope_freqs`` tensor."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    rope: dict[str, Any] = {}
    if kind == "linear":
        rope = {"rope_type": "linear", "factor": _float(meta.get(f"{arch}.rope.scaling.factor"))}
    elif kind != "none":
        raise CheckpointError(f"{path}: rope scaling type {kind!r} is not supported (supported: none, linear, "
                              "and llama3 through a rope_freqs tensor).")
    if _ROPE_FREQS in tensors:
        if rope:
            raise CheckpointError(f"{path}: has both linear rope scaling and a rope_freqs tensor; cannot combine.")
        factors = _dequantize(tensors[_ROPE_FREQS], path).reshape(-1).astype(np.float64)
        rope = llama3_rope_from_factors(factors, theta, head_dim, path)
    return tuple(sorted(rope.items()))


def llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict[str, Any]:
    """A llama3 ``rope_scaling`` dict whose frequencies equal ``base_freq / factors`` (``factors: [head_dim/2]``).

    llama3 scaling divides each base frequency ``x`` by ``F`` (long wavelengths), by 1 (short ones) or, between,
    by ``1 / ((1 - s) / F + s)`` with ``s`` affine in ``x``. Only that line matters, so the standard Llama-3.x
    values are tried first and otherwise a line is fitted through the in-between factors; either way the
    result is checked to reproduce every factor.
    """
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != inv.shape:
        raise CheckpointError(f"{path}: rope_freqs has {factors.size} entries, expected head_dim/2 = {inv.size}.")
    if np.allclose(factors, 1.0, rtol=1e-6):
        return {}
    big = _float(factors.max())
    for rope in (_llama3_params(big, 1.0, 4.0, 8192), _fit_llama3(factors, inv, big)):
        if rope is not None and np.allclose(inv / _llama3_inv_freq(inv, rope), factors, rtol=1e-5):
            return rope
    raise CheckpointError(f"{path}: the rope_freqs tensor is not a llama3 RoPE scaling pktjax can express.")


def _llama3_params(factor: float, low: float, high: float, old_ctx: float) -> dict[str, Any]:
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": int(old_ctx) if float(old_ctx).is_integer() else old_ctx}


def _fit_llama3(factors: np.ndarray, inv: np.ndarray, big: float) -> dict[str, Any] | None:
    """Fit ``s(x) = a x + b`` (``s <= 0``: divide by ``big``; ``s >= 1``: no change) to ``factors`` at ``inv``."""
    long = np.isclose(factors, big, rtol=1e-6)
    short = np.isclose(factors, 1.0, rtol=1e-6)
    mid = ~long & ~short
    s = (1.0 / factors - 1.0 / big) / (1.0 - 1.0 / big)
    x_long = inv[long].max() if long.any() else None
    x_short = inv[short].min() if short.any() else None
    if mid.sum() >= 2:
        a, b = np.polyfit(inv[mid], s[mid], 1)
    elif mid.sum() == 1:
        xm, sm = float(inv[mid][0]), float(s[mid][0])
        bounds = [2.0 * sm / xm]  # any larger slope keeps b < 0 and both neighbours on their side
        if x_long is not None:
            bounds.append(sm / (xm - x_long))
        if x_short is not None:
            bounds.append((1.0 - sm) / (x_short - xm))
        a = max(bounds)
        b = sm - a * xm
    elif x_long is not None and x_short is not None:
        a = 1.0 / (x_short - x_long)
        b = -a * x_long
    elif x_long is not None:
        a, b = 1.0 / x_long, -2.0
    else:
        return None
    if a <= 0 or b >= 0:
        return None
    # s = (old_ctx * x / 2pi - low) / (high - low); take low = 1
    return _llama3_params(big, 1.0, 1.0 - 1.0 / b, -2.0 * math.pi * a / b)


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. ``w: [n_heads * head_dim, ...]`` (weight or bias).

    In each head the converter moved row ``c * head_dim/2 + j`` (half ``c``, pair ``j``) to ``2 j + c``.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_CHUNK_ROWS = 256  # rows dequantized per task: bounds temporary memory, and chunks run on several threads
_PLAIN_TYPES = ("F32", "F16", "BF16", "F64")  # cheap conversions, done in one go


def _dequantize(tensor, path: Path) -> np.ndarray:
    """One tensor as float32 in numpy (= Hugging Face) dimension order, dequantized in row chunks."""
    from gguf.quants import dequantize

    shape, data = tensor.shape, tensor.data  # numpy order; [rows, bytes per row]
    out = np.empty((data.shape[0], shape[-1]), np.float32)

    def work(start: int) -> None:
        out[start:start + _CHUNK_ROWS] = dequantize(data[start:start + _CHUNK_ROWS], tensor.tensor_type)

    starts = range(0, data.shape[0], _CHUNK_ROWS)
    try:
        if len(starts) == 1 or tensor.tensor_type.name in _PLAIN_TYPES:
            out[:] = dequantize(data, tensor.tensor_type)
        else:
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                list(pool.map(work, starts))  # numpy releases the GIL inside these kernels
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the "
                              "installed gguf package cannot dequantize (try a newer gguf).") from None
    return out.reshape(shape)


class GGUFSource:
    """The tensors of a GGUF file under Hugging Face names; ``get`` dequantizes one tensor per call."""

    def __init__(self, path: Path, tensors: dict[str, Any], cfg: ModelConfig, permuted: bool):
        self.path = path
        self._cfg = cfg
        self._permuted = permuted
        self._tensors: dict[str, Any] = {}
        unknown = []
        for name, tensor in tensors.items():
            hf = hf_name(name)
            if hf is not None:
                self._tensors[hf] = tensor
            elif name != _ROPE_FREQS:
                unknown.append(name)
        if unknown:
            raise CheckpointError(f"{path}: GGUF tensors {unknown[:3]} are not part of a {cfg.model_type} model "
                                  "pktjax knows; the file is a variant pktjax cannot load.")

    def names(self) -> list[str]:
        return list(self._tensors)

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise CheckpointError(f"{self.path}: GGUF file has no tensor {gguf_name(name)!r} ({name}) that the "
                                  "metadata implies; the file is incomplete.")
        return self._tensors[name]

    def location(self, name: str) -> str:
        return f"{self.path} (GGUF tensor {self._tensor(name).name!r})"

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensor(name).shape

    def get(self, name: str) -> np.ndarray:
        w = _dequantize(self._tensor(name), self.path)
        if self._permuted and ".q_proj." in name:
            w = unpermute_rows(w, self._cfg.num_heads)
        elif self._permuted and ".k_proj." in name:
            w = unpermute_rows(w, self._cfg.num_kv_heads)
        return w


# ----------------------------------------------------------------------------------------------- dequantized cache

_CACHE_FORMAT = 1  # bump when the dequantized layout changes, so old cache entries are not reused


def dequantized_cache_enabled() -> bool:
    """``PKTJAX_GGUF_CACHE=0`` turns the dequantized-weights cache off."""
    return os.environ.get("PKTJAX_GGUF_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def gguf_cache_key(path: Path) -> str:
    """A key for a GGUF file's contents without reading all of it: size, mtime and the sha256 of its first and
    last MiB (a re-downloaded or edited file gets a new key)."""
    st = path.stat()
    h = hashlib.sha256(f"{_CACHE_FORMAT}:{st.st_size}:{st.st_mtime_ns}:".encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, st.st_size - (1 << 20)))
        h.update(fh.read(1 << 20))
    return h.hexdigest()[:24]


def cached_source(path: Path, source: "GGUFSource", home: Path):
    """``source`` dequantized once into ``home/dequantized/<file stem>-<key>/model.safetensors`` (float32, written
    to a temporary name and renamed), then read from that file through a memory map on every later load.
    Returns a :class:`pktjax.safetensors_io.SafetensorsSource`."""
    folder = home / "dequantized" / f"{path.stem}-{gguf_cache_key(path)}"
    target = folder / "model.safetensors"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".model.safetensors.{os.getpid()}.tmp"
        names = source.names()
        try:
            write_safetensors_stream(tmp, [(n, source.shape(n), np.float32) for n in names], source.get,
                                     {"format": "pt", "source": path.name})
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return SafetensorsSource(folder)


def hf_name(name: str) -> str | None:
    """Hugging Face name of a GGUF tensor name (``blk.3.ffn_up.weight`` -> ``model.layers.3.mlp.up_proj.weight``)."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _BLOCK_RE.fullmatch(name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}"
    return None


def gguf_name(name: str) -> str:
    """GGUF name of a Hugging Face tensor name (inverse of :func:`hf_name`)."""
    for g, h in _TOP_NAMES.items():
        if h == name:
            return g
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    for g, h in _BLOCK_NAMES.items():
        if m and h == m.group(2):
            return f"blk.{m.group(1)}.{g}"
    return name
