"""The transfer job's stages, each skipped when its result file exists (:func:`run_transfer`)."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from pktjax.checkpoint import Model, load_model, read_model_config, release_host_memory
from pktjax.config import ModelConfig
from pktjax.data import laten_split, read_jsonl
from pktjax.errors import ConfigError
from pktjax.align import align
from pktjax.attribution import locate_each
from pktjax.evaluate import evaluate
from pktjax.fuse import INJECTION, fuse_example
from pktjax.inject import delta_sizes, inject
from pktjax.lora import TARGETS
from pktjax.memory import plan, render, transfer_input
from pktjax.pair import check_tokenizers, layer_count
from pktjax.progress import progress_bar
from pktjax.provenance import provenance
from pktjax.remote import STAGING_FILE, SYNC_FILE, mark_staging, pull, push, staging_token
from pktjax.runfolder import LOCK_FILE, lock, read_json, read_result
from pktjax.seeking import task_file
from pktjax.sharding import as_mesh, is_main_process
from pktjax.tasks import get_task
from pktjax.tokenizer import load_tokenizer
from pktjax.tracking import Tracker, open_tracker
from pktjax.train_aligner import (TrainConfig, aligner_steps, load_aligner, locate_and_extract, prepare_pair,
                                  read_run, step_order, train_aligner)
from pktjax.transfer.config import POSTPKT, TransferConfig, laten_rates, lora_config, semalign_config
from pktjax.transfer.models import check_job_pair, peek_config, resolve_model
from pktjax.transfer.report import _write_json, write_report
from pktjax.settings import LoraSettings
from pktjax.workflows import (analyze_pair, check_semalign_pair, merge_adapter, probe_examples, probe_file,
                              seed_examples, seed_file, seeking_factors, shared_tokenizer, train_adapter,
                              train_semalign)


@functools.cache
def _mesh_of(spec: str | None):
    """The device mesh of a spec (``None``: one device, no sharding); one Mesh object per spec, so that the
    compiled steps of one stage serve the next."""
    return as_mesh(spec)


def _mesh(cfg: TransferConfig):
    return _mesh_of(cfg.device.mesh)


def _load(path: Path, cfg: TransferConfig) -> Model:
    """A checkpoint in the config's dtype, on its mesh (each weight laid out by the sharding rules)."""
    return load_model(path, dtype=jnp.dtype(cfg.device.dtype), mesh=_mesh(cfg))


def _device_gib(cfg: TransferConfig) -> float | None:
    """The memory of one device: the config's ``device_memory_gb``, else what the device reports; CPU devices
    report nothing and share the host's memory, so each gets its share of it."""
    if cfg.device.device_memory_gb is not None:
        return cfg.device.device_memory_gb
    devices = jax.local_devices()
    stats = devices[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return stats["bytes_limit"] / (1 << 30)
    if devices[0].platform == "cpu" and hasattr(os, "sysconf"):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 30) / len(devices)
    return None


def check_fits(cfg: TransferConfig, teacher: ModelConfig, student: ModelConfig) -> None:
    """Refuse a LaTen job that the memory model of ``pktjax plan`` (:mod:`pktjax.memory`) says does not fit its
    devices, with its table and the micro-batch, mesh or dtype that fits; a no-op without LaTen seeds or a known
    device memory."""
    gib = _device_gib(cfg)
    if not cfg.laten.seeds or gib is None:
        return
    mesh = _mesh(cfg)
    sizes = dict(mesh.shape) if mesh is not None else {"data": 1, "fsdp": 1, "tensor": 1}
    inp = transfer_input(cfg, teacher, student, sizes, gib)
    result = plan(inp)
    if not result["fits"]:
        raise ConfigError(f"this job does not fit its devices (per `pktjax plan`):\n\n"
                          f"{render(inp, result, (cfg.teacher, cfg.student))}\n\nIn the config: --micro-batch is "
                          "`laten: {micro_batch: N}`, --locate-batch is `laten: {locate_batch: N}`, --mesh is "
                          "`mesh:` (or `pktjax transfer --mesh`), --dtype is `dtype:` (or `pktjax transfer --dtype`); "
                          "`device_memory_gb:` sets the memory checked.")


def _main_first(fn: Callable, *args) -> Any:
    """``fn(*args)`` on process 0, then (after all processes meet) on the others: a folder on a disk they share is
    written once, by process 0, and a host's own disk by that host."""
    if jax.process_count() == 1:
        return fn(*args)
    out = fn(*args) if is_main_process() else None
    multihost_utils.sync_global_devices(f"pktjax {getattr(fn, '__name__', 'step')}")
    return out if is_main_process() else fn(*args)


def _claim_output(cfg: TransferConfig) -> None:
    """Refuse a folder that holds another run; record this run's config otherwise. Process 0 decides for every
    process (the others wait for its verdict: their folder may be the one it is writing into)."""
    refusal = None
    if is_main_process():
        try:
            _claim(cfg)
        except ConfigError as e:
            refusal = e
    if jax.process_count() > 1:
        refused = bool(multihost_utils.broadcast_one_to_all(jnp.int32(refusal is not None)))
        if refused and refusal is None:
            raise ConfigError(f"{cfg.out}: process 0 refused this output folder (its error says why).")
    if refusal is not None:
        raise refusal


def _claim(cfg: TransferConfig) -> None:
    marker, where = cfg.out / "transfer.json", cfg.remote or cfg.out  # a URL's run is in its staging folder
    if marker.is_file():
        if not cfg.resumes(read_json(marker, "run marker")):
            raise ConfigError(f"{where}: holds a run of another config; choose a new output folder "
                              "(or rerun the same config to resume).")
        return
    if cfg.out.exists() and any(p.name not in (LOCK_FILE, SYNC_FILE, STAGING_FILE) for p in cfg.out.iterdir()):
        raise ConfigError(f"{where}: folder exists and is not a pktjax transfer run; choose a new output folder.")
    _write_json(marker, {"fingerprint": cfg.fingerprint(), "config": cfg.raw,
                         "provenance": provenance(cfg.raw, job_data_files(cfg))})


def _evaluate(model, cfg: TransferConfig, out: Path, tokenizer=None, drafts: bool = True) -> None:
    """Evaluate a checkpoint path or a loaded :class:`Model` once; the report file is the stage's marker. A
    student made from the base student decodes with the base student's completions as drafts (``drafts``; the
    same completions, fewer decode steps where they agree: :func:`pktjax.evaluate.evaluate`)."""
    if read_result(out, "evaluation report", _check_report) is not None:
        return
    if not isinstance(model, Model):
        model = _load(model, cfg)
    e = cfg.eval
    label = "/".join(out.relative_to(cfg.out).with_suffix("").parts) if out.is_relative_to(cfg.out) else out.stem
    partial = out.with_suffix(".partial.jsonl")  # finished batches: an interrupted evaluation goes on from there
    task = get_task(cfg.eval_task)
    total = len(task.load(e.limit))
    base = cfg.out / "eval" / "student.json"
    guesses = base if drafts and task.KIND != "choice" and base.is_file() else None
    with progress_bar(total, f"eval {label}", "ex", enabled=is_main_process()) as bar:
        evaluate(model, cfg.eval_task, limit=e.limit, few_shot=e.few_shot, batch_size=e.batch_size,
                 max_new_tokens=e.max_new_tokens, out=out if is_main_process() else None, tokenizer=tokenizer,
                 progress=bar.update, prompt_format=e.prompt_format, drafts=guesses, matmul_dtype=e.matmul_dtype,
                 resume=partial if jax.process_count() == 1 else None)  # hosts must decode the same batches
    partial.unlink(missing_ok=True)


def _fuse_steps(setting: Any, saved: list[int]) -> list[int]:
    if setting == "all":
        return saved
    if setting == "last":
        return saved[-1:]
    return [s for s in saved if s in set(setting)]


def _laten_seed(cfg: TransferConfig, teacher: Path, student: Path, seed: int, lr: float,
                sub: str, tracker: Tracker) -> list[dict[str, Any]]:
    """Train the aligner for one seed (at ``lr``, in ``laten/<sub>seed<s>``), fuse and evaluate the chosen steps;
    returns one row per step, with the injected deltas' sizes (``delta``).

    Both models are loaded once for the seed; the scores come from the run's attribution cache (filled by
    :func:`_laten_locate`). The fuse example is located and the teacher's knowledge extracted once, then each
    step's fused student is evaluated from its parameters in memory (no checkpoint written); its fuse record
    (``injection.json``, as :func:`pktjax.fuse.fuse` writes one) lands beside the step's ``eval.json``."""
    lt, folder = cfg.laten, _seed_folder(cfg, sub, seed)
    tc = TrainConfig(lr=lr, rate=lt.rate, steps=lt.steps, examples_per_step=lt.examples_per_step,
                     cutoff_len=lt.cutoff_len, micro_batch=lt.micro_batch, seed=seed,
                     train_on_inputs=cfg.task == "mmlu", layers=lt.layers, dtype=cfg.device.dtype)
    done = _done_steps(folder)
    pending = _pending(cfg, done)
    trained = read_result(folder / "trained.json", "stage marker") is not None
    if trained and pending and not aligner_steps(folder / "aligner"):
        # a restored folder: the marker and some reports came back, the checkpoints of the steps still to fuse not
        print(f"laten/{sub}seed{seed}: the aligner's checkpoints are gone and steps remain to be fused; training "
              "it again", file=sys.stderr)
        trained = False
    pair = None
    t0 = time.time()
    if pending and not trained:  # a seed with every chosen step scored is not trained again, marker or not
        pair = prepare_pair(teacher, student, rate=lt.rate, layers=lt.layers, mesh=_mesh(cfg), dtype=tc.dtype)
        train_aligner(pair.teacher, pair.student, laten_split(cfg.task, "extract"), laten_split(cfg.task, "align"),
                      folder / "aligner", tc, tokenizer=pair.tokenizer, cache=cfg.out / "attribution_cache",
                      mesh=_mesh(cfg), tracker=tracker.scoped(f"laten/{sub}seed{seed}"))
        if is_main_process():
            _write_json(folder / "trained.json", {"seconds": time.time() - t0})
    steps = _fuse_steps(lt.fuse_steps, sorted(done.union(aligner_steps(folder / "aligner"))))
    todo = [s for s in steps if s not in done]
    if todo:
        read_run(folder / "aligner")  # a damaged run record is refused by name, as pktjax.fuse.fuse does
        pair = pair or prepare_pair(teacher, student, rate=lt.rate, layers=lt.layers, mesh=_mesh(cfg),
                                    dtype=tc.dtype)
        train = read_jsonl(laten_split(cfg.task, "train"))
        index = random.Random(seed).randrange(len(train))  # the example pktjax.fuse.fuse_example picks
        knowledge, _, sel_s = locate_and_extract(pair, train[index], tc.mode, tc.attention, lt.layers,
                                                 cfg.out / "attribution_cache")
        student_model, tokenizer, modules = pair.student, pair.tokenizer, pair.modules
        pair = None  # the teacher is not needed any more
        for step in todo:
            deltas = align(load_aligner(folder / "aligner", step), knowledge)
            record = {"aligner": str(folder / "aligner"), "step": step, "rate": lt.rate, "seed": seed,
                      "example": index, "modules": list(modules),
                      "delta": delta_sizes(student_model.params, student_model.config, sel_s, deltas)}
            _write_json(folder / f"step{step}" / INJECTION, record)
            fused = student_model.replace(params=inject(student_model.params, student_model.config, sel_s, deltas),
                                          source=f"{folder / 'aligner'} step {step}")
            _evaluate(fused, cfg, folder / f"step{step}" / "eval.json", tokenizer=tokenizer)
    rows = []
    for step in steps:
        report_path = folder / f"step{step}" / "eval.json"
        injection = report_path.with_name(INJECTION)
        delta = read_json(injection, "injection record")["delta"] if injection.is_file() else None
        method = "LaTen" if not sub else f"LaTen lr {lr:g}"
        rows.append({"method": method, "seed": seed, "step": step, "lr": lr, **_score(report_path),
                     "delta": delta})
    return rows


def _seed_folder(cfg: TransferConfig, sub: str, seed: int) -> Path:
    return cfg.out / "laten" / f"{sub}seed{seed}"


def _done_steps(folder: Path) -> set[int]:
    """The fused steps of a seed folder whose report and fuse record both verify (a damaged one is removed and
    redone); a done step counts even when its aligner checkpoint is gone (a run folder restored from its small
    files)."""
    return {int(p.name[4:]) for p in folder.glob("step*") if p.name[4:].isdigit() and
            read_result(p / "eval.json", "evaluation report", _check_report) is not None and
            read_result(p / INJECTION, "injection record") is not None}


def _pending(cfg: TransferConfig, done: set[int]) -> bool:
    """Whether a seed with fused steps ``done`` has steps of ``laten.fuse_steps`` still to fuse and score."""
    return not set(_fuse_steps(cfg.laten.fuse_steps, list(range(_seed_steps(cfg))))) <= done


def _seed_steps(cfg: TransferConfig) -> int:
    """The aligner steps a seed runs: ``laten.steps``, else the whole extract split."""
    return cfg.laten.steps or len(read_jsonl(laten_split(cfg.task, "extract")))


def _laten_examples(cfg: TransferConfig) -> list[dict[str, Any]]:
    """Every example the LaTen seeds locate on: each seed's extract examples (its steps) and its fuse example."""
    extract, train = read_jsonl(laten_split(cfg.task, "extract")), read_jsonl(laten_split(cfg.task, "train"))
    steps = _seed_steps(cfg)
    seen, out = set(), []
    for seed in cfg.laten.seeds:
        for ex in [extract[int(i)] for i in step_order(len(extract), int(seed))[:steps]] + \
                [fuse_example(train, int(seed))]:
            key = json.dumps(ex, sort_keys=True)
            if key not in seen:
                seen.add(key)
                out.append(ex)
    return out


def _laten_locate(cfg: TransferConfig, teacher: Path, student: Path) -> None:
    """Locate every example of every LaTen seed up front, one batched pass per model (each loaded once, alone),
    into ``attribution_cache/{teacher,student}``; ``laten/located.json`` marks the stage finished."""
    marker = cfg.out / "laten" / "located.json"
    if read_result(marker, "stage marker") is not None:
        return
    examples = _laten_examples(cfg)
    k = layer_count(read_model_config(teacher), read_model_config(student), cfg.laten.layers)
    tokenizer = load_tokenizer(student)
    for role, path in (("teacher", teacher), ("student", student)):
        model = _load(path, cfg)
        print(f"laten locate ({role}): {len(examples)} examples, K = {k} layers, passes of up to "
              f"{cfg.laten.locate_batch} examples", file=sys.stderr, flush=True)
        locate_each(model.params, model.config, tokenizer, examples, layers=k, batch=cfg.laten.locate_batch,
                    cache=cfg.out / "attribution_cache" / role, progress=f"locate {role}")
        del model
    _write_json(marker, {"examples": len(examples), "layers": k})


def _train_data(cfg: TransferConfig, sec: LoraSettings) -> Path:
    """A LoRA section's fine-tuning examples: ``data`` (a JSONL file or a Seeking task) or the LaTen train split."""
    return task_file(str(sec.data), "train") if sec.data else laten_split(cfg.task, "train")


def _section_files(cfg: TransferConfig, name: str) -> list[Path]:
    """The data files a training section reads: its fine-tuning examples and (Seeking, SemAlign) its seeds."""
    sec = getattr(cfg, name)
    seeds = [seed_file(str(sec.seed_data or cfg.task))] if name in ("seeking", "semalign") else []
    return [_train_data(cfg, sec), *seeds]


def job_data_files(cfg: TransferConfig) -> list[Path]:
    """Every data file the job reads: the LaTen splits, each section's training and seed files and the
    evaluation's test files (hashed into ``transfer.json``'s and ``scores.json``'s provenance)."""
    files = [laten_split(cfg.task, s) for s in ("extract", "align", "train")]
    for name in (*POSTPKT, "semalign"):
        if getattr(cfg, name) is not None:
            files += _section_files(cfg, name)
    if cfg.analysis is not None:
        files += [probe_file(cfg.task), *([seed_file(cfg.task)] if cfg.analysis.seeking else [])]
    task = get_task(cfg.eval_task)
    files += task.data_files(task.load(cfg.eval.limit), cfg.eval.few_shot)
    return list(dict.fromkeys(Path(f) for f in files))


def _seeking_seeds(cfg: TransferConfig) -> list[dict[str, Any]]:
    return seed_examples(str(cfg.seeking.seed_data or cfg.task), cfg.seeking.samples)


def _seeking_factors(cfg: TransferConfig, teacher: Path, student: Path, student_cfg: ModelConfig) -> dict:
    """Seeking's extracted LoRA, computed once for every seed (and the analysis) in ``seeking/extracted``."""
    s = cfg.seeking
    return seeking_factors(teacher, student, student_cfg, _seeking_seeds(cfg), cfg.out / "seeking" / "extracted",
                           rank=s.rank, targets=s.targets, samples=s.samples, cutoff_len=s.cutoff_len,
                           dtype=s.teacher_dtype, mesh=_mesh(cfg))


def _postpkt_seed(cfg: TransferConfig, name: str, teacher: Path, student: Path, seed: int,
                  tracker: Tracker) -> dict[str, Any]:
    """One LoRA-trained student of section ``name`` (seeking, lora or pissa): train from its init, merge the
    adapter, evaluate. ``<name>/seed<s>/`` holds the adapter, checkpoints, metrics and ``eval.json`` (the marker)."""
    sec, folder = getattr(cfg, name), cfg.out / name / f"seed{seed}"
    report = folder / "eval.json"
    if read_result(report, "evaluation report", _check_report) is None:
        # the extraction holds the teacher and its gradients: it runs before the student is loaded
        teacher_lora = _seeking_factors(cfg, teacher, student, read_model_config(student)) \
            if name == "seeking" else None
        tc = lora_config(sec, seed)
        model, tokenizer = load_model(student, dtype=jnp.dtype(tc.dtype), mesh=_mesh(cfg)), load_tokenizer(student)
        examples = read_jsonl(_train_data(cfg, sec), limit=sec.limit)
        adapter = train_adapter(model, tokenizer, examples, folder, tc, method=POSTPKT[name][1],
                                targets=sec.targets, teacher_lora=teacher_lora, mesh=_mesh(cfg),
                                data_files=_section_files(cfg, name), tracker=tracker.scoped(f"{name}/seed{seed}"))
        # the eval report names the adapter
        merged = merge_adapter(model, adapter, cfg.device.dtype).replace(source=str(adapter))
        _evaluate(merged, cfg, report, tokenizer=tokenizer)
    return {"method": POSTPKT[name][0], "seed": seed, "step": None, **_score(report)}


def _semalign_seeds(cfg: TransferConfig) -> list[dict[str, Any]]:
    return seed_examples(str(cfg.semalign.seed_data or cfg.task), cfg.semalign.samples)


def _semalign_seed(cfg: TransferConfig, teacher: Path, student: Path, seed: int,
                   tracker: Tracker) -> dict[str, Any]:
    """One SemAlign student: attribution and pairing (once, ``semalign/plan.json``), the paired layer trained,
    evaluated. ``semalign/seed<s>/`` holds the adapter (or model), checkpoints, metrics, ``semalign.json``, the
    before / after CKA view (on the first ``cka`` training examples, else on the ``analysis`` section's probe
    examples when there is one), and ``eval.json`` (the marker)."""
    sec, folder = cfg.semalign, cfg.out / "semalign" / f"seed{seed}"
    report = folder / "eval.json"
    if read_result(report, "evaluation report", _check_report) is None:
        a = cfg.analysis
        examples = read_jsonl(_train_data(cfg, sec), limit=sec.limit)
        probe = examples[:sec.cka] if sec.cka else probe_examples(cfg.task, a.n_examples) if a else None
        probe_kw = {"batch_size": a.batch_size, "cutoff_len": a.cutoff_len, "max_tokens": a.max_tokens} if a else None
        model, info = train_semalign(teacher, student, _semalign_seeds(cfg), examples, folder,
                                     sec.trainer(seed, cfg.task), semalign_config(sec),
                                     teacher_dtype=sec.teacher_dtype, probe=probe, probe_kw=probe_kw,
                                     plan_folder=cfg.out / "semalign", mesh=_mesh(cfg),
                                     data_files=_section_files(cfg, "semalign"),
                                     tracker=tracker.scoped(f"semalign/seed{seed}"))
        _evaluate(model.replace(source=info.get("adapter") or info.get("model")), cfg, report,
                  tokenizer=load_tokenizer(student))
    return {"method": "SemAlign", "seed": seed, "step": None, **_score(report)}


def _analysis(cfg: TransferConfig, teacher: Path, student: Path) -> Path:
    """The neural-incompatibility analysis into ``analysis/`` (``analysis.json`` marks it finished)."""
    a, folder = cfg.analysis, cfg.out / "analysis"
    if read_result(folder / "analysis.json", "analysis") is not None:
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # an analysis cut short leaves nothing reusable
    examples = probe_examples(cfg.task, int(a.n_examples))
    tokenizer = shared_tokenizer(teacher, student, examples)
    t_model, s_model = _load(teacher, cfg), _load(student, cfg)
    reuse = a.seeking and _reuses_seeking(cfg)
    meta = {"teacher": cfg.teacher, "student": cfg.student,
            "probe": f"{cfg.task} train split ({len(examples)} examples)"}
    if reuse:
        meta["Seeking init"] = "the seeking stage's extraction (seeking/extracted)"
    analyze_pair(t_model, s_model, examples, folder, tokenizer=tokenizer, metric=a.metric, rank=int(a.rank),
                 modules=a.modules, batch_size=int(a.batch_size), cutoff_len=int(a.cutoff_len),
                 max_tokens=a.max_tokens, triangle=not a.full_heatmap, meta=meta,
                 seeking_lora=_seeking_factors(cfg, teacher, student, s_model.config) if reuse else None,
                 seeking_seeds=seed_examples(cfg.task, probe=len(examples)) if a.seeking and not reuse else None,
                 data_files=[probe_file(cfg.task), *([seed_file(cfg.task)] if a.seeking and not reuse else [])])
    return folder


def _reuses_seeking(cfg: TransferConfig) -> bool:
    """Whether the ``seeking`` stage's extraction serves the analysis (same rank, covers its modules)."""
    s = cfg.seeking
    return s is not None and s.rank == cfg.analysis.rank and \
        set(cfg.analysis.modules) & set(TARGETS) <= set(s.targets or TARGETS)


def _check_report(rep: dict[str, Any]) -> None:
    """An evaluation report has a score and one record per example (``KeyError``/``TypeError`` otherwise)."""
    if not isinstance(rep["score"], (int, float)) or not isinstance(rep["records"], list):
        raise TypeError("no score or records")


def _score(report_path: Path) -> dict[str, Any]:
    if not is_main_process():  # process 0 writes the report and the scores; the others may not see its file yet
        return {"report": str(report_path)}
    rep = read_json(report_path, "evaluation report")
    return {"score": rep["score"], "ci": rep.get("ci95"), "n": rep.get("n"), "report": str(report_path)}


def _check_data(cfg: TransferConfig) -> None:
    """Read every example of every data file the config needs: a missing, empty or malformed one (any line) fails
    before the models."""
    for split in ("extract", "align", "train"):
        read_jsonl(laten_split(cfg.task, split))
    for name in POSTPKT:
        if getattr(cfg, name) is not None:
            read_jsonl(_train_data(cfg, getattr(cfg, name)), limit=getattr(cfg, name).limit)
    if cfg.seeking is not None:
        _seeking_seeds(cfg)
    if cfg.semalign is not None:
        read_jsonl(_train_data(cfg, cfg.semalign), limit=cfg.semalign.limit)
        _semalign_seeds(cfg)


def _check_models(cfg: TransferConfig) -> bool:
    """The pair check and the settings that depend on the models or the data (LaTen's ``layers``, ``steps`` and
    ``fuse_steps``), from configs only, before the output folder is touched. False when a model's config is not
    readable yet (a hub id not downloaded): the pair is checked after the download then."""
    lt = cfg.laten
    if lt.seeds:
        n_extract = len(read_jsonl(laten_split(cfg.task, "extract")))
        n_align = len(read_jsonl(laten_split(cfg.task, "align")))
        steps = lt.steps or n_extract
        if steps > n_extract:
            raise ConfigError(f"laten.steps = {lt.steps}: must be <= {n_extract}, the size of the {cfg.task} extract "
                              "split (one extract example per step).")
        if isinstance(lt.fuse_steps, tuple) and max(lt.fuse_steps) >= steps:
            raise ConfigError(f"laten.fuse_steps = {list(lt.fuse_steps)} names a step the run stops before: it "
                              f"saves steps 0 to {steps - 1}.")
        if lt.examples_per_step - 1 > n_align:
            raise ConfigError(f"laten.examples_per_step = {lt.examples_per_step}: each step draws "
                              f"{lt.examples_per_step - 1} of the {n_align} examples of the align split; "
                              f"choose at most {n_align + 1}.")
    teacher, student = peek_config(cfg.teacher), peek_config(cfg.student)
    if teacher is None or student is None:
        return False
    _check_pair(cfg, teacher, student)
    check_fits(cfg, teacher, student)
    return True


def _check_pair(cfg: TransferConfig, teacher: ModelConfig, student: ModelConfig) -> None:
    """The pair rules of every method the job runs (SemAlign's beside :func:`check_job_pair`'s)."""
    check_job_pair(teacher, student, cfg.laten, cfg.seeking)
    if cfg.semalign is not None and cfg.semalign.seeds:
        check_semalign_pair(teacher, student, semalign_config(cfg.semalign))


def _timed(cfg: TransferConfig, timings: dict[str, float], key: str, fn: Callable, *args) -> Any:
    """Run one stage; its seconds add to those that earlier, interrupted runs spent on it (``timings.json``)."""
    path = cfg.out / "timings.json"
    t, done = time.time(), False
    try:
        out = fn(*args)
        done = True
        return out
    finally:
        release_host_memory()  # what the stage's models and activations left in malloc's arenas
        spent = read_result(path, "timings") or {}
        spent[key] = spent.get(key, 0.0) + time.time() - t
        timings[key] = spent[key]
        if is_main_process():
            _write_json(path, spent)
        _push(cfg, failing=not done)


def _push(cfg: TransferConfig, failing: bool = False) -> None:
    """Upload what changed in the staging folder to the output URL (process 0, the writer of the shared files).
    ``failing``: a stage is ending in an error; what it saved (checkpoints) is still uploaded, but a failed upload
    is only said on stderr, so that the stage's error is the one raised."""
    if cfg.remote is None or not is_main_process():
        return
    try:
        push(cfg.out, cfg.remote)
    except Exception as e:
        if not failing:
            raise
        print(f"pktjax: warning: uploading {cfg.out} to {cfg.remote} failed too ({type(e).__name__}: {e})",
              file=sys.stderr)


def _base_row(cfg: TransferConfig, name: str, path: Path) -> dict[str, Any]:
    _evaluate(path, cfg, cfg.out / "eval" / f"{name}.json", drafts=False)
    return {"method": f"base {name}", "seed": None, "step": None, **_score(cfg.out / "eval" / f"{name}.json")}


def run_transfer(cfg: TransferConfig) -> Path:
    """Run every stage of ``cfg`` (resuming finished ones) and return the report path. The mesh, the data, the
    pair and whether the job fits its devices are checked before anything is written or loaded. With an output
    URL (``cfg.remote``) the job runs in the staging folder ``cfg.out``: every process first pulls the URL's run
    folder into its own (process 0 first: a staging folder the processes share is filled once), and process 0
    pushes it after every stage and at the end."""
    _mesh(cfg)
    _check_data(cfg)
    known = _check_models(cfg)
    with lock(cfg.out, "transfer run"):
        if cfg.remote is not None:
            _main_first(pull, cfg.remote, cfg.out)
            _check_shared_staging(cfg)
        _claim_output(cfg)
        with open_tracker(cfg.tracking.tracker, cfg.out, config=cfg.raw) as tracker:
            report = _run_stages(cfg, known, tracker)
        _push(cfg)  # the report, and what the tracker wrote on closing
        return report


def _check_shared_staging(cfg: TransferConfig) -> None:
    """With an output URL and several processes, refuse staging folders the processes do not share: process 0
    uploads its own, while every process writes its checkpoint shards into its own (orbax's multi-host saves need
    one folder all hosts see, as a local run folder does)."""
    if cfg.remote is None or jax.process_count() == 1:
        return
    token = int(multihost_utils.broadcast_one_to_all(jnp.int32(mark_staging(cfg.out) if is_main_process() else 0)))
    seen = multihost_utils.process_allgather(jnp.int32(staging_token(cfg.out) == token))
    if not bool(np.all(np.asarray(seen))):
        raise ConfigError(f"the staging folder {cfg.out} of the output {cfg.remote} is not one folder that all "
                          f"{jax.process_count()} processes see (process 0 uploads it, and every process writes its "
                          "checkpoint shards into it). Pass --staging a folder on a disk every host mounts (NFS, "
                          "Filestore), the same path on every host.")


def score_tags(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The scores of a report's rows by tracker tag: ``score/<method>[/seed<s>][/step<t>]`` (spaces as ``_``)."""
    out = {}
    for r in rows:
        tag = "score/" + r["method"].replace(" ", "_")
        tag += "".join(f"/{key}{r[key]}" for key in ("seed", "step") if r.get(key) is not None)
        out[tag] = r["score"]
    return out


def _run_stages(cfg: TransferConfig, known: bool, tracker: Tracker) -> Path:
    """The stages of :func:`run_transfer`, under the output folder's lock; ``known``: whether the pair was checked
    already (a hub model's config is known only once it is downloaded). The trainers' curves and the scores go to
    ``tracker`` too."""
    timings: dict[str, float] = {}
    teacher = _main_first(resolve_model, cfg.teacher, cfg.out / "models" / "teacher")
    student = _main_first(resolve_model, cfg.student, cfg.out / "models" / "student")
    if not known:  # a hub model's config is known only now that it is downloaded
        configs = read_model_config(teacher), read_model_config(student)
        _check_pair(cfg, *configs)
        check_fits(cfg, *configs)
    if cfg.laten.seeds or cfg.seeking is not None or cfg.semalign is not None:
        check_tokenizers(load_tokenizer(teacher), load_tokenizer(student))
    rows = [_timed(cfg, timings, f"eval {name}", _base_row, cfg, name, path)
            for name, path in (("student", student), ("teacher", teacher))]
    if any(_pending(cfg, _done_steps(_seed_folder(cfg, sub, int(seed))))
           for _, sub in laten_rates(cfg) for seed in cfg.laten.seeds):  # a finished LaTen needs no locating
        _timed(cfg, timings, "laten locate", _laten_locate, cfg, teacher, student)
    stages = [(f"laten {'lr ' + format(lr, 'g') + ' ' if sub else ''}seed {seed}", _laten_seed,
               (cfg, teacher, student, int(seed), lr, sub, tracker))
              for lr, sub in laten_rates(cfg) for seed in cfg.laten.seeds]
    stages += [(f"{name} seed {seed}", _postpkt_seed, (cfg, name, teacher, student, int(seed), tracker))
               for name in POSTPKT for seed in getattr(getattr(cfg, name), "seeds", ())]
    stages += [(f"semalign seed {seed}", _semalign_seed, (cfg, teacher, student, int(seed), tracker))
               for seed in getattr(cfg.semalign, "seeds", ())]
    for i, (key, fn, args) in enumerate(stages):
        out = _timed(cfg, timings, key, fn, *args)
        rows += out if isinstance(out, list) else [out]
        left = [k for k, _, _ in stages[i + 1:]] + (["analysis"] if cfg.analysis is not None else [])
        if left and is_main_process():  # a run stopped between stages still has a report of what it finished
            write_report(cfg, rows, timings, data_files=job_data_files(cfg), left=left)
    analysis = None if cfg.analysis is None else _timed(cfg, timings, "analysis", _analysis, cfg, teacher, student)
    timings["total"] = sum(timings.values())
    if not is_main_process():  # process 0 writes the report
        return cfg.out / "report.md"
    tracker.summary(score_tags(rows))
    return write_report(cfg, rows, timings, analysis, data_files=job_data_files(cfg))
