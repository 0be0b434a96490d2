"""Loading and saving models: Hugging Face folders (safetensors, sharded or not) and GGUF files.

Every format is read through a *tensor source*: an object with ``names()``, ``shape(name)`` and
``get(name) -> np.ndarray`` keyed by Hugging Face tensor names (``model.layers.3.mlp.up_proj.weight``).
:func:`params_from_source` assembles the stacked pytree of :mod:`pktjax.model` from any source, one tensor at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

from pktjax.config import ModelConfig, read_config_json
from pktjax.errors import CheckpointError
from pktjax.registry import model_path
from pktjax.safetensors_io import SafetensorsFile, write_safetensors

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")
_LAYER_NAMES = {
    "input_norm": "input_layernorm.weight", "post_attn_norm": "post_attention_layernorm.weight",
    "q_proj": "self_attn.q_proj.weight", "k_proj": "self_attn.k_proj.weight",
    "v_proj": "self_attn.v_proj.weight", "o_proj": "self_attn.o_proj.weight",
    "q_bias": "self_attn.q_proj.bias", "k_bias": "self_attn.k_proj.bias", "v_bias": "self_attn.v_proj.bias",
    "gate_proj": "mlp.gate_proj.weight", "up_proj": "mlp.up_proj.weight", "down_proj": "mlp.down_proj.weight",
}
_TOP_NAMES = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}


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


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Per-layer weight shapes ``[out, in]`` of one decoder layer (no leading ``L``)."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    shapes = {
        "input_norm": (d,), "post_attn_norm": (d,),
        "q_proj": (cfg.q_dim, d), "k_proj": (cfg.kv_dim, d), "v_proj": (cfg.kv_dim, d), "o_proj": (d, cfg.q_dim),
        "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
    }
    if cfg.attention_bias:
        shapes.update(q_bias=(cfg.q_dim,), k_bias=(cfg.kv_dim,), v_bias=(cfg.kv_dim,))
    return shapes


def top_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def hf_layer_name(key: str, layer: int) -> str:
    return f"model.layers.{layer}.{_LAYER_NAMES[key]}"


def hf_tensor_names(cfg: ModelConfig) -> Iterator[tuple[tuple[str, ...], str]]:
    """``(pytree path, HF name)`` for every tensor; layer tensors give ``("layers", key, str(layer))``."""
    for key in top_shapes(cfg):
        yield (key,), _TOP_NAMES[key]
    for key in layer_shapes(cfg):
        for i in range(cfg.num_layers):
            yield ("layers", key, str(i)), hf_layer_name(key, i)


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
        params[key] = place(_checked(source, _TOP_NAMES[key], shape, npd), (key,))
    layers = {}
    for key, shape in layer_shapes(cfg).items():
        stacked = np.empty((cfg.num_layers, *shape), npd)
        for i in range(cfg.num_layers):
            stacked[i] = _checked(source, hf_layer_name(key, i), shape, npd)
        layers[key] = place(stacked, ("layers", key))
        del stacked
    params["layers"] = layers
    return params


def load_model(path: str | os.PathLike, dtype=jnp.float32, mesh=None, *, cache_gguf: bool = True) -> Model:
    """Load a checkpoint folder (``config.json`` + safetensors) or a ``.gguf`` file into a :class:`Model`.

    A ``.gguf`` file is dequantized once into ``$PKTJAX_HOME/dequantized/`` (float32 safetensors) and later loads
    read that copy (``cache_gguf=False`` or ``PKTJAX_GGUF_CACHE=0``: dequantize in memory every time).

    With a ``jax.sharding.Mesh``, every tensor goes straight into its sharding (:mod:`pktjax.sharding`'s rules),
    each device reading only its own slice from disk. A hub id ``org/name[@revision]`` that is not a local path
    loads its snapshot in Hugging Face's standard cache (:func:`pktjax.registry.model_path`).
    """
    path = model_path(path)
    if path.suffix == ".gguf" or _is_gguf(path):
        from pktjax.gguf_io import cached_source, dequantized_cache_enabled, load_gguf
        from pktjax.registry import home

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
        from pktjax.sharding import load_params

        params = load_params(cfg, source, dtype, mesh)
    return Model(params=params, config=cfg.__class__(**{**cfg.__dict__, "torch_dtype": jnp.dtype(dtype).name}),
                 source=str(path))


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """A checkpoint's config without its weights: ``config.json`` of a folder, or a ``.gguf`` file's metadata."""
    path = model_path(path)
    if path.suffix == ".gguf" or _is_gguf(path):
        from pktjax.gguf_io import load_gguf

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
        yield _TOP_NAMES[key], _to_numpy(params[key])
    for key in layer_shapes(cfg):
        stacked = params["layers"][key]
        for i in range(cfg.num_layers):
            yield hf_layer_name(key, i), _to_numpy(stacked[i])


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


def save_model(model: Model, path: str | os.PathLike, shard_bytes: int = 4 << 30) -> Path:
    """Save ``model`` as a Hugging Face checkpoint folder that ``transformers`` loads, atomically.

    Writes into a temporary sibling folder and renames it into place, so a crash never leaves a half-written
    checkpoint. Tokenizer files of the source folder are copied along. Refuses to overwrite a non-empty folder.
    """
    path = Path(path).expanduser()
    with atomic_folder(path, "output") as tmp:
        cfg = model.config
        dtype = jax.tree.leaves(model.params)[0].dtype
        hf = cfg.to_hf_dict()
        hf["torch_dtype"] = jnp.dtype(dtype).name
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        _write_shards(tmp, iter_hf_tensors(model.params, cfg), shard_bytes)
        copy_tokenizer(model.source, tmp)
    return path


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
        from pktjax.tokenizer import load_tokenizer

        try:
            load_tokenizer(src).save_pretrained(dest)
        except CheckpointError as e:  # the weights are still worth saving
            warnings.warn(f"saving without a tokenizer: {e}", stacklevel=3)
