"""Loading and saving models: Hugging Face folders (safetensors, sharded or not) and GGUF files.

Every format is read through a *tensor source*: an object with ``names()``, ``shape(name)`` and
``get(name) -> np.ndarray`` keyed by Hugging Face tensor names (``model.layers.3.mlp.up_proj.weight``).
:func:`params_from_source` assembles the stacked pytree of :mod:`pktjax.model` from any source, one tensor at a time.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

from pktjax.config import ModelConfig
from pktjax.errors import CheckpointError
from pktjax.gguf_io import cached_source, dequantized_cache_enabled, load_gguf
from pktjax.layout import TOP_NAMES, hf_layer_name, layer_shapes, top_shapes
from pktjax.registry import home, model_path
from pktjax.runfolder import atomic_folder
from pktjax.safetensors_io import SafetensorsSource, write_safetensors
from pktjax.sharding import load_params
from pktjax.tokenizer import load_tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


@struct.dataclass
class Model:
    """A loaded model: ``params`` (pytree, see :mod:`pktjax.model`) and its static ``config``."""

    params: dict[str, Any]
    config: ModelConfig = struct.field(pytree_node=False)
    source: str | None = struct.field(pytree_node=False, default=None)


class TensorSource(Protocol):
    path: Path

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> np.ndarray: ...


def _np_dtype(dtype: Any) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(jnp.dtype(dtype).name)


def _checked(source: TensorSource, name: str, want: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    got = source.shape(name)
    if tuple(got) != tuple(want):
        where = source.location(name) if hasattr(source, "location") else source.path
        raise CheckpointError(f"{where}: tensor {name!r} has shape {list(got)} but the config implies "
                              f"{list(want)}. The weights do not belong to this config.")
    return source.get(name).astype(dtype, copy=False)


def _place_default(array: np.ndarray, path: tuple[str, ...]) -> jax.Array:
    return jnp.asarray(array)


def params_from_source(cfg: ModelConfig, source: TensorSource, dtype=jnp.float32,
                       place=_place_default) -> dict[str, Any]:
    """Build the stacked parameter pytree, one tensor read at a time. ``place(np_array, path)`` puts each
    assembled array on device(s); the default is ``jnp.asarray``."""
    npd = _np_dtype(dtype)
    params: dict[str, Any] = {}
    for key, shape in top_shapes(cfg).items():
        params[key] = place(_checked(source, TOP_NAMES[key], shape, npd), (key,))
    layers = {}
    for key, shape in layer_shapes(cfg).items():
        stacked = np.empty((cfg.num_layers, *shape), npd)
        for i in range(cfg.num_layers):
            stacked[i] = _checked(source, hf_layer_name(key, i), shape, npd)
        layers[key] = place(stacked, ("layers", key))
        del stacked
    params["layers"] = layers
    return params


def release_host_memory() -> None:
    """Hand the host memory of freed arrays back to the operating system.

    glibc keeps freed blocks below its mmap threshold (up to 32 MiB, e.g. a small model's per-layer weights, or
    activations) in its arenas, where only later small allocations can reuse them: a model loaded after another
    one was dropped then sits on top of the first one's freed memory (on the real Qwen pair, 6.5 GB left by the
    teacher's evaluation before its locate). ``malloc_trim`` returns those pages; a no-op off glibc."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def load_model(path: str | os.PathLike, dtype=jnp.float32, mesh=None, *, cache_gguf: bool = True) -> Model:
    """Load a checkpoint folder (``config.json`` + safetensors) or a ``.gguf`` file into a :class:`Model`.

    A ``.gguf`` file is dequantized once into ``$PKTJAX_HOME/dequantized/`` (float32 safetensors) and later loads
    read that copy (``cache_gguf=False`` or ``PKTJAX_GGUF_CACHE=0``: dequantize in memory every time).

    With a ``jax.sharding.Mesh``, every tensor goes straight into its sharding (:mod:`pktjax.sharding`'s rules),
    each device reading only its own slice from disk. A hub id ``org/name[@revision]`` that is not a local path
    loads its snapshot in Hugging Face's standard cache (:func:`pktjax.registry.model_path`).
    """
    path = model_path(path)
    release_host_memory()  # room for this model where a dropped one was
    if path.suffix == ".gguf" or _is_gguf(path):
        cfg, source = load_gguf(path)
        if cache_gguf and dequantized_cache_enabled():
            source = cached_source(path, source, home())
    else:
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or folder.")
        if path.is_file():
            raise CheckpointError(f"{path}: a file that is neither a .gguf nor a checkpoint folder.")
        cfg = ModelConfig.from_file(path / "config.json")
        source = SafetensorsSource(path)
    if mesh is None:
        params = params_from_source(cfg, source, dtype)
    else:
        params = load_params(cfg, source, dtype, mesh)
    return Model(params=params, config=cfg.__class__(**{**cfg.__dict__, "torch_dtype": jnp.dtype(dtype).name}),
                 source=str(path))


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """A checkpoint's config without its weights: ``config.json`` of a folder, or a ``.gguf`` file's metadata."""
    path = model_path(path)
    if path.suffix == ".gguf" or _is_gguf(path):
        return load_gguf(path)[0]
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json here; give a checkpoint folder or a .gguf file.")
    return ModelConfig.from_file(path / "config.json")


def _is_gguf(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def _to_numpy(x: jax.Array) -> np.ndarray:
    return np.asarray(jax.device_get(x))


def iter_hf_tensors(params: dict[str, Any], cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """``(HF name, numpy array)`` for every tensor of ``params``, one layer slice at a time."""
    for key in top_shapes(cfg):
        yield TOP_NAMES[key], _to_numpy(params[key])
    for key in layer_shapes(cfg):
        stacked = params["layers"][key]
        for i in range(cfg.num_layers):
            yield hf_layer_name(key, i), _to_numpy(stacked[i])


def save_model(model: Model, path: str | os.PathLike, shard_bytes: int = 4 << 30) -> Path:
    """Save ``model`` as a Hugging Face checkpoint folder that ``transformers`` loads, atomically.

    Writes into a temporary sibling folder and renames it into place, so a crash never leaves a half-written
    checkpoint. Tokenizer files of the source folder are copied along. Refuses to overwrite a non-empty folder.
    """
    path = Path(path).expanduser()
    with atomic_folder(path, "output") as tmp:
        write_model(model, tmp, shard_bytes)
        copy_tokenizer(model.source, tmp)
    return path


def write_model(model: Model, folder: Path, shard_bytes: int = 4 << 30) -> None:
    """``config.json`` and the safetensors shards of ``model`` into the existing ``folder`` (not atomic by itself:
    :func:`save_model` and :func:`pktjax.tiny.save_random_model` write into an :func:`atomic_folder`)."""
    cfg = model.config
    dtype = jax.tree.leaves(model.params)[0].dtype
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = jnp.dtype(dtype).name
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    _write_shards(folder, iter_hf_tensors(model.params, cfg), shard_bytes)


def _write_shards(folder: Path, tensors: Iterator[tuple[str, np.ndarray]], shard_bytes: int) -> None:
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    size = 0
    for name, arr in tensors:
        if shards[-1] and size + arr.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, arr))
        size += arr.nbytes
    if len(shards) == 1:
        write_safetensors(folder / "model.safetensors", shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(folder / fname, shard)
        for name, arr in shard:
            weight_map[name] = fname
            total += arr.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def copy_tokenizer(source: str | None, dest: Path) -> None:
    """Copy the tokenizer files of checkpoint folder ``source`` into ``dest``, or build and save a ``.gguf``
    file's tokenizer there."""
    if source is None:
        return
    src = Path(source)
    if src.is_dir():
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dest / name)
    elif src.suffix == ".gguf":
        try:
            load_tokenizer(src).save_pretrained(dest)
        except CheckpointError as e:  # the weights are still worth saving
            warnings.warn(f"saving without a tokenizer: {e}", stacklevel=3)
