"""pktjax's stages on the benchmark workload, and the matrix-product floor of the attribution."""

from __future__ import annotations

import dataclasses
import functools
import gc
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pktjax
from experiments.bench.measure import Job, Measured, Memory
from experiments.bench.sizes import Size, floor_blocks
from experiments.bench.workload import ALIGNER_LR, LORA_ALPHA, LORA_LR, LORA_RANK, MODULES, Workload, as_numpy
from pktjax.attribution import attribution
from pktjax.extract import extract
from pktjax.select import Selection, select


def selection_from(picked: dict[str, np.ndarray]) -> Selection:
    return Selection(**{k: jnp.asarray(v, jnp.int32) for k, v in picked.items()})


@functools.partial(jax.jit, static_argnames=("blocks",))
def _products(x: jax.Array, w_u: jax.Array, blocks: int) -> jax.Array:
    """``blocks`` products ``[c, d] x [d, V]`` in sequence, each written out in full (each block is rescaled so
    none can be hoisted). The product is the loop's carried value and nothing reduces it inside the loop: XLA
    on CPU fuses a product whose only consumer is a reduction into a loop that runs at about half the speed of
    its matrix-multiply kernel, which would make this floor too high."""
    def body(i, _):
        return jnp.einsum("nd,vd->nv", x * (1.0 + i.astype(x.dtype)), w_u, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.fori_loop(0, blocks, body, jnp.zeros((x.shape[0], w_u.shape[0]), jnp.float32))


def _fields(obj: Any) -> dict[str, np.ndarray]:
    return {f.name: np.asarray(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


class PktjaxPhase:
    """The pair loaded with :func:`pktjax.load_model`; :meth:`job` gives each stage, ``results[stage]`` holds its
    measurement. ``picked`` (teacher, student selections) feeds extract and the aligner step."""

    def __init__(self, teacher_dir: Path, student_dir: Path, size: Size, work: Workload, device: str):
        self.size, self.work = size, work
        self.memory = Memory("jax", device)
        self.teacher, self.student = pktjax.load_model(teacher_dir), pktjax.load_model(student_dir)
        self.models = {"teacher": (self.teacher, size.teacher), "student": (self.student, size.student)}
        self.results: dict[str, Measured] = {}
        self.picked: tuple[Selection, Selection] | None = None

    def job(self, stage: str) -> Job:
        kind, _, model = stage.partition("_")
        if kind in ("attribution", "floor"):
            return getattr(self, f"_{kind}")(model)
        return getattr(self, f"_{stage}")()

    def _job(self, run, setup=lambda: None) -> Job:
        return Job(run, jax.block_until_ready, self.memory, setup)

    def _attribution(self, name: str) -> Job:
        ids, m = jnp.asarray(self.work.ids), self.models[name][0]
        return self._job(lambda _: attribution(m.params, m.config, ids, self.work.target, chunk=self.size.chunk))

    def _floor(self, name: str) -> Job:
        """The attribution's ``[chunk, d] x [d, V]`` products alone, as many as it needs."""
        m, shape = self.models[name]
        w_u = m.params["lm_head"]
        x = jax.random.normal(jax.random.key(0), (self.size.chunk, shape.hidden), w_u.dtype)
        blocks = floor_blocks(shape, self.size.chunk)
        return self._job(lambda _: _products(x, w_u, blocks))

    def _select(self) -> Job:
        k, (n_f, n_a) = self.size.student.layers, self.work.counts
        scores = [self.results[f"attribution_{n}"].output for n in ("teacher", "student")]
        return self._job(lambda _: [select(s, k, n_f, n_a) for s in scores])

    def _extract(self) -> Job:
        return self._job(lambda _: extract(self.teacher.params, self.teacher.config, self.picked[0], MODULES))

    def _aligner_step(self) -> Job:
        return self._aligner_job(aligner_step)

    def _aligner_step_weights(self) -> Job:
        return self._aligner_job(aligner_step_weights)

    def _aligner_job(self, step: Callable) -> Job:
        from pktjax.train_aligner import OPTIMIZER

        knowledge = self.results["extract"].output
        batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in self.work.aligner_batches]
        aligner = jax.tree.map(jnp.asarray, self.work.aligner)
        run = functools.partial(step, aligner, self.student, self.picked[1], knowledge, batches)
        return self._job(run, lambda: OPTIMIZER.init(aligner))

    def _lora_step(self) -> Job:
        """One LoRA step with dropout 0.05."""
        self.tx, update, scale = lora_optimizer()
        self.lora = {"layers": jax.tree.map(jnp.asarray, self.work.lora)}
        batches = [tuple(jnp.asarray(b[k]) for k in ("ids", "mask", "labels")) for b in self.work.lora_batches]
        self.lora_run = functools.partial(lora_step, self.student, self.lora, batches, update, scale=scale)
        return self._job(functools.partial(self.lora_run, dropout=0.05), lambda: self.tx.init(self.lora))

    def lora_exact(self) -> dict[str, Any]:
        """One LoRA step with dropout off, for the comparison with the baseline."""
        loss, new, acc = self.lora_run(self.tx.init(self.lora), dropout=0.0)
        return {"loss": float(loss), "params": as_numpy(new["layers"]), "grads": as_numpy(clipped_gradient(acc))}

    def outputs(self) -> dict[str, Any]:
        """The stage outputs the comparison needs, as NumPy (the LoRA entry comes from :meth:`lora_exact`)."""
        res = self.results
        return {
            "attribution_teacher": _fields(res["attribution_teacher"].output),
            "attribution_student": _fields(res["attribution_student"].output),
            "select": [_fields(s) for s in res["select"].output],
            "extract": as_numpy(res["extract"].output),
            **{stage: _step_outputs(*res[stage].output) for stage in ("aligner_step", "aligner_step_weights")},
        }

    def close(self) -> None:
        del self.teacher, self.student, self.models
        gc.collect()


def _step_outputs(loss, aligner, grads) -> dict[str, Any]:
    return {"loss": float(loss), "params": as_numpy(aligner), "grads": as_numpy(grads)}


def aligner_step(aligner, student, selection: Selection, knowledge, batches, opt_state, injection: str = "products"):
    """One step of :mod:`pktjax.train_aligner` from ``aligner``: its gradient over the micro-batches, then its
    AdamW update at the schedule's first learning rate. Returns ``(loss, new aligner, gradient)``. ``injection``:
    :func:`pktjax.train_aligner.aligner_loss`'s (``"weights"`` is compared with the baseline's ``"weights"``)."""
    from pktjax.train_aligner import apply_update, step_gradients

    loss, _ce, _mse, grads = step_gradients(aligner, student, selection, knowledge, batches, 1000.0,
                                            injection=injection)
    new, _ = apply_update(aligner, opt_state, grads, jnp.float32(ALIGNER_LR))
    return loss, new, grads


aligner_step_weights = functools.partial(aligner_step, injection="weights")


def lora_optimizer():
    """``(tx, jitted update, scale)``: :func:`pktjax.lora_train.optimizer` (clipping at norm 1, AdamW 0.9/0.999)
    with no warm-up, so step 0 uses the full learning rate; the update applies the token-mean gradient."""
    from pktjax import lora_train as lt

    tc = lt.TrainConfig(rank=LORA_RANK, alpha=LORA_ALPHA, lr=LORA_LR, warmup_ratio=0.0)
    tx = lt.optimizer(tc, 100)

    @jax.jit
    def update(lora, opt_state, acc):
        grads = jax.tree.map(lambda g: g / jnp.maximum(acc["tokens"], 1).astype(jnp.float32), acc["grads"])
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, acc["loss"] / jnp.maximum(acc["tokens"], 1)

    return tx, update, tc.scale


@functools.partial(jax.jit, static_argnames=("cfg", "scale", "dropout"), donate_argnums=0)
def _lora_accumulate(acc, lora, base, batch, rng, *, cfg, scale: float, dropout: float):
    """Add one micro-batch's summed response-token cross-entropy, token count and gradient to ``acc``."""
    from pktjax.losses import token_cross_entropy
    from pktjax.model import Adapter, LoraSpec, forward

    def sums(lora):
        ids, mask, labels = batch
        spec = LoraSpec(scale=scale, dropout=dropout, rng=rng)
        total, n = token_cross_entropy(forward(base, cfg, ids, mask, adapter=Adapter(lora, spec)), labels)
        return total.sum(), n.sum()

    (loss, n), grads = jax.value_and_grad(sums, has_aux=True)(lora)
    return {"grads": jax.tree.map(jnp.add, acc["grads"], grads), "loss": acc["loss"] + loss,
            "tokens": acc["tokens"] + n}


def lora_step(student, lora, batches, update, opt_state, *, scale: float, dropout: float):
    """One LoRA step as :mod:`pktjax.lora_train` takes it (a compiled accumulate per micro-batch, then the
    compiled optimizer update), built from pktjax's public forward, loss and optimizer.
    Returns ``(loss, new lora, accumulated sums)``."""
    acc = {"grads": jax.tree.map(jnp.zeros_like, lora), "loss": jnp.zeros((), jnp.float32),
           "tokens": jnp.zeros((), jnp.int32)}
    for j, batch in enumerate(batches):
        acc = _lora_accumulate(acc, lora, student.params, batch, jax.random.key(j), cfg=student.config,
                               scale=scale, dropout=dropout)
    new, _, loss = update(lora, opt_state, acc)
    return loss, new, acc


@functools.partial(jax.jit, static_argnames=("max_norm",))
def clipped_gradient(acc, max_norm: float | None = 1.0) -> Any:
    """The gradient the optimizer applies: the token mean of the accumulated sums, clipped at global norm
    ``max_norm`` (``None``: not clipped)."""
    grads = jax.tree.map(lambda g: g / jnp.maximum(acc["tokens"], 1), acc["grads"]["layers"])
    if max_norm is None:
        return grads
    norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
    return jax.tree.map(lambda g: g * jnp.minimum(1.0, max_norm / norm), grads)
