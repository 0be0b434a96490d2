"""Chains of library calls that more than one entry point runs: the ``pktjax`` sub-commands and the main job
(:mod:`pktjax.transfer`) call these rather than repeating them.

- :func:`extract_to` / :func:`seeking_factors`: Seeking's extraction (teacher sensitivity, layer and sub-matrix
  selection, SVD) from checkpoint paths into a PEFT adapter folder of the student's shape (cached in a folder);
- :func:`train_adapter`: a LoRA (standard, PiSSA or Seeking init) fine-tuned on chat examples, exported (PEFT);
- :func:`merge_adapter`: an adapter folder merged into its student;
- :func:`train_semalign`: SemAlign (attribution, pairing, recomposed teacher targets, one student layer trained);
- :func:`analyze_pair`: the neural-incompatibility analysis of a pair (figures, ``report.md``, ``analysis.json``);
- :func:`probe_examples` / :func:`seed_examples`: the example sets those read.
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pktjax import analysis, lora, plots
from pktjax import sharding as S
from pktjax.analysis import heatmap_summary, probe_tokens
from pktjax.checkpoint import Model, load_model
from pktjax.data import LATEN_TASKS, SEEKING_TASKS, laten_split, read_jsonl, seeking_file, tokenize_seeking
from pktjax.errors import ConfigError, PairError
from pktjax.lora import TARGETS, check_targets, export_peft, import_peft, merge_model
from pktjax.lora_train import check_resume, run_record, train
from pktjax.pair import check_tokenizers
from pktjax.provenance import provenance
from pktjax.runfolder import atomic_write, lock, read_result, verify, write_json
from pktjax.seeking import extract_for_examples, task_file
from pktjax.semalign import critical_layer, layer_attribution, pair_layers
from pktjax.sensitivity import seed_batches
from pktjax.settings import DEFAULT_DTYPE, AnalysisSettings, as_dict
from pktjax.tokenizer import load_tokenizer

Examples = list[dict[str, Any]]
# Defaults of the analysis (`pktjax analyze` and a transfer config's `analysis:` section).
ANALYSIS_DEFAULTS = as_dict(AnalysisSettings())


# ------------------------------------------------------------------------------------------------------ examples

def probe_file(task: str) -> Path:
    """The file of a probe set: a LaTen task's train split (gsm, mmlu, humaneval, mbpp), else the JSONL path."""
    return laten_split(task, "train") if task in LATEN_TASKS else Path(task).expanduser()


def probe_examples(task: str, n: int) -> Examples:
    """The first ``n`` examples of a LaTen task's train split (gsm, mmlu, humaneval, mbpp) or of a JSONL file."""
    if n < 1:
        raise ConfigError("the probe set needs at least one example (n_examples >= 1).")
    return read_jsonl(probe_file(task), limit=n)


def seed_file(task: str) -> Path:
    """The file Seeking's seed examples come from (:func:`seed_examples`)."""
    return seeking_file(task, "sample") if task in SEEKING_TASKS else probe_file(task)


def seed_examples(task: str, samples: int = 32, probe: int | None = None) -> Examples:
    """Seeking's seed examples: up to ``samples`` of a Seeking task's shipped samples (gsm, mmlu, super_ni, lima);
    a task without them (humaneval, mbpp, a JSONL file) uses the first ``probe`` (default ``samples``) examples
    of its probe set (:func:`probe_examples`)."""
    if task in SEEKING_TASKS:
        return read_jsonl(seed_file(task), limit=samples)
    return probe_examples(task, probe or samples)


# ----------------------------------------------------------------------------------------- Seeking and LoRA runs

def extract_to(teacher: str | os.PathLike, student: str | os.PathLike, student_cfg, seeds: str | Sequence[dict],
               out: str | os.PathLike, *, rank: int, targets=None, samples: int = 32, cutoff_len: int = 2048,
               dtype: str = DEFAULT_DTYPE, mesh=None) -> dict:
    """Seeking's extraction from checkpoint paths into the adapter folder ``out`` (+ ``extraction.json``).

    ``seeds``: a Seeking task name or JSONL path (its sample file is read), or the seed examples themselves;
    at most ``samples`` are used. ``dtype``: the teacher weights' storage dtype; ``mesh`` (a Mesh or a spec): the
    teacher is loaded onto it by the sharding rules. Returns the plan (``{"layers", "windows"}``)."""
    targets = check_targets(targets or TARGETS)
    mesh = S.as_mesh(mesh)
    tokenizer = load_tokenizer(teacher)
    check_tokenizers(tokenizer, load_tokenizer(student))
    if isinstance(seeds, str):
        examples = read_jsonl(task_file(seeds, "sample"), limit=samples)
    else:
        examples = list(seeds)[:samples]
    teacher_model = load_model(teacher, dtype=jnp.dtype(dtype), mesh=mesh)
    lora, cut = extract_for_examples(teacher_model, student_cfg, tokenizer, examples, rank, targets=targets,
                                     cutoff_len=cutoff_len)
    folder = export_peft(lora, student_cfg, out, alpha=rank, base_model=str(student))
    info = {"teacher": str(teacher), "student": str(student), "task": seeds if isinstance(seeds, str) else "given",
            "samples": len(examples), "rank": rank, "teacher_layers": cut["layers"],
            "windows": {t: [list(w) for w in ws] for t, ws in cut["windows"].items()}}
    write_json(Path(folder) / "extraction.json", info, checksum=True, indent=2)
    return cut


def seeking_factors(teacher, student, student_cfg, seeds, folder: str | os.PathLike, **kw) -> dict:
    """The Seeking LoRA factors cached in ``folder``: extracted there by :func:`extract_to` (same ``seeds`` and
    keywords) unless a finished extraction (``extraction.json``) is already there, then read back."""
    folder = Path(folder).expanduser()
    if read_result(folder / "extraction.json", "extraction record") is None:
        shutil.rmtree(folder, ignore_errors=True)  # an extraction cut short leaves nothing reusable
        extract_to(teacher, student, student_cfg, seeds, folder, **kw)
    return import_peft(folder, student_cfg)[0]


def train_adapter(student, tokenizer, examples: Sequence[dict], out: str | os.PathLike, tc, *,
                  method: str = "default", targets=None, teacher_lora: dict | None = None,
                  progress: bool = True, mesh=None, data_files: Sequence[str | os.PathLike] = (),
                  tracker=None) -> Path:
    """Initialise a LoRA (``default`` | ``pissa`` | ``seeking`` from ``teacher_lora``), fine-tune it on
    ``examples`` (Seeking tokenization, response-only loss; :class:`pktjax.lora_train.TrainConfig` ``tc``) with
    checkpoints and ``metrics.jsonl`` under ``out``, and export it to ``out/adapter`` in PEFT's format for the
    *original* student. A run left unfinished in ``out`` resumes. ``student``: a loaded :class:`Model`;
    ``mesh``: shard the training over it (every process trains; process 0 writes the adapter); ``data_files``: the
    files ``examples`` came from (hashed into ``metrics.jsonl``'s provenance); ``tracker``: also log the training
    curves there (:mod:`pktjax.tracking`)."""
    targets = targets or (lora.targets_of(teacher_lora) if teacher_lora else lora.TARGETS)
    base, lora0 = lora.init(student.params, student.config, tc.rank, tc.alpha, targets, method,
                            key=jax.random.key(tc.seed), teacher_lora=teacher_lora)
    items = [tokenize_seeking(tokenizer, ex, tc.cutoff_len) for ex in examples]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = Path(out).expanduser()
    with lock(out, "LoRA training"):  # held through the export too
        trained = train(base, student.config, lora0, items, out, tc, pad_id=pad, progress=progress, mesh=mesh,
                        data_files=data_files, tracker=tracker)
        trained, lora0 = S.to_host((trained, lora0))  # gathered on every process
        if not S.is_main_process():
            return out / "adapter"
        return lora.export_peft(trained, student.config, out / "adapter", alpha=tc.alpha, dropout=tc.dropout,
                                initial=None if method == "default" else lora0, base_model=str(student.source),
                                overwrite=True)


def merge_adapter(student, adapter: str | os.PathLike, dtype: str = DEFAULT_DTYPE):
    """The :class:`Model` ``student`` with the PEFT adapter folder ``adapter`` merged in, weights cast to ``dtype``."""
    lora, scale = import_peft(adapter, student.config)
    merged = merge_model(student, lora, scale)
    cast = jax.tree.map(lambda x: x.astype(getattr(jnp, dtype)), merged.params)
    return Model(params=cast, config=merged.config, source=merged.source)


# ------------------------------------------------------------------------------------------------------ SemAlign

def semalign_plan(teacher, seeds: Examples, tokenizer, student_cfg, sc, folder: Path, cutoff_len: int) -> dict:
    """The attribution (cached in ``folder/plan.json``; ``teacher``: a loaded :class:`Model`) and the pairing
    (derived each time, so ``sc.layer`` always applies). Returns ``{"scores", "critical", "samples",
    "pairing": {...}}``."""
    path = folder / "plan.json"
    plan = read_result(path, "SemAlign plan")  # a damaged one is removed and computed again
    if plan is None:
        scores = layer_attribution(teacher.params, teacher.config, seed_batches(tokenizer, seeds, cutoff_len))
        plan = {"scores": scores.tolist(), "critical": critical_layer(scores), "samples": len(seeds)}
        write_json(path, plan, checksum=True)
    pairing = pair_layers(plan["critical"], teacher.config.num_layers, student_cfg.num_layers, sc.layer)
    return {**plan, "pairing": dataclasses.asdict(pairing)}


def _cached_map(path: Path, compute) -> np.ndarray:
    """SemAlign's alignment map, computed once per plan folder (minutes on a CPU at a 152k vocabulary); kept with
    its sha256, a damaged one is computed again."""
    if verify(path):
        return np.load(path)
    if path.is_file():
        print(f"pktjax: {path} is damaged or has no checksum; computing it again.", file=sys.stderr)
    m = compute()
    buf = io.BytesIO()
    np.save(buf, m)
    atomic_write(path, buf.getvalue(), checksum=True)
    return m


def check_semalign_pair(teacher_cfg, student_cfg, sc) -> None:
    """Config-only checks of a SemAlign pair (before any weights are read)."""
    sc.validate(student_cfg.num_layers)
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise PairError(f"teacher vocabulary {teacher_cfg.vocab_size} != student vocabulary "
                        f"{student_cfg.vocab_size}: SemAlign's semantic bases need one shared vocabulary.")
    if teacher_cfg.num_layers < 2:
        raise PairError("SemAlign interpolates between two teacher layers: the teacher needs at least 2 layers.")


def semalign_record(sc) -> dict[str, Any]:
    """The SemAlign entries of a run's ``train_config.json`` besides the trainer's settings (the pairing adds
    ``student_layer``)."""
    return {"method": "semalign", **{f: getattr(sc, f) for f in ("mode", "compare", "frame")},
            "targets": list(sc.targets)}


def train_semalign(teacher_path, student_path, seeds: Examples, examples: Examples, out: str | os.PathLike, tc, sc,
                   *, teacher_dtype: str = "float32", progress: bool = True, mesh=None,
                   probe: Examples | None = None, probe_kw: dict[str, Any] | None = None,
                   plan_folder: str | os.PathLike | None = None, data_files: Sequence[str | os.PathLike] = (),
                   tracker=None):
    """A SemAlign run from checkpoint paths into ``out``; returns ``(trained student Model, info dict)``.

    Teacher attribution on ``seeds`` (``plan.json``) and the alignment map of the two heads
    (``alignment_map_<frame>.npy``), both kept in ``plan_folder`` (default ``out``; the transfer job shares one
    between seeds), the pairing, the recomposed teacher targets of ``examples`` (recomputed on a resume; the
    teacher is released before training), then :func:`pktjax.lora_train.fit` of student layer ``k†``
    (checkpoints, ``metrics.jsonl`` under ``out``; an unfinished run resumes). Output: ``out/adapter`` (PEFT, LoRA mode: zero factors outside
    layer ``k†``) or ``out/model`` (a checkpoint, weights mode), and ``out/semalign.json``. With ``probe``
    examples, also the before / after CKA view of the trained layer (:func:`pktjax.analysis.alignment_cka`;
    ``probe_kw``: its batch_size, cutoff_len, max_tokens) as ``out/alignment_cka.png/.pdf``, its numbers in
    ``semalign.json``. ``data_files``: the files ``examples`` came from (hashed into the metrics' provenance);
    ``tracker``: also log the training curve there (:mod:`pktjax.tracking`)."""
    from pktjax.checkpoint import read_model_config

    tc.validate()  # bad settings are refused before the lock and the models
    check_semalign_pair(read_model_config(teacher_path), read_model_config(student_path), sc)
    out = Path(out).expanduser()
    # an out folder holding a run with other settings is refused before the models load (the pairing's layer,
    # known only after the teacher's attribution, is compared when training starts)
    check_resume(out, run_record(tc, len(examples), semalign_record(sc)), partial=True)
    with lock(out, "SemAlign training"):  # held through the export too
        return _train_semalign(teacher_path, student_path, seeds, examples, out, tc, sc, teacher_dtype, progress,
                               mesh, probe, probe_kw, plan_folder, data_files, tracker)


def _train_semalign(teacher_path, student_path, seeds: Examples, examples: Examples, out: Path, tc, sc,
                    teacher_dtype: str, progress: bool, mesh, probe: Examples | None, probe_kw: dict[str, Any] | None,
                    plan_folder: str | os.PathLike | None, data_files: Sequence[str | os.PathLike], tracker):
    import gc

    import jax.numpy as jnp

    from pktjax import semalign as SA
    from pktjax import sharding as S
    from pktjax.checkpoint import Model, load_model, save_model
    from pktjax.data import Tokenized, tokenize_seeking
    from pktjax.lora import export_peft
    from pktjax.lora_train import fit
    from pktjax.tokenizer import load_tokenizer
    from pktjax.train_aligner import check_tokenizers

    tokenizer = load_tokenizer(student_path)
    check_tokenizers(load_tokenizer(teacher_path), tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    student = load_model(student_path, mesh=mesh)
    teacher = load_model(teacher_path, dtype=getattr(jnp, teacher_dtype), mesh=mesh)
    plan = semalign_plan(teacher, list(seeds)[:sc.samples], tokenizer, student.config, sc,
                         Path(plan_folder or out).expanduser(), tc.cutoff_len)
    pairing = SA.Pairing(**{**plan["pairing"], "schedule": tuple(plan["pairing"]["schedule"])})
    m = _cached_map(Path(plan_folder or out).expanduser() / f"alignment_map_{sc.frame}.npy",
                    lambda: SA.alignment_map(SA.head_of(teacher.params), SA.head_of(student.params), sc.frame))
    items = [tokenize_seeking(tokenizer, ex, tc.cutoff_len) for ex in examples]
    targets = SA.teacher_targets(teacher.params, teacher.config, items, pairing, m, sc.compare, pad_id=pad,
                                 micro_batch=tc.micro_batch, bucket=tc.bucket)
    del teacher
    gc.collect()
    items = [Tokenized(t.ids, t.labels, extra=x) for t, x in zip(items, targets)]
    k = pairing.student_index
    trainable = SA.init_trainable(student.params, student.config, k, sc, tc.rank, tc.alpha, tc.seed)
    record = {**semalign_record(sc), "student_layer": pairing.student_layer}
    trained = fit(trainable, student.params, student.config, items, out, tc, pad_id=pad,
                  objective=SA.Objective(k, sc.mode, sc.compare), record=record, progress=progress, mesh=mesh,
                  desc="semalign", data_files=data_files, tracker=tracker)
    trained = S.to_host(trained)
    params = SA.merged_params(S.to_host(student.params), trained, k, sc, tc.scale)
    model = Model(params=params, config=student.config, source=student.source)
    info = {**record, "teacher": str(teacher_path), "student": str(student_path), "pairing": plan["pairing"],
            "attribution": plan["scores"], "examples": len(items)}
    if S.is_main_process():
        if sc.mode == "lora":
            full = SA.layer_lora(trained, student.config.num_layers, k)
            info["adapter"] = str(export_peft(full, student.config, out / "adapter", alpha=tc.alpha,
                                              dropout=tc.dropout, base_model=str(student_path), overwrite=True))
        else:
            if (out / "model").exists():
                shutil.rmtree(out / "model")
            info["model"] = str(save_model(model, out / "model"))
    if probe:
        from pktjax.analysis import alignment_cka
        from pktjax.plots import plot_alignment_cka

        module = "down_proj" if sc.compare == "ffn" else "output"
        teacher = load_model(teacher_path, dtype=getattr(jnp, teacher_dtype))
        curves = alignment_cka(teacher, Model(S.to_host(student.params), student.config, student.source), model,
                               probe, k, module, tokenizer=tokenizer, **(probe_kw or {}))
        del teacher
        if S.is_main_process():
            plot_alignment_cka(curves, out / "alignment_cka", pairing.student_layer, (pairing.a, pairing.b), module)
        info["alignment_cka"] = {"module": module, **{name: np.asarray(v).round(6).tolist()
                                                      for name, v in curves.items()}}
    if S.is_main_process():
        write_json(out / "semalign.json", info, checksum=True)
    return model, info


# ------------------------------------------------------------------------------------------------------ analysis

def shared_tokenizer(teacher_path, student_path, examples: Examples):
    """The student's tokenizer, after checking that the teacher's tokenizes ``examples`` identically."""
    tok_s, tok_t = load_tokenizer(student_path), load_tokenizer(teacher_path)
    ids_s, ids_t = probe_tokens(examples, tok_s), probe_tokens(examples, tok_t)
    if any(len(a) != len(b) or (a != b).any() for a, b in zip(ids_s, ids_t)):
        raise PairError("teacher and student tokenize the probe set differently; representation similarity needs "
                        "both models to read the same tokens (one tokenizer).")
    return tok_s


def analyze_pair(teacher, student, examples: Examples, out: str | os.PathLike, *, tokenizer,
                 metric: str = "cka", rank: int = 16, modules: Sequence[str] = tuple(ANALYSIS_DEFAULTS["modules"]),
                 batch_size: int = 4, cutoff_len: int = 768, max_tokens: int | None = 4096,
                 triangle: bool = True, seeking_seeds: Examples | None = None, seeking_lora: dict | None = None,
                 meta: dict[str, Any] | None = None, data_files: Sequence[str | os.PathLike] = ()) -> dict[str, Any]:
    """The neural-incompatibility analysis of loaded ``teacher``/``student`` (SPEC §6) into folder ``out``.

    Writes ``representation_<metric>.png/.pdf`` (teacher × student layer heatmaps per module; ``metric``: cka,
    cosine or both), ``parametric_similarity.png/.pdf`` (per-layer cosine curves of the PiSSA init and, given
    ``seeking_lora`` or the ``seeking_seeds`` to extract it from, the Seeking init), ``report.md`` and last
    ``analysis.json`` (every number, and the ``provenance`` of :mod:`pktjax.provenance`: its config hash covers
    these settings, its data hashes the files in ``data_files`` the examples came from; its presence marks a
    finished analysis), and returns that JSON object.
    """
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    modules = tuple(modules)
    t0 = time.time()
    rep = {}
    for m in (("cka", "cosine") if metric == "both" else (metric,)):
        rep[m] = analysis.representation_similarity(teacher, student, examples, modules, m, tokenizer=tokenizer,
                                                    batch_size=batch_size, cutoff_len=cutoff_len,
                                                    max_tokens=max_tokens)
        plots.plot_heatmaps(rep[m], out / f"representation_{m}", m, triangle=triangle)
    param, notes = _parametric(teacher, student, modules, rank, tokenizer, cutoff_len, seeking_seeds, seeking_lora)
    if param:
        plots.plot_parametric(param, out / "parametric_similarity")
    meta = {**(meta or {}), "LoRA rank": rank, "seconds": round(time.time() - t0, 1), **notes}
    atomic_write(out / "report.md", analysis.markdown_report(param, rep, meta, triangle), checksum=True)
    settings = {"metric": metric, "rank": rank, "modules": list(modules), "batch_size": batch_size,
                "cutoff_len": cutoff_len, "max_tokens": max_tokens, "triangle": triangle, "examples": len(examples),
                "seeking": "given" if seeking_lora is not None else len(seeking_seeds or [])}
    result = {**_as_json(meta, param, rep, triangle), "provenance": provenance(settings, data_files)}
    write_json(out / "analysis.json", result, checksum=True)
    return result


def _parametric(teacher, student, modules, rank, tokenizer, cutoff_len, seeds, seeking) -> tuple[dict, dict]:
    """Parametric similarity of the PiSSA init and, when given or extractable, the Seeking init."""
    targets = tuple(m for m in modules if m in lora.LINEAR_NAMES)
    if not targets:
        return {}, {"parametric": "skipped (no projection modules given)"}
    scale = 1.0  # alpha = rank, as in the Seeking setting (SPEC §4)
    _, pissa = lora.init(student.params, student.config, rank, rank, targets, method="pissa")
    results = {"PiSSA": analysis.parametric_similarity(student.params, student.config, pissa, scale, targets)}
    if seeking is None and seeds is None:
        return results, {"Seeking": "skipped"}
    try:
        seeking = seeking or extract_for_examples(teacher, student.config, tokenizer, seeds, rank, targets=targets,
                                                  cutoff_len=cutoff_len)[0]
    except PairError as e:
        return results, {"Seeking": f"skipped ({e})"}
    results["Seeking"] = analysis.parametric_similarity(student.params, student.config, seeking, scale, targets)
    return results, {}


def _as_json(meta, param, rep, triangle) -> dict[str, Any]:
    def lst(x):
        return np.asarray(x, np.float64).round(6).tolist()

    return {
        "meta": meta,
        "parametric": {i: {m: {k: lst(v) for k, v in r.items()} for m, r in per.items()} for i, per in param.items()},
        "representation": {metric: {m: {"matrix": lst(mat), **heatmap_summary(mat, triangle)}
                                    for m, mat in mats.items()} for metric, mats in rep.items()},
        "triangle": triangle,
    }
