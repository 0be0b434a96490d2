"""Device meshes, partition rules and sharded loading (SPEC §7).

Every mesh has the three axes ``data``, ``fsdp`` and ``tensor`` (unnamed ones have size 1), so the same rules
serve one CPU, eight simulated devices, a GPU or a TPU pod slice:

- ``fsdp`` splits the *input* dimension of column-parallel weights and the *output* dimension of row-parallel
  ones (parameters, gradients and optimizer states are spread over it, gathered per layer inside the step);
- ``tensor`` splits attention heads / FFN units / the vocabulary: ``q, k, v, gate, up`` and ``embed, lm_head`` are
  column-parallel (output rows on ``tensor``), ``o, down`` are row-parallel (input columns on ``tensor``);
- ``data`` (with ``fsdp``) splits the batch of activations.

A rule gives the mesh axes of the *trailing* dimensions of a leaf, found by the leaf's path in its pytree, so
stacked layers ``[L, out, in]``, extracted knowledge ``[K, n, d]``, LoRA factors and optimizer moments (whose paths
end like the parameter they mirror) all share one table. A dimension that its axes do not divide evenly falls back
to fewer axes, down to replication.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import struct
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pktjax.config import ModelConfig
from pktjax.errors import CheckpointError, ConfigError
from pktjax.layout import hf_tensor_names, layer_shapes, top_shapes
from pktjax.model import forward
from pktjax.partition import AXES, BATCH, DATA, FSDP, TENSOR, batch_spec, fit_spec  # noqa: F401 (re-exported)
from pktjax.safetensors_io import DTYPES


_COL = r"(q|k|v|gate|up)_proj"
_ROW = r"(o|down)_proj"
# (regex searched in the "/"-joined leaf path, mesh axes of the trailing dims). First match wins; no match means
# replicated. The aligner's W1 [d_T, d_T] is column-parallel and W2 [d_S, d_T] row-parallel, so relu(W1 x) stays
# split on ``tensor`` between the two products.
RULES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    (rf"{_COL}/a$", (None, FSDP)),            # LoRA A [.., r, in]
    (rf"{_COL}/b$", (TENSOR, None)),          # LoRA B [.., out, r]
    (rf"{_ROW}/a$", (None, TENSOR)),
    (rf"{_ROW}/b$", (FSDP, None)),
    (r"embed/a$", (None, TENSOR)),            # LoRA A [r, V]
    (r"embed/b$", (FSDP, None)),              # LoRA B [d, r]
    (r"lm_head/a$", (None, FSDP)),            # LoRA A [r, d]
    (r"lm_head/b$", (TENSOR, None)),          # LoRA B [V, r]
    (r"(^|/)(w1|W1)$", (TENSOR, FSDP)),       # aligner W1 [d_T, d_T]
    (r"(^|/)(w2|W2)$", (FSDP, TENSOR)),       # aligner W2 [d_S, d_T]
    (rf"{_COL}$", (TENSOR, FSDP)),            # [.., out, in]
    (rf"{_ROW}$", (FSDP, TENSOR)),
    (r"(^|/)(embed|lm_head)$", (TENSOR, FSDP)),  # [V, d]
    (r"(_bias|_norm|norm)$", ()),             # biases and norm weights: replicated
)


# ----------------------------------------------------------------------------------------------------------- meshes

def parse_mesh_spec(spec: str | None, n_devices: int) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> ``{"data": 2, "fsdp": 2, "tensor": 2}`` for ``n_devices`` devices.

    Unnamed axes have size 1; one axis may be ``-1`` (the devices left over). ``None`` or ``""`` puts every
    device on ``fsdp``. The product must equal ``n_devices``.
    """
    sizes = {a: 1 for a in AXES}
    if not spec:
        sizes[FSDP] = n_devices
        return sizes
    seen = set()
    for part in spec.replace(" ", "").split(","):
        name, eq, value = part.partition("=")
        if not eq or name not in AXES or name in seen:
            raise ConfigError(f"mesh {spec!r}: expected comma-separated axis=size with axes from {', '.join(AXES)} "
                              f"(each at most once), e.g. 'data=2,fsdp=2,tensor=2'; got {part!r}.")
        try:
            sizes[name] = int(value)
        except ValueError:
            raise ConfigError(f"mesh {spec!r}: size of {name!r} must be an integer, got {value!r}.") from None
        seen.add(name)
    return _resolve_wildcard(spec, sizes, n_devices)


def spec_devices(spec: str) -> int:
    """The device count a mesh spec names by itself: the product of its sizes (a ``-1`` axis counts as 1)."""
    sizes = [part.partition("=")[2].strip() for part in spec.split(",")]
    return math.prod(int(v) for v in sizes if v.isdigit()) or 1


def _resolve_wildcard(spec: str, sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
        raise ConfigError(f"mesh {spec!r}: sizes must be positive (at most one axis may be -1).")
    known = math.prod(s for s in sizes.values() if s > 0)
    if free:
        if n_devices % known:
            raise ConfigError(f"mesh {spec!r}: {n_devices} devices do not split into a multiple of {known}.")
        sizes[free[0]] = n_devices // known
    total = math.prod(sizes.values())
    if total != n_devices:
        raise ConfigError(f"mesh {spec!r}: the axis sizes multiply to {total} but {n_devices} devices are present; "
                          f"make the product {n_devices} (or use -1 for one axis).")
    return sizes


def make_mesh(spec: str | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh over ``devices`` (default: all devices of all processes) from ``spec``.

    The axes are ``AxisType.Auto``: jit in/out shardings place the arrays and XLA partitions the program.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


# ------------------------------------------------------------------------------------------------ partition rules

def path_str(path: Sequence[Any]) -> str:
    """A jax key path (or a tuple of names) as ``"a/b/c"``."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append(str(k))
    return "/".join(parts)


def logical_axes(path: str) -> tuple[Any, ...]:
    """The mesh axes a rule gives the trailing dimensions of the leaf at ``path`` (``()``: replicated)."""
    for pattern, axes in RULES:
        if re.search(pattern, path):
            return axes
    return ()


def spec_for(path: str, shape: Sequence[int], mesh_shape: Mapping[str, int]) -> P:
    """The ``PartitionSpec`` of one leaf from its path and shape."""
    return fit_spec(tuple(shape), logical_axes(path), mesh_shape)


def param_specs(tree: Any, mesh_shape: Mapping[str, int]) -> Any:
    """``PartitionSpec`` per leaf of params, LoRA, aligner or optimizer state (arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(lambda p, x: spec_for(path_str(p), np.shape(x), mesh_shape), tree)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` per leaf of ``tree`` (params, LoRA, aligner, optimizer state or their shapes)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh.shape))


def shard(tree: Any, mesh: Mesh) -> Any:
    """``tree`` placed on ``mesh`` by its partition rules."""
    return jax.device_put(tree, param_shardings(tree, mesh))


def batch_sharding(shape: Sequence[int], mesh: Mesh, last: Any = None) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(shape, mesh.shape, last))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(arrays: Any, mesh: Mesh) -> Any:
    """Every array of ``arrays`` (leading batch dim) split over ``(data, fsdp)``."""
    return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(np.shape(x), mesh)), arrays)


def per_device_bytes(shape: Sequence[int], dtype: Any, spec: P, mesh_shape: Mapping[str, int]) -> int:
    """Bytes one device holds of an array of ``shape`` laid out by ``spec`` (ceil division per dim)."""
    n = 1
    for i, dim in enumerate(shape):
        ax = spec[i] if i < len(spec) else None
        group = () if ax is None else (ax,) if isinstance(ax, str) else tuple(ax)
        n *= -(-dim // math.prod(mesh_shape[a] for a in group))
    return n * jnp.dtype(dtype).itemsize


# ------------------------------------------------------------------------------------------------- sharded steps

def batch_shardings(tree: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` per leaf of a batch (``ids, mask, labels [B, T]``, ``weight [B]``): rows split."""
    return jax.tree.map(lambda x: batch_sharding(np.shape(x), mesh), tree)


def _merge(dyn: Sequence[Any], static: Mapping[int, Any]) -> list[Any]:
    it = iter(dyn)
    return [static[i] if i in static else next(it) for i in range(len(dyn) + len(static))]


def sharded_jit(fn: Callable, mesh: Mesh, example_args: Sequence[Any], *, static_argnums: Sequence[int] = (),
                batch_argnums: Sequence[int] = (), donate_argnums: Sequence[int] = ()) -> Callable:
    """``jax.jit(fn)`` with explicit ``in_shardings`` / ``out_shardings`` derived from the partition rules.

    Arguments at ``batch_argnums`` are split on their leading (batch) dim; every other array argument (params,
    aligner, LoRA, knowledge, optimizer state) follows the rules of its leaf paths; outputs follow the rules
    applied to ``jax.eval_shape(fn, *example_args)`` (gradients mirror their parameters; scalars are replicated).
    ``fn`` is traced under ``mesh`` (``jax.sharding.use_abstract_mesh``), so the model's activations keep the
    batch layout (:func:`pktjax.partition.constrain_batch`) rather than following the weights' ``fsdp`` split.
    Call the result with the same positional arguments as ``fn`` (static ones included).
    """
    static = {i: example_args[i] for i in static_argnums}
    dyn = [a for i, a in enumerate(example_args) if i not in static]
    dyn_index = [i for i in range(len(example_args)) if i not in static]
    in_sh = tuple(batch_shardings(a, mesh) if i in batch_argnums else param_shardings(a, mesh)
                  for i, a in zip(dyn_index, dyn))
    out_shape = jax.eval_shape(lambda *d: fn(*_merge(d, static)), *dyn)

    @functools.wraps(fn)
    def in_mesh(*a, **k):  # traced under the mesh, so that the model's activation constraints apply
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*a, **k)

    jitted = jax.jit(in_mesh, static_argnums=tuple(static_argnums), donate_argnums=tuple(donate_argnums),
                     in_shardings=in_sh, out_shardings=param_shardings(out_shape, mesh))

    def call(*args):
        args = list(args)
        for i, sh in zip(dyn_index, in_sh):  # no-op for arguments already laid out as the rules say
            args[i] = jax.device_put(args[i], sh)
        return jitted(*args)

    call.jitted = jitted
    return call


def cached_sharded_jit(fn: Callable, mesh: Mesh, *, static_argnums: Sequence[int] = (),
                       batch_argnums: Sequence[int] = (), donate_argnums: Sequence[int] = ()) -> Callable:
    """:func:`sharded_jit` of ``fn``, built on the first call of each argument signature (tree structures, shapes
    and dtypes of the arrays, values of the static arguments): one call site serves every length bucket."""
    built: dict[tuple, Callable] = {}

    def call(*args):
        key = tuple(args[i] if i in static_argnums else _signature(a) for i, a in enumerate(args))
        if key not in built:
            built[key] = sharded_jit(fn, mesh, args, static_argnums=static_argnums, batch_argnums=batch_argnums,
                                     donate_argnums=donate_argnums)
        return built[key](*args)

    return call


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x)))) for x in leaves)


def as_mesh(mesh: Mesh | str | None) -> Mesh | None:
    """A trainer's ``mesh=`` argument: ``None`` (one device, no sharding), a :class:`Mesh`, or a spec string such
    as ``"data=2,fsdp=2,tensor=2"`` (a bad one, or one that does not match the device count, is a
    :class:`ConfigError`)."""
    return make_mesh(mesh) if isinstance(mesh, str) else mesh


def place(tree: Any, mesh: Mesh | None) -> Any:
    """A small training state (aligner, LoRA, optimizer state) in fresh buffers that a step may donate: on ``mesh``
    laid out by the rules, or without a mesh as uncommitted arrays of the default device (like a fresh state).

    Process-local arrays go through a host copy (every process holds the same values), so this also places them
    on a mesh that spans several processes; arrays already spread over processes are copied device to device.
    """
    host = jax.tree.map(lambda x: np.asarray(x) if getattr(x, "is_fully_addressable", True) else x, tree)
    if mesh is None:
        return jax.tree.map(jnp.asarray, host)
    return jax.device_put(host, param_shardings(host, mesh), may_alias=False)


def to_host(tree: Any) -> Any:
    """``tree`` as numpy arrays on every process (gathered across processes when it spans several); all
    processes must call it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def sharded_forward(cfg: ModelConfig, mesh: Mesh, params: Any, batch_shape: Sequence[int]) -> Callable:
    """``f(params, ids [B, T], mask [B, T]) -> logits [B, T, V]`` jitted with explicit shardings: params by their
    rules, the batch on ``(data, fsdp)``, logits on ``(data, fsdp)`` x ``tensor`` (vocabulary)."""
    b, t = batch_shape
    ids = batch_sharding((b, t), mesh)
    out = batch_sharding((b, t, cfg.vocab_size), mesh, last=TENSOR)
    return jax.jit(lambda p, i, m: forward(p, cfg, i, m),
                   in_shardings=(param_shardings(params, mesh), ids, ids), out_shardings=out)


def vocab_log_prob(x: jax.Array, w_u: jax.Array, target: jax.Array, mesh: Mesh) -> jax.Array:
    """``log_softmax(x W_U^T)[:, target]`` for ``x [n, d]``, ``w_u [V, d]``, ``target []`` with the vocabulary split
    over ``tensor``: each device projects onto its ``V / tensor`` rows, and the log-sum-exp and the target logit are
    combined with explicit ``pmax`` / ``psum`` collectives. Returns ``[n]`` float32 (replicated)."""
    v = w_u.shape[0]
    t = mesh.shape[TENSOR]
    if v % t:
        raise ConfigError(f"vocab_log_prob: vocabulary {v} is not divisible by the tensor axis ({t}).")

    def local(xs, w, tgt):
        z = jnp.einsum("nd,vd->nv", xs.astype(w.dtype), w, preferred_element_type=jnp.float32,
                       precision=jax.lax.Precision.HIGHEST)
        m = jax.lax.pmax(jnp.max(z, axis=1), TENSOR)
        lse = m + jnp.log(jax.lax.psum(jnp.sum(jnp.exp(z - m[:, None]), axis=1), TENSOR))
        start = jax.lax.axis_index(TENSOR) * w.shape[0]
        mine = (tgt >= start) & (tgt < start + w.shape[0])
        picked = jnp.where(mine, jnp.take(z, jnp.clip(tgt - start, 0, w.shape[0] - 1), axis=1), 0.0)
        return jax.lax.psum(picked, TENSOR) - lse

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(TENSOR, None), P()), out_specs=P(), check_vma=False)
    return fn(x, w_u, target)


# ------------------------------------------------------------------------------------------------ sharded loading

class SliceReader:
    """Reads ``index`` slices of named tensors of a tensor source without loading whole tensors when it can.

    Sources with a ``get_slice(name, index)`` method are asked directly; safetensors folders are memory-mapped
    (only the pages of the slice are read); any other source falls back to ``get(name)[index]``.
    """

    def __init__(self, source: Any):
        self.source = source
        self._maps = _safetensors_maps(source) if not hasattr(source, "get_slice") else {}

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        if hasattr(self.source, "get_slice"):
            return np.asarray(self.source.get_slice(name, index))
        if name in self._maps:
            return np.array(self._maps[name][index])
        return np.asarray(self.source.get(name))[index]


def _safetensors_maps(source: Any) -> dict[str, np.ndarray]:
    """``{name: read-only np.memmap}`` for every tensor of a safetensors folder source (else ``{}``)."""
    folder = getattr(source, "path", None)
    if folder is None or not os.path.isdir(folder):
        return {}
    wanted = set(source.names())
    maps: dict[str, np.ndarray] = {}
    for file in sorted(os.listdir(folder)):
        if not file.endswith(".safetensors"):
            continue
        path = os.path.join(folder, file)
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, e in header.items():
            shape = tuple(e.get("shape", ())) if isinstance(e, dict) else ()
            if name not in wanted or name in maps or math.prod(shape) == 0:
                continue
            start = 8 + n + e["data_offsets"][0]
            maps[name] = np.memmap(path, DTYPES[e["dtype"]], "r", offset=start, shape=shape)
    return maps


def _check_shape(source: Any, name: str, want: tuple[int, ...]) -> None:
    got = tuple(source.shape(name))
    if got != tuple(want):
        raise CheckpointError(f"{getattr(source, 'path', 'checkpoint')}: tensor {name!r} has shape {list(got)} but "
                              f"the config implies {list(want)}. The weights do not belong to this config.json.")


def _index_key(index: tuple[slice, ...]) -> tuple:
    return tuple((s.start, s.stop, s.step) for s in index)


def _streamed(shape: tuple[int, ...], sharding: NamedSharding, dtype: np.dtype,
              read: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
    """``make_array_from_callback`` whose callback reads only the requested ``index``; devices that hold the same
    slice share one host buffer, dropped once the array is on the devices."""
    memo: dict[tuple, np.ndarray] = {}

    def callback(index: tuple[slice, ...]) -> np.ndarray:
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        key = _index_key(index)
        if key not in memo:
            memo[key] = np.ascontiguousarray(read(index), dtype=dtype)
        return memo[key]

    return jax.make_array_from_callback(shape, sharding, callback)


def _layer_reader(reader: SliceReader, names: list[str]) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """Reads ``index = (layers, *rest)`` of a stacked tensor ``[L, ...]`` one layer slice at a time."""
    def read(index: tuple[slice, ...]) -> np.ndarray:
        layers = range(*index[0].indices(len(names)))
        return np.stack([reader.read(names[i], tuple(index[1:])) for i in layers])

    return read


def load_params(cfg: ModelConfig, source: Any, dtype: Any = jnp.float32, mesh: Mesh | None = None) -> dict[str, Any]:
    """The parameter pytree of :mod:`pktjax.model`, each tensor placed straight into its sharding on ``mesh``.

    Every device's slice is read from ``source`` (a tensor source of :mod:`pktjax.checkpoint`) as the array is
    built: a stacked ``[L, out, in]`` tensor reads, for each layer of the device's range, only the rows and columns
    the device holds. At most one stacked tensor's local slices are on the host at a time (on a multi-host pod,
    only this host's devices' slices); no full host copy of the model is ever made.
    """
    mesh = make_mesh("fsdp=1", jax.devices()[:1]) if mesh is None else mesh
    npd = np.dtype(jnp.dtype(dtype))
    reader = SliceReader(source)
    names: dict[tuple[str, ...], str] = dict(hf_tensor_names(cfg))
    params: dict[str, Any] = {"layers": {}}
    for key, shape in top_shapes(cfg).items():
        _check_shape(source, names[(key,)], shape)
        sharding = NamedSharding(mesh, spec_for(key, shape, mesh.shape))
        params[key] = _streamed(shape, sharding, npd, lambda idx, n=names[(key,)]: reader.read(n, idx))
    for key, shape in layer_shapes(cfg).items():
        layer_names = [names[("layers", key, str(i))] for i in range(cfg.num_layers)]
        for n in layer_names:
            _check_shape(source, n, shape)
        full = (cfg.num_layers, *shape)
        sharding = NamedSharding(mesh, spec_for(f"layers/{key}", full, mesh.shape))
        params["layers"][key] = _streamed(full, sharding, npd, _layer_reader(reader, layer_names))
    return params


# ---------------------------------------------------------------------------------------------------- multi-host

def launched_on_cluster(env: Mapping[str, str] | None = None) -> bool:
    """Whether this process is one of several: ``PKTJAX_DISTRIBUTED=1`` (set by ``tpu_setup/launch.sh`` on a TPU
    VM or slice, where jax finds the workers through the metadata server), several ``TPU_WORKER_HOSTNAMES`` or a
    ``MEGASCALE_COORDINATOR_ADDRESS`` (multislice), a SLURM or Open MPI job of several tasks, or
    ``JAX_COORDINATOR_ADDRESS`` with ``JAX_NUM_PROCESSES > 1``."""
    env = os.environ if env is None else env
    if env.get("PKTJAX_DISTRIBUTED", "").lower() in ("1", "true", "yes"):
        return True
    if env.get("JAX_COORDINATOR_ADDRESS") and int(env.get("JAX_NUM_PROCESSES", "1")) > 1:
        return True
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    return any(int(env.get(k, "1") or "1") > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize_distributed(env: Mapping[str, str] | None = None, timeout_s: int = 300) -> bool:
    """Call ``jax.distributed.initialize()`` when launched as one of several processes; a no-op otherwise.

    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` are passed on when set; on a Cloud
    TPU pod, SLURM or Open MPI jax detects them itself. Must run before any other jax call touches the devices.
    Returns whether this is a multi-process run.
    """
    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return True
    if not launched_on_cluster(env):
        return False
    kwargs: dict[str, Any] = {"initialization_timeout": timeout_s}
    names = {"JAX_COORDINATOR_ADDRESS": "coordinator_address", "JAX_NUM_PROCESSES": "num_processes",
             "JAX_PROCESS_ID": "process_id"}
    for var, arg in names.items():
        if env.get(var):
            kwargs[arg] = env[var] if arg == "coordinator_address" else int(env[var])
    jax.distributed.initialize(**kwargs)
    return True


def is_main_process() -> bool:
    """True on process 0: the one that logs and writes files shared by all processes."""
    return jax.process_index() == 0


def main_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on process 0 only."""
    if is_main_process():
        print(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------- checkpoints

def save_state(path: str | os.PathLike, tree: Any) -> None:
    """Save a (sharded) pytree of arrays with orbax; every process calls it and writes its own shards."""
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.abspath(path), tree)
    ckpt.wait_until_finished()


def restore_state(path: str | os.PathLike, like: Any, mesh: Mesh) -> Any:
    """Restore a pytree saved by :func:`save_state` straight into ``mesh``'s shardings (any mesh shape).

    ``like`` gives the structure, shapes and dtypes (arrays or ``ShapeDtypeStruct``s).
    """
    import orbax.checkpoint as ocp

    shardings = param_shardings(like, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), like, shardings)
    return ocp.StandardCheckpointer().restore(os.path.abspath(path), target)
