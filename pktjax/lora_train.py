"""LoRA fine-tuning with Optax, as the Seeking authors train their students (SPEC §4).

AdamW (β 0.9/0.999, ε 1e-8) with a linear warmup over ``ceil(0.03 · steps)`` steps then linear decay to zero,
gradient clipping at global norm 1, batches of 64 examples built from micro-batches with gradient accumulation,
LoRA dropout 0.05, loss on the response tokens only (Seeking tokenization). The loss of a batch is the mean
cross-entropy over all its response tokens, so the gradient does not depend on how the batch is split.

Inside each batch the examples are sorted by length and every micro-batch is left-padded to a multiple of
``bucket`` tokens, so one compiled step serves each bucket shape. Orbax checkpoints (adapter, optimizer state,
step) are written after every epoch and at the end; a run restarted on the same folder resumes from the latest
one and ends with the same adapter as an uninterrupted run (on any mesh). Metrics go to ``metrics.jsonl``, one line
per step; the first line each start writes also carries ``"provenance"`` (:mod:`pktjax.provenance`: the software,
devices, the run config's hash and the data files' hashes that made the steps from there on).

With ``mesh=`` (SPEC §7) the frozen base, the adapter and the optimizer state are laid out by
:mod:`pktjax.sharding`'s rules, every micro-batch is split over ``(data, fsdp)``, and the accumulate and update
steps are jitted with explicit in/out shardings (accumulate donates the running sums, the update the adapter and
optimizer state). Only process 0 writes ``train_config.json`` and ``metrics.jsonl`` and shows the progress bar;
every process takes part in the orbax saves.

:func:`fit` is that loop for any trainable pytree and loss (an *objective*); :func:`train` is the LoRA case.
SemAlign (:mod:`pktjax.semalign`) trains one student layer through it, so both share batching, the optimizer,
checkpoints and resumption.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from functools import cache, partial
from pathlib import Path
from typing import Any, Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from pktjax import runfolder
from pktjax import sharding as S
from pktjax.config import ModelConfig
from pktjax.data import Batch, Tokenized, bucket_length, iter_chunks, pad_left
from pktjax.errors import ConfigError, DamagedFileError, DataError
from pktjax.lora import LoRA, rank_of
from pktjax.losses import token_cross_entropy
from pktjax.model import Adapter, LoraSpec, forward
from pktjax.provenance import provenance
from pktjax.runfolder import Checkpoints, append_jsonl, fault_point, lock, read_json, write_json, write_jsonl
from pktjax.settings import LoraTrainConfig, result_keys
from pktjax.tracking import Tracker

Params = dict[str, Any]
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
_EMPTY = Tokenized(np.zeros(0, np.int32), np.zeros(0, np.int32))


TrainConfig = LoraTrainConfig  # a LoRA run's settings (defined with the other settings)


def schedule(tc: TrainConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 over ``ceil(warmup_ratio * total)`` steps, then linear decay to 0 at ``total``."""
    warm = math.ceil(tc.warmup_ratio * total_steps)
    decay = optax.linear_schedule(tc.lr, 0.0, max(total_steps - warm, 1))
    if warm == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, tc.lr, warm), decay], [warm])


def optimizer(tc: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(tc.max_grad_norm),
                       optax.adamw(schedule(tc, total_steps), b1=0.9, b2=0.999, eps=1e-8,
                                   weight_decay=tc.weight_decay))


def micro_batches(items: Sequence[Tokenized], indices: Sequence[int], micro: int, pad_id: int,
                  bucket: int) -> list[Batch]:
    """The examples ``indices`` sorted by length, in micro-batches of exactly ``micro`` rows (empty filler rows:
    mask 0, no loss), each left-padded to a multiple of ``bucket`` tokens."""
    chosen = sorted(indices, key=lambda i: (len(items[i].ids), i))
    out = []
    for chunk in iter_chunks(chosen, micro):
        group = [items[i] for i in chunk] + [_EMPTY] * (micro - len(chunk))
        out.append(pad_left(group, pad_id, bucket_length(max(len(t.ids) for t in group), bucket)))
    return out


def lora_objective(lora: LoRA, base: Params, cfg: ModelConfig, batch: tuple[jax.Array, ...], spec: LoraSpec):
    """The LoRA loss: ``(summed response-token cross-entropy, token count)`` of ``batch = (ids, mask, labels)``
    ``[B, T]`` under ``base + lora``.

    An objective is any hashable callable ``(trainable, base, cfg, batch, spec) -> (loss sum, token count)``
    whose loss is a sum over tokens (so the token mean of a batch does not depend on its micro-batches);
    ``batch`` ends with ``extra [B, T, k]`` when the items carry one."""
    ids, mask, labels = batch[:3]
    total, n = token_cross_entropy(forward(base, cfg, ids, mask, adapter=Adapter(lora, spec)), labels)
    return total.sum(), n.sum()


def _add_micro(acc: dict, trainable: Any, base: Params, batch: tuple[jax.Array, ...], where: jax.Array,
               cfg: ModelConfig, scale: float, dropout: float, objective: Callable = lora_objective) -> dict:
    """Add one micro-batch's summed loss, token count and gradient of the summed loss to ``acc``.
    ``batch``: ``ids, mask, labels [B, T]`` (+ ``extra``); ``where = [seed, step, micro-batch index]`` seeds the
    dropout."""
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(where[0]), where[1]), where[2])
    spec = LoraSpec(scale=scale, dropout=dropout, rng=rng)
    (loss, n), grads = jax.value_and_grad(objective, has_aux=True)(trainable, base, cfg, batch, spec)
    return {"grads": jax.tree.map(jnp.add, acc["grads"], grads), "loss": acc["loss"] + loss,
            "tokens": acc["tokens"] + n}


_accumulate = jax.jit(_add_micro, static_argnums=(5, 6, 7, 8), donate_argnums=0)


@partial(jax.jit, static_argnames=("cfg", "scale", "objective"))
def _eval_sums(trainable: Any, base: Params, batch: tuple[jax.Array, ...], *, cfg: ModelConfig, scale: float,
               objective: Callable = lora_objective):
    return objective(trainable, base, cfg, batch, LoraSpec(scale=scale))


def _apply(lora: LoRA, opt_state, acc: dict, step: jax.Array, tc: TrainConfig, total_steps: int):
    """Optimizer step ``step`` (0-based) on the token-mean gradient of the accumulated batch:
    ``(lora, opt_state, metrics)``."""
    n = jnp.maximum(acc["tokens"], 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / n, acc["grads"])
    updates, opt_state = optimizer(tc, total_steps).update(grads, opt_state, lora)
    metrics = {"loss": acc["loss"] / n, "grad_norm": optax.global_norm(grads),
               "lr": schedule(tc, total_steps)(step)}
    return optax.apply_updates(lora, updates), opt_state, metrics


_update = jax.jit(_apply, static_argnums=(4, 5))


@cache
def _step_fns(mesh: Mesh | None) -> tuple[Callable, Callable]:
    """``(accumulate, update)``: the plain jits without a mesh; on ``mesh``, jitted with explicit shardings from
    the rules (batch split over ``(data, fsdp)``; the sums, then the adapter and optimizer state donated)."""
    if mesh is None:
        return _accumulate, _update
    return (S.cached_sharded_jit(_add_micro, mesh, static_argnums=(5, 6, 7, 8), batch_argnums=(3,),
                                 donate_argnums=(0,)),
            S.cached_sharded_jit(_apply, mesh, static_argnums=(4, 5), donate_argnums=(0, 1)))


@partial(jax.jit, static_argnames=("tc", "total_steps"))
def _fresh_state(lora: LoRA, *, tc: TrainConfig, total_steps: int) -> dict:
    return {"lora": lora, "opt_state": optimizer(tc, total_steps).init(lora), "step": jnp.zeros((), jnp.int32)}


@jax.jit
def _zero_acc(lora: LoRA) -> dict:
    return {"grads": jax.tree.map(jnp.zeros_like, lora), "loss": jnp.zeros((), jnp.float32),
            "tokens": jnp.zeros((), jnp.int32)}


def _device_batch(batch: Batch, mesh: Mesh | None = None) -> tuple[jax.Array, ...]:
    """``(ids, mask, labels)`` ``[B, T]`` (+ ``extra [B, T, k]``) on the default device, or with rows split over
    the mesh's batch axes."""
    chex.assert_equal_shape([batch.ids, batch.mask, batch.labels])
    arrays = (batch.ids, batch.mask, batch.labels) + (() if batch.extra is None else (batch.extra,))
    return tuple(map(jnp.asarray, arrays)) if mesh is None else S.shard_batch(arrays, mesh)


def cast_base(base: Params, dtype: str) -> Params:
    """The frozen weights in the compute dtype (unchanged when they already have it)."""
    want = DTYPES[dtype]
    if all(x.dtype == want for x in jax.tree.leaves(base)):
        return base
    return jax.jit(lambda p: jax.tree.map(lambda x: x.astype(want), p))(base)


def evaluate(base: Params, cfg: ModelConfig, lora: LoRA, items: Sequence[Tokenized], *, scale: float, pad_id: int,
             micro_batch: int = 8, bucket: int = 64, objective: Callable = lora_objective) -> float:
    """Token-mean loss of ``items`` (by default the response-token cross-entropy under ``base + lora``), no
    dropout; ``objective`` and ``lora`` may be any trainable pytree and its objective (see :func:`fit`)."""
    loss, tokens = 0.0, 0
    for batch in micro_batches(items, range(len(items)), micro_batch, pad_id, bucket):
        s, n = _eval_sums(lora, base, _device_batch(batch), cfg=cfg, scale=scale, objective=objective)
        loss, tokens = loss + float(s), tokens + int(n)
    return loss / max(tokens, 1)


def _abstract(x: jax.Array) -> jax.ShapeDtypeStruct:
    """A restore target like ``x``: shape, dtype and sharding (orbax reads the arrays straight into it)."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


# the settings that cannot change a run's results (settings.result_keys): a run resumes with other values
_NEUTRAL = {f.name for f in dataclasses.fields(TrainConfig)} - set(result_keys(TrainConfig))


def run_record(tc: TrainConfig, examples: int, extra: dict | None = None) -> dict:
    """What ``train_config.json`` records of a run: the settings, the number of examples and ``extra`` entries
    (a resumed run must match it)."""
    return {**dataclasses.asdict(tc), "examples": examples, **(extra or {})}


def check_resume(out_dir: str | Path, record: dict, partial: bool = False) -> None:
    """Refuse (:class:`ConfigError`) an ``out_dir`` whose ``train_config.json`` holds a run with other settings
    than ``record``; a folder without one passes. Reads one small file, so a command calls it before loading any
    model. ``partial``: ``record`` holds only the entries known so far, and only those are compared (the rest
    are compared when the run starts)."""
    path = Path(out_dir).expanduser() / CONFIG_FILE
    if not path.is_file():
        return
    old = read_json(path, "LoRA training config")
    keys = (set(record) if partial else set(old) | set(record)) - _NEUTRAL  # e.g. save_every may change
    diff = [f"{k} {old.get(k, 'unset')!r} there, {record.get(k, 'unset')!r} now" for k in sorted(keys)
            if old.get(k) != record.get(k)]
    if diff:
        raise ConfigError(f"{path.parent} holds a run with different settings ({'; '.join(diff)}): resume it with "
                          "the same settings, or give a new --out folder.")


def _check_run_config(out_dir: Path, record: dict) -> None:
    """Write the run's config (process 0), or refuse to resume a folder that holds a run with another config."""
    check_resume(out_dir, record)
    if (out_dir / CONFIG_FILE).is_file():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    if S.is_main_process():
        write_json(out_dir / CONFIG_FILE, record, checksum=True, indent=2)


def _trim_metrics(out_dir: Path, step: int, ckpt: Checkpoints) -> list[dict]:
    """The metric lines of steps ``1..step`` (those past it are about to be redone), written back; rebuilt from
    checkpoint ``step``'s manifest when lines are missing, repeated or damaged."""
    path = out_dir / METRICS_FILE
    try:
        rows = runfolder.read_jsonl(path, on_bad="trim") if path.is_file() else []
        keep = [r for r in rows if r["step"] <= step]
    except (DataError, KeyError, TypeError) as e:
        rows, keep, why = None, None, str(e)
    if keep is None or [r["step"] for r in keep] != list(range(1, step + 1)):
        saved = (ckpt.meta(step) or {}).get("metrics") if step else []
        if saved is None:
            raise DamagedFileError(f"{path}: lines of steps up to {step} are missing or damaged and checkpoint "
                                   f"{step} holds no copy; train again in a new output folder.")
        if keep is not None:
            why = f"steps {sorted(set(range(1, step + 1)) - {r['step'] for r in keep})} missing or repeated"
        print(f"pktjax: {path}: {why}; rebuilt from checkpoint {step}.", file=sys.stderr)
        rows, keep = None, saved
    if S.is_main_process() and (rows is None or len(keep) != len(rows)):
        write_jsonl(path, keep)
    return keep


def train(base: Params, cfg: ModelConfig, lora: LoRA, items: Sequence[Tokenized], out_dir: str | Path,
          tc: TrainConfig = TrainConfig(), *, pad_id: int, on_step: Callable[[int, dict], None] | None = None,
          progress: bool = True, mesh: Mesh | str | None = None, data_files: Sequence[str | Path] = (),
          tracker: Tracker | None = None) -> LoRA:
    """Fine-tune ``lora`` on ``items`` over frozen ``base`` weights; checkpoints and metrics under ``out_dir``.

    ``items``: Seeking-tokenized examples (:func:`pktjax.data.tokenize_seeking`). Resumes from the latest
    checkpoint in ``out_dir`` when there is one. ``on_step(step, metrics)`` runs after every optimizer step.
    ``mesh``: ``None`` (one device), a :class:`Mesh` or a spec such as ``"data=2,fsdp=2,tensor=2"`` (see the
    module docstring; ``base`` is best loaded onto it already, e.g. ``load_model(path, mesh=mesh)``).
    ``data_files``: the files ``items`` came from (their hashes go in the metrics' provenance); ``tracker``: also
    log each step's metrics there (:mod:`pktjax.tracking`). Returns the trained adapter (float32).
    """
    tc.validate()
    if rank_of(lora) != tc.rank:
        raise ConfigError(f"the adapter has rank {rank_of(lora)} but the training config says {tc.rank}.")
    return fit(lora, base, cfg, items, out_dir, tc, pad_id=pad_id, on_step=on_step, progress=progress, mesh=mesh,
               data_files=data_files, tracker=tracker)


def fit(trainable: Any, base: Params, cfg: ModelConfig, items: Sequence[Tokenized], out_dir: str | Path,
        tc: TrainConfig = TrainConfig(), *, pad_id: int, objective: Callable = lora_objective,
        record: dict | None = None, on_step: Callable[[int, dict], None] | None = None, progress: bool = True,
        mesh: Mesh | str | None = None, desc: str = "lora", data_files: Sequence[str | Path] = (),
        tracker: Tracker | None = None) -> Any:
    """The training loop of :func:`train` for any float32 pytree ``trainable`` over frozen ``base`` weights:
    ``objective(trainable, base, cfg, batch, spec)`` gives the summed loss and token count of a micro-batch
    (see :func:`lora_objective`; it must be hashable, e.g. a module-level function or a frozen dataclass).
    ``tc`` supplies the optimizer, batching, dropout (through ``spec``), seed and checkpoint cadence; ``record``
    adds entries to ``train_config.json`` (a folder holding another record refuses to resume); ``data_files``: the
    files ``items`` came from, hashed into the metrics' provenance; ``tracker``: also log each step's metrics
    there (:mod:`pktjax.tracking`). Returns the trained pytree."""
    tc.validate()
    mesh = S.as_mesh(mesh)
    out_dir = Path(out_dir).expanduser()
    with lock(out_dir, "LoRA training" if desc == "lora" else f"{desc} training"):
        return _fit_locked(trainable, base, cfg, items, out_dir, tc, pad_id, objective, record, on_step, progress,
                           mesh, desc, data_files, tracker or Tracker())


def _fit_locked(trainable: Any, base: Params, cfg: ModelConfig, items: Sequence[Tokenized], out_dir: Path,
                tc: TrainConfig, pad_id: int, objective: Callable, record: dict | None, on_step, progress: bool,
                mesh: Mesh | None, desc: str, data_files: Sequence[str | Path], tracker: Tracker) -> Any:
    settings = run_record(tc, len(items), record)
    _check_run_config(out_dir, settings)
    origin = {"provenance": provenance(settings, data_files)}  # on the first line this start writes
    per_epoch = math.ceil(len(items) / tc.batch_size)
    total = per_epoch * tc.epochs
    base = cast_base(base, tc.dtype)
    if mesh is not None:
        base = S.shard(base, mesh)  # no copy when it was loaded onto the mesh by the rules already
    accumulate, update = _step_fns(mesh)
    ckpt = Checkpoints(out_dir / "checkpoints")
    # the state keeps the key "lora" for any trainable pytree: LoRA runs saved before stay resumable
    fresh = S.place(_fresh_state(trainable, tc=tc, total_steps=total), mesh)
    # the newest checkpoint that verifies (a damaged one falls back to the one before), placed like a fresh state
    # (uncommitted, or by the rules on a mesh): a fresh run's compiled steps serve it
    _, restored = ckpt.latest_good(jax.tree.map(_abstract, fresh))
    state = fresh if restored is None else S.place(restored, mesh)
    start = int(state["step"])
    history = _trim_metrics(out_dir, start, ckpt)
    bar = _progress(total, start, progress, desc)
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            epoch, k = divmod(step, per_epoch)
            order = np.random.default_rng([tc.seed, epoch]).permutation(len(items))
            acc = _zero_acc(state["lora"])
            for j, batch in enumerate(micro_batches(items, order[k * tc.batch_size:(k + 1) * tc.batch_size],
                                                    tc.micro_batch, pad_id, tc.bucket)):
                where = np.asarray([tc.seed, step, j], np.int32)
                acc = accumulate(acc, state["lora"], base, _device_batch(batch, mesh), where, cfg, tc.scale,
                                 tc.dropout, objective)
            new_lora, opt_state, m = update(state["lora"], state["opt_state"], acc, np.int32(step), tc, total)
            state = {"lora": new_lora, "opt_state": opt_state, "step": jnp.asarray(step + 1, jnp.int32)}
            m, acc = jax.block_until_ready((m, acc))  # the step's time, not only its dispatch
            metrics = _log(out_dir, step + 1, epoch, m, acc, time.perf_counter() - t0, origin)
            tracker.log({k: v for k, v in metrics.items() if k != "provenance"}, step + 1)
            origin = {}
            history.append(metrics)
            fault_point("lora:after-metrics")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")  # before update,
            bar.update(1)  # which prints a plain bar's line
            if (step + 1) % per_epoch == 0 or step + 1 == total or (tc.save_every and (step + 1) % tc.save_every == 0):
                ckpt.save(int(state["step"]), state, meta={"metrics": history})
            if on_step is not None:
                on_step(step + 1, metrics)
    finally:
        bar.close()
        ckpt.close()
    return state["lora"]


def _progress(total: int, start: int, enabled: bool, desc: str = "lora"):
    from pktjax.progress import progress_bar

    return progress_bar(total, desc, "step", enabled=enabled and S.is_main_process(), initial=start)


def _log(out_dir: Path, step: int, epoch: int, m: dict, acc: dict, seconds: float, extra: dict) -> dict:
    tokens = int(acc["tokens"])
    metrics = {"step": step, "epoch": epoch + 1, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
               "lr": float(m["lr"]), "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
               "seconds": seconds, **extra}
    if S.is_main_process():
        append_jsonl(out_dir / METRICS_FILE, [metrics])
    return metrics
