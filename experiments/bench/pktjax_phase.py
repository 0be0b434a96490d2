"""pktjax's stages on the benchmark workload, and the matrix-product floor of the attribution."""

from __future__ import annotations

import dataclasses
import functools
import gc
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import pktjax
from experiments.bench.measure import Measured, Memory, log, measure
from experiments.bench.sizes import Shape, Size
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


def floor_blocks(shape: Shape, chunk: int) -> int:
    """Blocks of ``chunk`` rows the attribution scores: ``L * (ceil(f / c) + ceil(H*hd / c))``."""
    ceil = lambda n: -(-n // min(chunk, n))  # noqa: E731
    return shape.layers * (ceil(shape.inter) + ceil(shape.hidden))


class PktjaxPhase:
    """Loads the pair with :func:`pktjax.load_model` and measures every stage."""

    def __init__(self, teacher_dir: Path, student_dir: Path, size: Size, work: Workload, device: str, reps: int):
        self.size, self.work, self.reps = size, work, reps
        self.memory = Memory("jax", device)
        self.teacher, self.student = pktjax.load_model(teacher_dir), pktjax.load_model(student_dir)
        self.results: dict[str, Measured] = {}

    def _measure(self, name: str, run, setup=lambda: None) -> Measured:
        self.results[name] = measure(run, jax.block_until_ready, self.memory, self.reps, setup)
        log(f"pktjax {name:20s} median {self.results[name].median:.4g} s "
            f"(first call {self.results[name].warmup_s:.3g} s)")
        return self.results[name]

    def attribution(self) -> None:
        ids = jnp.asarray(self.work.ids)
        for name, m in (("teacher", self.teacher), ("student", self.student)):
            self._measure(f"attribution_{name}", lambda _, m=m: attribution(
                m.params, m.config, ids, self.work.target, chunk=self.size.chunk))

    def matmul_floor(self) -> dict[str, Measured]:
        """Time of the attribution's vocabulary products alone, per model, with the same block size."""
        out = {}
        for name, m, shape in (("teacher", self.teacher, self.size.teacher),
                               ("student", self.student, self.size.student)):
            w_u = m.params["lm_head"]
            x = jax.random.normal(jax.random.key(0), (min(self.size.chunk, shape.hidden), shape.hidden), w_u.dtype)
            blocks = floor_blocks(shape, self.size.chunk)
            out[name] = measure(lambda _: _products(x, w_u, blocks), jax.block_until_ready, self.memory, self.reps)
            log(f"pktjax matmul floor {name:8s} median {out[name].median:.4g} s")
        return out

    def select(self) -> None:
        k, (n_f, n_a) = self.size.student.layers, self.work.counts
        scores = [self.results[f"attribution_{n}"].output for n in ("teacher", "student")]
        self._measure("select", lambda _: [select(s, k, n_f, n_a) for s in scores])

    def extract(self, picked: Selection) -> None:
        self._measure("extract", lambda _: extract(self.teacher.params, self.teacher.config, picked, MODULES))

    def aligner_step(self, picked_student: Selection) -> None:
        from pktjax.train_aligner import OPTIMIZER

        knowledge = self.results["extract"].output
        batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in self.work.aligner_batches]
        aligner = jax.tree.map(jnp.asarray, self.work.aligner)
        run = functools.partial(aligner_step, aligner, self.student, picked_student, knowledge, batches)
        self._measure("aligner_step", run, lambda: OPTIMIZER.init(aligner))

    def lora_step(self) -> None:
        tx, update, scale = lora_optimizer()
        lora = {"layers": jax.tree.map(jnp.asarray, self.work.lora)}
        batches = [tuple(jnp.asarray(b[k]) for k in ("ids", "mask", "labels")) for b in self.work.lora_batches]
        step = functools.partial(lora_step, self.student, lora, batches, update, scale=scale)
        self._measure("lora_step", functools.partial(step, dropout=0.05), lambda: tx.init(lora))
        loss, new, acc = step(tx.init(lora), dropout=0.0)  # dropout off: compared with the baseline
        self.lora_exact = {"loss": float(loss), "params": as_numpy(new["layers"]), "grads": as_numpy(clipped_gradient(acc))}

    def outputs(self) -> dict[str, Any]:
        res = self.results
        loss, aligner, grads = res["aligner_step"].output
        return {
            "attribution_teacher": _fields(res["attribution_teacher"].output),
            "attribution_student": _fields(res["attribution_student"].output),
            "select": [_fields(s) for s in res["select"].output],
            "extract": as_numpy(res["extract"].output),
            "aligner_step": {"loss": float(loss), "params": as_numpy(aligner), "grads": as_numpy(grads)},
            "lora_step": self.lora_exact,
        }

    def run_all(self, picked_teacher: dict, picked_student: dict) -> dict[str, Any]:
        self.attribution()
        self.floor = self.matmul_floor()
        self.select()
        self.extract(selection_from(picked_teacher))
        self.aligner_step(selection_from(picked_student))
        self.lora_step()
        return self.outputs()

    def close(self) -> None:
        del self.teacher, self.student
        gc.collect()


def aligner_step(aligner, student, selection: Selection, knowledge, batches, opt_state):
    """One step of :mod:`pktjax.train_aligner` from ``aligner``: its gradient over the micro-batches, then its
    AdamW update at the schedule's first learning rate. Returns ``(loss, new aligner, gradient)``."""
    from pktjax.train_aligner import apply_update, step_gradients

    loss, _ce, _mse, grads = step_gradients(aligner, student, selection, knowledge, batches, 1000.0)
    new, _ = apply_update(aligner, opt_state, grads, jnp.float32(ALIGNER_LR))
    return loss, new, grads


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
    from pktjax.model import LoraSpec, forward

    def sums(lora):
        ids, mask, labels = batch
        spec = LoraSpec(scale=scale, dropout=dropout, rng=rng)
        total, n = token_cross_entropy(forward(base, cfg, ids, mask, lora=lora, lora_spec=spec), labels)
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
