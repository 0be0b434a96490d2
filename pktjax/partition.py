"""The mesh axes and the partition specs that need no devices: how a dimension falls back when its axes do not
divide it, the batch layout of activations, and the constraint that pins an activation to that layout inside a
traced function (:mod:`pktjax.model` applies it; :mod:`pktjax.sharding` builds meshes and places arrays)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)
BATCH = (DATA, FSDP)  # the mesh axes that split a batch of activations


def fit_spec(shape: Sequence[int], axes: Sequence[Any], mesh_shape: Mapping[str, int]) -> P:
    """``PartitionSpec`` for ``shape`` with ``axes`` on its trailing dims; each dim keeps the longest prefix of its
    axes whose sizes divide it (so a non-divisible dim falls back to fewer axes, then to replication)."""
    axes = tuple(axes)[-len(shape):] if shape else ()
    spec = [None] * (len(shape) - len(axes))
    for dim, ax in zip(shape[len(spec):], axes):
        group = (ax,) if isinstance(ax, str) else tuple(ax or ())
        while group and dim % math.prod(mesh_shape[a] for a in group):
            group = group[:-1]
        spec.append(None if not group else group[0] if len(group) == 1 else group)
    return P(*spec)


def batch_spec(shape: Sequence[int], mesh_shape: Mapping[str, int], last: Any = None) -> P:
    """Activations ``[B, ...]``: batch on ``(data, fsdp)``; ``last`` optionally names the last dim's axis
    (``"tensor"`` for logits ``[B, T, V]``)."""
    axes = (BATCH,) + (None,) * (len(shape) - 1)
    if last is not None and len(shape) > 1:
        axes = axes[:-1] + (last,)
    return fit_spec(tuple(shape), axes, mesh_shape)


def constrain_batch(x: jax.Array, last: Any = None) -> jax.Array:
    """``x [B, ..., n]`` constrained to :func:`batch_spec` (rows on ``(data, fsdp)``, ``last`` naming the last
    dim's axis) on the mesh of the enclosing ``jax.sharding.use_abstract_mesh`` (what
    :func:`pktjax.sharding.sharded_jit` traces under); unchanged without one.

    Why: the weights' input dims are split over ``fsdp``, and without this XLA's partitioner may follow them,
    splitting the activations' hidden dim instead of their rows; every device then holds every row (for the
    logits, the whole micro-batch's ``[B, T, V]``), several times what the rows' share costs. Pinned, the weights
    are gathered per layer (FSDP) and the values do not change beyond rounding."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, batch_spec(x.shape, mesh.shape, last))
