"""Attribution scores kept on disk, so that an example is located once per model and option, however many
aligner steps, fused steps and seeds select from it (scores depend only on the frozen model and the example).

One folder per model (e.g. ``<run>/attribution_cache/teacher``), one ``.npz`` file per (example token ids,
target, mode, attention)::

    fingerprint   the model's fingerprint (:func:`model_fingerprint`); another model's entry is refused
    mode, attention, ids [T], target
    layer_attn, layer_ffn [L]      every layer's score
    ffn [L, f], attn [L, H*hd]     neuron scores; rows not scored are -inf
    ffn_rows, attn_rows [L]        which rows hold scores

    sha256                         of every other field (:func:`_digest`)

Any ``K`` (as long as the example's top ``K`` layers are among the scored rows) and any rate is cut from an entry.
Entries are written by :func:`pktjax.runfolder.atomic_write` (a fsynced temporary, then a rename), so a reader
never sees half of one; an entry that does not match its ``sha256`` (or cannot be read) is damaged: it is removed,
said on stderr, and the example scored again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import functools
import io
import json
import math
import os
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from pktjax.config import ModelConfig
from pktjax.errors import ConfigError
from pktjax.model import Params
from pktjax.runfolder import atomic_write
from pktjax.select import Attribution

_UINT = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}


_CPU_BLOCK = 1 << 23  # elements per checksum call on CPU (:func:`_leaf_checksum`)


@functools.partial(jax.jit, static_argnames="rows")
def _block_checksum(x: jax.Array, start: jax.Array, rows: int) -> jax.Array:
    """Two position-weighted sums (mod 2^32) of the bit patterns of rows ``start .. start + rows`` of a leaf
    (its leading axis), ``[2]`` uint32: ``sum b_i (i a + 1)`` and ``sum (b_i ^ i c) e`` over the leaf's flat
    (row-major) index ``i``. Positions come from iotas in the block's own shape: the leaf is never flattened, so
    a sharded leaf is reduced where it lies."""
    part = jax.lax.dynamic_slice_in_dim(x, start, rows, 0)
    bits = jax.lax.bitcast_convert_type(part, _UINT[part.dtype.itemsize]).astype(jnp.uint32)
    idx = jax.lax.broadcasted_iota(jnp.uint32, bits.shape, 0) + start.astype(jnp.uint32)
    for ax in range(1, bits.ndim):
        idx = idx * jnp.uint32(bits.shape[ax]) + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, ax)
    return jnp.stack([jnp.sum(bits * (idx * jnp.uint32(2654435761) + jnp.uint32(1))),
                      jnp.sum((bits ^ (idx * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B))])


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """:func:`_block_checksum` of a whole leaf, ``[2]`` uint32. On CPU, where XLA does not fuse an integer
    reduction with its operands (summed at once, a leaf needs about twice its size again: 17 GB for the 1.5B Qwen
    teacher), its leading axis is cut into equal blocks of at most ``_CPU_BLOCK`` elements where it divides so
    (else one row each), summed one call at a time (uint32 addition wraps: the order does not matter)."""
    x = x[None] if x.ndim == 0 else x
    n, inner = x.shape[0], math.prod(x.shape[1:])
    on_cpu = all(d.platform == "cpu" for d in x.devices())
    rows = next((n // g for g in range(1, n + 1) if n % g == 0 and (n // g) * inner <= _CPU_BLOCK), 1) \
        if on_cpu else n
    sums = [_block_checksum(x, jnp.int32(start), rows) for start in range(0, n, rows)]
    return functools.reduce(jnp.add, sums)


def model_fingerprint(params: Params, cfg: ModelConfig) -> str:
    """A 16-hex-digit fingerprint of a model's config and weights (every bit of every weight counts)."""
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(params))
    sums = np.asarray(jax.device_get([_leaf_checksum(jnp.asarray(x)) for x in leaves])).tolist()
    desc = [repr(cfg)] + [[jax.tree_util.keystr(p), list(x.shape), str(x.dtype), s]
                          for p, x, s in zip(paths, leaves, sums)]
    return hashlib.sha256(json.dumps(desc).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Entry:
    """Cached scores of one example (NumPy fields; ``ffn_rows, attn_rows [L]`` mark the scored rows)."""

    attr: Attribution
    ffn_rows: np.ndarray
    attn_rows: np.ndarray

    def covers(self, ffn_layers: np.ndarray, attn_layers: np.ndarray) -> bool:
        return bool(self.ffn_rows[ffn_layers].all() and self.attn_rows[attn_layers].all())


def _digest(fields: dict[str, np.ndarray]) -> str:
    """The sha256 of an entry's fields (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(fields):
        x = np.ascontiguousarray(fields[name])
        h.update(f"{name}|{x.dtype.str}|{x.shape}|".encode())
        h.update(x.tobytes())
    return h.hexdigest()


def entry_path(folder: str | os.PathLike, ids: np.ndarray, target: int, mode: str, attention: str) -> Path:
    """Where the scores of one example and option live in a cache folder."""
    h = hashlib.sha256(f"{mode}|{attention}|{int(target)}|".encode() + np.asarray(ids, np.int32).tobytes())
    return Path(folder) / f"{h.hexdigest()[:32]}.npz"


def _check_fingerprint(path: Path, found: str, fingerprint: str) -> None:
    if found != fingerprint:
        raise ConfigError(f"{path} holds attribution scores of another model (fingerprint {found}, this model's is "
                          f"{fingerprint}): the weights changed since they were written. Delete {path.parent} or "
                          "give another cache folder.")


def check_folder(folder: str | os.PathLike, fingerprint: str) -> None:
    """Refuse (:class:`ConfigError`) a cache folder that holds another model's scores, judged by one of its
    entries (a folder serves one model), so that a run can stop before it writes anything; no-op when empty."""
    first = next(iter(sorted(Path(folder).glob("*.npz"))), None)
    if first is None:
        return
    try:
        with np.load(first) as z:
            found = str(z["fingerprint"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return  # a damaged entry is scored again when it is read (read_entry)
    _check_fingerprint(first, found, fingerprint)


def read_entry(folder: str | os.PathLike, fingerprint: str, ids: np.ndarray, target: int, mode: str,
               attention: str) -> Entry | None:
    """The cached scores of one example, or ``None`` when there are none. An entry written by another model
    (another fingerprint) is a :class:`ConfigError`: the weights behind the folder changed."""
    path = entry_path(folder, ids, target, mode, attention)
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            data = {k: z[k] for k in z.files}
        damaged = "sha256" not in data or str(data.pop("sha256")) != _digest(data)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        data, damaged = None, f"unreadable: {e}"
    if damaged:
        why = damaged if isinstance(damaged, str) else "does not match its sha256"
        print(f"pktjax: {path} is damaged ({why}); scoring the example again.", file=sys.stderr)
        path.unlink(missing_ok=True)
        return None
    _check_fingerprint(path, str(data["fingerprint"]), fingerprint)
    same = (str(data["mode"]) == mode and str(data["attention"]) == attention and int(data["target"]) == target
            and np.array_equal(data["ids"], np.asarray(ids)))
    if not same:  # a hash collision: not this example's scores
        return None
    attr = Attribution(*(data[k] for k in ("layer_attn", "layer_ffn", "ffn", "attn")))
    return Entry(attr, data["ffn_rows"].astype(bool), data["attn_rows"].astype(bool))


def write_entry(folder: str | os.PathLike, fingerprint: str, ids: np.ndarray, target: int, mode: str,
                attention: str, entry: Entry) -> Path:
    """Store one example's scores with their sha256 (:func:`pktjax.runfolder.atomic_write`); returns the
    entry's path."""
    a = entry.attr
    fields = {k: np.asarray(v) for k, v in dict(
        fingerprint=fingerprint, mode=mode, attention=attention, ids=np.asarray(ids, np.int32), target=int(target),
        layer_attn=a.layer_attn, layer_ffn=a.layer_ffn, ffn=a.ffn, attn=a.attn, ffn_rows=entry.ffn_rows,
        attn_rows=entry.attn_rows).items()}
    buf = io.BytesIO()
    np.savez(buf, sha256=_digest(fields), **fields)
    return atomic_write(entry_path(folder, ids, target, mode, attention), buf.getvalue())
