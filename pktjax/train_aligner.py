"""Training LaTen's aligner (SPEC §3.6).

Step ``t`` takes extract example ``order[t]`` (``order`` = a permutation drawn from ``seed``), locates on it in
the teacher and the student, selects ``K = L_S`` layers and ``N_f = floor(f_S rate)``, ``N_a = floor(d_S rate)``
neurons per layer, extracts the teacher's knowledge, and evaluates ``P`` examples (``P - 1`` drawn from the align
split by ``random.Random(t).sample``, plus the extract example)::

    loss = sum_p [ CE_p(student with inject(align(aligner, knowledge))) + lambda * sum_m mean(g_m(K_m)^2) ]

``CE_p`` is example ``p``'s mean token cross-entropy (LaTen tokenization). The gradient is accumulated over
micro-batches (left padded, lengths bucketed, one compiled function per bucket); only the aligner trains, with
AdamW (b1 0.9, b2 0.95, weight decay 0.05) and a one-cycle cosine learning rate indexed by the step.

The schedule always spans the whole extract split (``N`` = its size: 20 for gsm, mmlu and humaneval, 32 for mbpp),
as the authors' ``OneCycleLR(total_steps=N)``: step 0 runs at ``lr/25``, the peak comes at step ``0.1 N - 1`` (step
1 for ``N = 20``; between steps 2 and 3 for ``N = 32``), and the last step ``N - 1`` again runs at ``lr/25``.
``TrainConfig.steps`` only stops the run early; it never reshapes the schedule, so a run stopped after 8 steps
holds exactly the first 8 checkpoints of the full run, and running it again with more steps continues it.

Output folder::

    run.json        settings, model sizes, modules and the shuffled order (a resumed run must match it)
    aligner/<t>/    aligner parameters after step t (orbax), every step kept: pick one for fusing
    state/<t>/      aligner + optimizer state after the last two finished steps (orbax), for resuming
    log.jsonl       one line of metrics per step, written before the step's checkpoints, with the size of
                    what checkpoint t injects on step t's selection (``delta``: :func:`pktjax.inject.delta_sizes`)
    attribution_cache/{teacher,student}/   every step's attribution scores (:mod:`pktjax.attribution_cache`)

The examples of all remaining steps are located before the first one, in one batched pass per model
(:func:`locate_pair`); scores already in the cache are read back.

Calling :func:`train_aligner` again on the same folder resumes after the last saved step and ends with the same
aligner as an uninterrupted run, on any mesh.

With ``mesh=`` (SPEC §7) the teacher and student stream into their shardings, the aligner and its optimizer state
are laid out by :mod:`pktjax.sharding`'s rules (``W1`` on ``tensor x fsdp``, ``W2`` on ``fsdp x tensor``), each
micro-batch is split over ``(data, fsdp)``, and the gradient and update are jitted with explicit in/out shardings
(the update donates the aligner and optimizer state). Locate and extract follow the weights' shardings by
propagation. Only process 0 writes ``run.json`` and ``log.jsonl`` and shows the progress bar; every process takes
part in the orbax saves.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import random
import sys
import time
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
from pktjax.align import AlignerParams, align, init_aligner, mean_square
from pktjax.attribution import locate_each
from pktjax.attribution_cache import check_folder, model_fingerprint
from pktjax.checkpoint import Model, load_model, read_model_config
from pktjax.config import ModelConfig
from pktjax.data import Tokenized, bucket_length, iter_chunks, pad_left, read_jsonl, tokenize_laten
from pktjax.errors import ConfigError, DamagedFileError, DataError, PairError
from pktjax.extract import extract
from pktjax.inject import delta_adapter, delta_sizes, inject
from pktjax.losses import mean_token_ce
from pktjax.model import forward
from pktjax.pair import check_laten_pair, check_tokenizers, layer_count
from pktjax.progress import progress_bar
from pktjax.runfolder import Checkpoints, append_jsonl, fault_point, lock, read_json, write_json, write_jsonl
from pktjax.select import Selection, select
from pktjax.settings import DEFAULT_DTYPE, AlignerTrainConfig, result_keys
from pktjax.tokenizer import load_tokenizer
from pktjax.tracking import Tracker

log = logging.getLogger("pktjax.laten")
Source = Model | str | os.PathLike


TrainConfig = AlignerTrainConfig  # the aligner's settings (defined with the other settings)


# ----------------------------------------------------------------------------------------------- the pair


@dataclasses.dataclass(frozen=True)
class Pair:
    """Loaded teacher and student with their shared tokenizer, modules and ``(N_f, N_a)``."""

    teacher: Model
    student: Model
    tokenizer: Any
    modules: tuple[str, ...]
    counts: tuple[int, int]


def peek_config(src: Source) -> ModelConfig:
    """A model's config without loading its weights (folder ``config.json`` or GGUF metadata)."""
    if isinstance(src, Model):
        return src.config
    return read_model_config(src)


def _source_path(src: Source) -> str | None:
    return src.source if isinstance(src, Model) else str(src)


def _pair_tokenizer(teacher: Source, student: Source, tokenizer=None):
    t_path, s_path = _source_path(teacher), _source_path(student)
    if tokenizer is None:
        if s_path is None:
            raise ConfigError("the student has no source folder to read a tokenizer from; pass tokenizer=.")
        tokenizer = load_tokenizer(s_path)
    if t_path is not None:
        check_tokenizers(load_tokenizer(t_path), tokenizer)
    return tokenizer


def _load(src: Source, mesh: Mesh | None, dtype: str = DEFAULT_DTYPE) -> Model:
    """A :class:`Model` from a path (``dtype`` weights streamed into the mesh's shardings) or a loaded one
    (placed by the rules, its dtype kept)."""
    if not isinstance(src, Model):
        return load_model(src, dtype=jnp.dtype(dtype), mesh=mesh)
    return src if mesh is None else src.replace(params=S.shard(src.params, mesh))


def prepare_pair(teacher: Source, student: Source, *, rate: float, modules: Sequence[str] | None = None,
                 tokenizer=None, mesh: Mesh | None = None, layers: int | None = None,
                 dtype: str = DEFAULT_DTYPE) -> Pair:
    """Check a teacher/student pair from configs and tokenizers, then load the weights in ``dtype`` (the heavy
    part last; with ``mesh``, each weight laid out by the sharding rules).

    Errors: :class:`PairError` (vocabulary, tokenizer, teacher not larger), :class:`ConfigError` (rate outside
    (0, 1], ``v_proj`` with GQA, unknown module, ``layers`` beyond either model's depth).
    """
    cfg_t, cfg_s = peek_config(teacher), peek_config(student)
    modules, counts = check_laten_pair(cfg_t, cfg_s, rate=rate, modules=modules, layers=layers)
    tokenizer = _pair_tokenizer(teacher, student, tokenizer)
    return Pair(_load(teacher, mesh, dtype), _load(student, mesh, dtype), tokenizer, modules, counts)


def locate_pair(pair: Pair, examples: Sequence[dict[str, Any]], mode: str = "reference",
                attention: str = "last_key", layers: int | None = None,
                cache: str | os.PathLike | None = None) -> list[tuple[Selection, Selection]]:
    """Locate on each of ``examples`` in both models (batched passes, :func:`pktjax.attribution.locate_each`;
    neurons scored only in each example's top ``K`` layers) and select ``K`` layers (``layers``, default ``L_S``)
    and ``(N_f, N_a)`` neurons each: ``[(teacher selection, student selection)]``, one per example. ``cache``: a
    folder whose ``teacher/`` and ``student/`` subfolders keep the scores (:mod:`pktjax.attribution_cache`)."""
    k = layer_count(pair.teacher.config, pair.student.config, layers)
    per_model = []
    for role, m in (("teacher", pair.teacher), ("student", pair.student)):
        folder = None if cache is None else Path(cache) / role
        attrs = locate_each(m.params, m.config, pair.tokenizer, examples, mode=mode, attention=attention,
                            layers=k, cache=folder)
        per_model.append([select(a, k, *pair.counts) for a in attrs])
    return list(zip(*per_model))


def locate_and_extract(pair: Pair, example: dict[str, Any], mode: str = "reference", attention: str = "last_key",
                       layers: int | None = None, cache: str | os.PathLike | None = None,
                       ) -> tuple[dict[str, jax.Array], Selection, Selection]:
    """Locate on one example in both models (:func:`locate_pair`), extract the teacher's knowledge. Returns
    ``(knowledge [K, ...] per module, teacher selection, student selection)``."""
    sel_t, sel_s = locate_pair(pair, [example], mode, attention, layers, cache)[0]
    return extract(pair.teacher.params, pair.teacher.config, sel_t, pair.modules), sel_t, sel_s


# ------------------------------------------------------------------------------------------------ the loss


def aligner_loss(aligner: AlignerParams, student_params, cfg: ModelConfig, selection: Selection,
                 knowledge: dict[str, jax.Array], batch: dict[str, jax.Array], mse_weight: float | jax.Array,
                 injection: str = "products"):
    """``sum_b weight_b * (CE_b + mse_weight * MSE)`` over one micro-batch; returns ``(loss, (ce_sum, mse))``.

    ``batch``: ``ids, mask, labels [B, T]`` (left padded) and ``weight [B]`` (1 for an example, 0 for filler).
    ``injection`` (static): ``"products"`` adds the deltas inside the forward's products (:func:`delta_adapter`,
    what training uses); ``"weights"`` writes them into new weights first (:func:`inject`; same loss up to
    rounding, slower: it copies the stacks and differentiates the whole weights).
    """
    chex.assert_equal_shape([batch["ids"], batch["mask"], batch["labels"]])
    chex.assert_shape(batch["weight"], batch["ids"].shape[:1])
    deltas = align(aligner, knowledge)
    if injection == "weights":
        logits = forward(inject(student_params, cfg, selection, deltas), cfg, batch["ids"], batch["mask"])
    else:
        logits = forward(student_params, cfg, batch["ids"], batch["mask"],
                         adapter=delta_adapter(cfg, selection, deltas))
    ce = mean_token_ce(logits, batch["labels"])
    mse = mean_square(deltas)
    return jnp.sum(batch["weight"] * (ce + mse_weight * mse)), (jnp.sum(batch["weight"] * ce), mse)


_micro_grad = jax.jit(jax.value_and_grad(aligner_loss, has_aux=True), static_argnums=(2, 7))


def micro_batches(items: Sequence[Tokenized], size: int, pad_id: int, bucket: int,
                  max_len: int) -> list[dict[str, np.ndarray]]:
    """Examples sorted by length, cut into micro-batches of exactly ``size`` rows (the last one filled with
    zero-weight copies), left padded with ``pad_id`` to ``min(bucket_length(longest, bucket), max_len)``."""
    order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
    out = []
    for chunk in iter_chunks(order, size):
        rows = [items[i] for i in chunk]
        weight = np.zeros(size, np.float32)
        weight[:len(rows)] = 1.0
        rows += [rows[0]] * (size - len(rows))
        longest = max(len(r.ids) for r in rows)
        b = pad_left(rows, pad_id, min(bucket_length(longest, bucket), max(max_len, longest)))
        out.append({"ids": b.ids, "mask": b.mask, "labels": b.labels, "weight": weight})
    return out


def step_gradients(aligner: AlignerParams, student: Model, selection: Selection, knowledge: dict[str, jax.Array],
                   batches: Sequence[dict[str, np.ndarray]], mse_weight: float, mesh: Mesh | None = None,
                   injection: str = "products"):
    """Loss and aligner gradient summed over micro-batches: ``(loss, ce_sum, mse, grads)`` (device arrays).

    ``knowledge``: ``{module: [K, n, d_T]}``; ``batches``: ``ids, mask, labels [B, T]``, ``weight [B]``. With
    ``mesh``: knowledge laid out by the rules, rows split over ``(data, fsdp)``, ``grads`` sharded like the aligner.
    ``injection``: see :func:`aligner_loss`.
    """
    grad_fn = _micro_grad
    if mesh is not None:
        grad_fn, knowledge = _sharded_steps(mesh)[0], S.shard(knowledge, mesh)
        batches = [S.shard_batch(b, mesh) for b in batches]
    loss = ce = mse = grads = None
    for batch in batches:
        (l_b, (ce_b, mse)), g_b = grad_fn(aligner, student.params, student.config, selection, knowledge, batch,
                                          mse_weight, injection)
        loss, ce = (l_b, ce_b) if loss is None else (loss + l_b, ce + ce_b)
        grads = g_b if grads is None else jax.tree.map(jnp.add, grads, g_b)
    return loss, ce, mse, grads


# ------------------------------------------------------------------------------------------- the optimizer

OPTIMIZER = optax.chain(optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8), optax.add_decayed_weights(0.05))


def lr_schedule(lr: float, total: int) -> Callable[[int], float]:
    """The authors' one-cycle cosine over ``total`` steps (torch ``OneCycleLR(max_lr=lr, total_steps=total,
    pct_start=0.1, final_div_factor=1, anneal_strategy="cos")``): ``step -> learning rate``.

    Warm-up from ``lr/25`` at step 0 to ``lr`` at step ``p = 0.1 total - 1`` (not always an integer), then down
    to ``lr/25`` at step ``total - 1``; each phase is ``end + (start - end) (1 + cos(pi t)) / 2`` with ``t`` the
    fraction of the phase done. ``total`` is the extract split's size, whatever number of steps is run."""
    if total < 1:
        raise ConfigError(f"the schedule needs at least one step (total={total}).")
    low, peak, last = lr / 25.0, 0.1 * total - 1.0, total - 1.0

    def cos(start: float, end: float, t: float) -> float:
        return end + (start - end) / 2.0 * (1.0 + math.cos(math.pi * t))

    def schedule(step: int) -> float:
        if step <= peak:
            return cos(low, lr, step / peak) if peak > 0 else lr
        return cos(lr, low, (step - peak) / (last - peak))

    return schedule


@jax.jit
def apply_update(aligner: AlignerParams, opt_state, grads: AlignerParams, lr: jax.Array):
    """AdamW: ``p <- p - lr * (adam(g) + 0.05 p)``; returns ``(aligner, opt_state)``."""
    updates, opt_state = OPTIMIZER.update(grads, opt_state, aligner)
    return jax.tree.map(lambda p, u: p - lr * u, aligner, updates), opt_state


@functools.cache
def _sharded_steps(mesh: Mesh) -> tuple[Callable, Callable]:
    """``(micro-batch gradient, update)`` on ``mesh``: jitted with explicit shardings from the rules (batch split
    over ``(data, fsdp)``); the update donates the aligner and optimizer state."""
    grad = S.cached_sharded_jit(jax.value_and_grad(aligner_loss, has_aux=True), mesh, static_argnums=(2, 7),
                                batch_argnums=(5,))
    return grad, S.cached_sharded_jit(apply_update, mesh, donate_argnums=(0, 1))


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


# ------------------------------------------------------------------------------------------ checkpoints


def aligner_steps(out_dir: str | os.PathLike) -> list[int]:
    """Steps whose aligner was saved in a training folder."""
    folder = Path(out_dir) / "aligner"
    return Checkpoints(folder, create=False).steps() if folder.is_dir() else []


def load_aligner(out_dir: str | os.PathLike, step: int) -> AlignerParams:
    """The aligner saved after ``step`` in a training folder, verified against its checksums
    (:class:`ConfigError` naming the saved steps; :class:`DamagedFileError` for a damaged step)."""
    steps = aligner_steps(out_dir)
    if step not in steps:
        raise ConfigError(f"{out_dir}: no aligner saved for step {step}; saved steps: {steps or 'none'}.")
    try:
        return Checkpoints(Path(out_dir) / "aligner", create=False).restore(step)
    except DamagedFileError as e:
        raise DamagedFileError(f"{e} Retrain the aligner (a new output folder, or delete this one).") from None


def read_run(out_dir: str | os.PathLike) -> dict[str, Any]:
    """``run.json`` of a training folder."""
    path = Path(out_dir) / "run.json"
    if not path.is_file():
        raise ConfigError(f"{out_dir}: not an aligner training folder (no run.json).")
    return read_json(path, "aligner run record")


class _Store:
    """The training folder: ``aligner/`` (every step, its log line in the step's manifest), ``state/`` (the last
    two steps, so a damaged latest falls back to the one before), ``log.jsonl``. A step's log line is written
    before its checkpoints. Every process saves and restores its shards (orbax); only process 0 writes the log."""

    def __init__(self, out_dir: Path, mesh: Mesh | None = None):
        self.out, self.mesh, self.log = out_dir, mesh, out_dir / "log.jsonl"
        self.aligner = Checkpoints(out_dir / "aligner")
        self.state = Checkpoints(out_dir / "state", keep=2)

    def save(self, step: int, aligner: AlignerParams, opt_state, metrics: dict[str, Any]) -> None:
        if S.is_main_process():
            append_jsonl(self.log, [metrics])
        fault_point("aligner:after-log")
        self.aligner.save(step, aligner, meta={"log": metrics})
        fault_point("aligner:after-aligner")
        self.state.save(step, {"aligner": aligner, "opt_state": opt_state})

    def resume(self, template: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        """``(next step, restored state or None)`` from the newest state that verifies (damaged ones are dropped,
        said on stderr); drops aligner steps and log lines past it, rebuilds a damaged or incomplete log from the
        aligner manifests and re-saves a damaged aligner of that step from the state. ``template``: a fresh
        state, whose shardings the restored arrays take."""
        last, state = self.state.latest_good(template)
        for s in self.aligner.steps():
            if last is None or s > last:
                self.aligner.delete(s)
        self._trim_log(-1 if last is None else last)
        if last is None:
            return 0, None
        state = S.place(state, self.mesh)  # placed like a fresh state: no recompiles
        if last not in self.aligner.steps() or self.aligner.problem(last):
            line = [r for r in runfolder.read_jsonl(self.log) if r["step"] == last] if self.log.is_file() else []
            self.aligner.save(last, state["aligner"], meta={"log": line[0] if line else None})
        return last + 1, state

    def _trim_log(self, last: int) -> None:
        """Keep the log lines of steps ``0..last``, one each; rebuilt from the aligner manifests when lines are
        missing, repeated or damaged (:class:`DamagedFileError` when they cannot be rebuilt)."""
        if not S.is_main_process():
            return
        try:
            rows = runfolder.read_jsonl(self.log, on_bad="trim") if self.log.is_file() else []
            keep = [r for r in rows if r["step"] <= last]
        except (DataError, KeyError, TypeError) as e:
            rows, keep, why = None, None, str(e)
        if keep is not None and [r["step"] for r in keep] == list(range(last + 1)):
            if len(keep) != len(rows):
                write_jsonl(self.log, keep)
            return
        metas = [self.aligner.meta(t) if t in self.aligner.steps() else None for t in range(last + 1)]
        if any(not (m and m.get("log")) for m in metas):
            raise DamagedFileError(f"{self.log}: the log lacks steps of this run and the aligner checkpoints "
                                   "cannot rebuild it; retrain in a new output folder.")
        if keep is not None:
            why = f"steps {sorted(set(range(last + 1)) - {r['step'] for r in keep})} missing or repeated"
        print(f"pktjax: {self.log}: {why}; rebuilt from the aligner checkpoints.", file=sys.stderr)
        write_jsonl(self.log, [m["log"] for m in metas])

    def close(self) -> None:
        self.aligner.close()
        self.state.close()


def _resume_view(run: dict[str, Any]) -> dict[str, Any]:
    """The part of a run record a resumed run must match, flattened: the settings that can change results (memory
    knobs such as ``micro_batch`` may differ; a record written before they were told apart is read the same way)."""
    keep = set(result_keys(TrainConfig)) | {"modules"}
    config = {f"config.{k}": v for k, v in run.get("config", {}).items() if k in keep}
    return {**{k: v for k, v in run.items() if k != "config"}, **config}


def _start_run(out_dir: Path, run: dict[str, Any]) -> None:
    """Write ``run.json`` (process 0), or check that an existing one describes the same run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "run.json"
    if path.is_file():
        try:
            old = read_json(path, "aligner run record")
        except DamagedFileError as e:
            raise DamagedFileError(f"{e} If this folder holds a run with the same settings, delete run.json and "
                                   "rerun; otherwise choose a new output folder.") from None
        old, new = _resume_view(old), _resume_view(run)
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if diff:
            raise ConfigError(f"{out_dir} holds a different aligner run (differs in {', '.join(diff)}); resume "
                              "with the same settings or choose a new output folder.")
        return
    if S.is_main_process():
        write_json(path, run, checksum=True)


# ---------------------------------------------------------------------------------------------- training


def load_examples(src: Sequence[dict[str, Any]] | str | os.PathLike, what: str) -> list[dict[str, Any]]:
    """Chat examples from a list or a JSONL path; an empty split is a :class:`DataError`."""
    examples = read_jsonl(src) if isinstance(src, (str, os.PathLike)) else list(src)
    if not examples:
        raise DataError(f"the {what} split is empty; it needs at least one example.")
    return examples


def _check_data(config: TrainConfig, n_extract: int, n_align: int) -> int:
    """The number of steps to run (``config.steps``, at most the extract split's size)."""
    steps = n_extract if config.steps is None else config.steps
    if not 1 <= steps <= n_extract:
        raise ConfigError(f"steps={steps} must be between 1 and the extract split's size {n_extract} (the "
                          "schedule always spans the whole split; steps only stops the run early).")
    if n_align < config.examples_per_step - 1:
        raise DataError(f"the align split has {n_align} examples; each step draws {config.examples_per_step - 1} "
                        "of them. Use a larger split or fewer examples per step.")
    return steps


def _run_record(pair: Pair, config: TrainConfig, order: np.ndarray, n_extract: int, n_align: int) -> dict[str, Any]:
    """What a resumed run must match. ``steps`` is left out: stopping earlier or going on later is the same run
    (the schedule spans ``schedule_steps``, the whole extract split)."""
    t, s = pair.teacher.config, pair.student.config
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "steps"}
    if settings["dtype"] == DEFAULT_DTYPE:  # runs recorded before weights had a dtype setting were float32
        del settings["dtype"]
    return {"config": {**settings, "modules": list(pair.modules)}, "schedule_steps": n_extract,
            "modules": list(pair.modules), "d_teacher": t.hidden_size, "d_student": s.hidden_size,
            "teacher_layers": t.num_layers, "student_layers": s.num_layers, "counts": list(pair.counts),
            "order": [int(i) for i in order], "n_align": n_align}


def _train_step(step: int, state: dict[str, Any], pair: Pair, located: tuple[Selection, Selection],
                batch_items: list[Tokenized], config: TrainConfig, lr: float,
                mesh: Mesh | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """One aligner step from the step's ``(teacher, student)`` selections; returns ``(new state, metrics)``. A
    non-finite loss or gradient leaves the state."""
    t0 = time.perf_counter()
    sel_t, sel_s = located
    knowledge = extract(pair.teacher.params, pair.teacher.config, sel_t, pair.modules)
    batches = micro_batches(batch_items, config.micro_batch, pair.tokenizer.eos_token_id, config.bucket,
                            config.cutoff_len)
    loss, ce, mse, grads = step_gradients(state["aligner"], pair.student, sel_s, knowledge, batches,
                                          config.mse_weight, mesh)
    loss, ce, mse = (float(x) for x in jax.device_get((loss, ce, mse)))
    skipped = not (math.isfinite(loss) and bool(_all_finite(grads)))
    if skipped:
        log.warning("step %d: loss %s is not finite; the step is skipped (aligner unchanged).", step, loss)
    else:
        update = apply_update if mesh is None else _sharded_steps(mesh)[1]
        aligner, opt_state = update(state["aligner"], state["opt_state"], grads, jnp.float32(lr))
        state = {"aligner": aligner, "opt_state": opt_state}
    # what this step's checkpoint injects on this step's selection (the ``mse`` above is the aligner before it)
    delta = delta_sizes(pair.student.params, pair.student.config, sel_s, align(state["aligner"], knowledge))
    metrics = {"step": step, "loss": loss, "ce": ce / len(batch_items), "mse": mse, "lr": lr, "skipped": skipped,
               "delta": delta, "seconds": round(time.perf_counter() - t0, 3)}
    return state, metrics


@dataclasses.dataclass(frozen=True)
class _Run:
    """Everything a run needs besides the trained state."""

    pair: Pair
    config: TrainConfig
    steps: int  # steps to run; the schedule spans len(extract_examples)
    order: np.ndarray
    extract_examples: list[dict[str, Any]]
    extract_tokens: list[Tokenized]
    align_tokens: list[Tokenized]
    mesh: Mesh | None


def step_order(n_extract: int, seed: int) -> np.ndarray:
    """The extract examples in the order the steps take them (a permutation drawn from ``seed``)."""
    return np.random.default_rng(seed).permutation(n_extract)


def _prepare(teacher: Source, student: Source, extract_examples, align_examples, config: TrainConfig,
             tokenizer, mesh: Mesh | str | None) -> _Run:
    """All checks (mesh and data first, then the pair), then the models, tokens and the seeded order."""
    config.validate()
    mesh = S.as_mesh(mesh)
    extract_ex = load_examples(extract_examples, "extract")
    align_ex = load_examples(align_examples, "align")
    steps = _check_data(config, len(extract_ex), len(align_ex))
    pair = prepare_pair(teacher, student, rate=config.rate, modules=config.modules, tokenizer=tokenizer, mesh=mesh,
                        layers=config.layers, dtype=config.dtype)
    tok = functools.partial(tokenize_laten, pair.tokenizer, cutoff_len=config.cutoff_len,
                            train_on_inputs=config.train_on_inputs)
    order = step_order(len(extract_ex), config.seed)
    return _Run(pair, config, steps, order, extract_ex, [tok(e) for e in extract_ex], [tok(e) for e in align_ex],
                mesh)


def _run_steps(run: _Run, state: dict[str, Any], start: int, store: _Store, bar, callback,
               cache: Path | None, tracker: Tracker) -> dict[str, Any]:
    schedule = lr_schedule(run.config.lr, len(run.extract_examples))
    c = run.config  # every step's example located up front, in one batched pass per model
    todo = [run.extract_examples[int(run.order[t])] for t in range(start, run.steps)]
    located = locate_pair(run.pair, todo, c.mode, c.attention, c.layers, cache) if todo else []  # none: finished
    for step in range(start, run.steps):
        drawn = random.Random(step).sample(range(len(run.align_tokens)), run.config.examples_per_step - 1)
        ex = int(run.order[step])
        items = [run.align_tokens[i] for i in drawn] + [run.extract_tokens[ex]]
        state, metrics = _train_step(step, state, run.pair, located[step - start], items, run.config,
                                     schedule(step), run.mesh)
        metrics.update(example=ex, align_examples=drawn)
        store.save(step, state["aligner"], state["opt_state"], metrics)
        tracker.log(metrics, step)
        # the values first: a plain (non-terminal) bar prints its line on update
        bar.set_postfix(loss=f"{metrics['loss']:.4g}", ce=f"{metrics['ce']:.4g}", mse=f"{metrics['mse']:.3g}")
        bar.update(1)
        if callback is not None:
            callback(step, metrics)
    return state


def train_aligner(teacher: Source, student: Source, extract_examples, align_examples, out_dir: str | os.PathLike,
                  config: TrainConfig = TrainConfig(), *, tokenizer=None,
                  callback: Callable[[int, dict[str, Any]], None] | None = None,
                  progress: bool = True, mesh: Mesh | str | None = None,
                  cache: str | os.PathLike | None = None, tracker: Tracker | None = None) -> AlignerParams:
    """Train LaTen's aligner (SPEC §3.6) and return its final parameters; see the module docstring.

    ``teacher``/``student``: :class:`Model` or checkpoint paths; ``extract_examples``/``align_examples``: lists
    of chat examples or JSONL paths. Bad input (empty split, vocabulary mismatch, teacher not larger, ``v_proj``
    with GQA, rate outside (0, 1]) raises before any model is loaded. ``callback(step, metrics)`` runs after each
    saved step. Resumes from ``out_dir`` if it holds a run with the same settings (the mesh may differ).
    ``mesh``: ``None`` (one device), a :class:`Mesh` or a spec such as ``"data=2,fsdp=2,tensor=2"``; see the
    module docstring. ``cache``: where the attribution scores are kept (default ``out_dir/attribution_cache``;
    not kept when several processes share the run), so a resumed run or another run on the same examples
    reads them back instead of locating again. ``tracker``: also log each step's metrics there
    (:mod:`pktjax.tracking`).
    """
    config.validate()  # before the folder is locked (created)
    out_dir = Path(out_dir)
    with lock(out_dir, "aligner training"):
        return _train_locked(teacher, student, extract_examples, align_examples, out_dir, config, tokenizer,
                             callback, progress, mesh, cache, tracker or Tracker())


def _train_locked(teacher, student, extract_examples, align_examples, out_dir: Path, config: TrainConfig,
                  tokenizer, callback, progress: bool, mesh, cache, tracker: Tracker) -> AlignerParams:
    run = _prepare(teacher, student, extract_examples, align_examples, config, tokenizer, mesh)
    t_cfg, s_cfg = run.pair.teacher.config, run.pair.student.config
    cache = None if jax.process_count() > 1 else Path(cache or out_dir / "attribution_cache")
    if cache is not None:  # another model's scores are refused before the run writes anything
        for role, m in (("teacher", run.pair.teacher), ("student", run.pair.student)):
            check_folder(cache / role, model_fingerprint(m.params, m.config))
    _start_run(out_dir, _run_record(run.pair, config, run.order, len(run.extract_examples), len(run.align_tokens)))
    aligner = init_aligner(jax.random.PRNGKey(config.seed), run.pair.modules, t_cfg.hidden_size, s_cfg.hidden_size)
    state = S.place({"aligner": aligner, "opt_state": OPTIMIZER.init(aligner)}, run.mesh)
    store = _Store(out_dir, run.mesh)
    bar = progress_bar(run.steps, "aligner", "step", enabled=progress and S.is_main_process())
    try:
        start, restored = store.resume(state)
        bar.update(start)
        state = _run_steps(run, restored or state, start, store, bar, callback, cache, tracker)
    finally:
        bar.close()
        store.close()
    return state["aligner"]
