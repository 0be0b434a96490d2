"""The transfer job's stages, each skipped when its result file exists (:func:`run_transfer`)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax

from pktjax.checkpoint import load_model, read_model_config
from pktjax.config import ModelConfig
from pktjax.data import laten_split, read_jsonl
from pktjax.errors import ConfigError
from pktjax.evaluate import evaluate
from pktjax.fuse import INJECTION, fuse
from pktjax.lora import TARGETS
from pktjax.pair import check_tokenizers
from pktjax.progress import progress_bar
from pktjax.provenance import provenance
from pktjax.seeking import task_file
from pktjax.sharding import is_main_process
from pktjax.tasks import get_task
from pktjax.tokenizer import load_tokenizer
from pktjax.train_aligner import TrainConfig, aligner_steps, train_aligner
from pktjax.transfer.config import POSTPKT, TransferConfig, laten_rates, lora_config
from pktjax.transfer.models import check_job_pair, peek_config, resolve_model
from pktjax.transfer.report import _write_json, write_report
from pktjax.workflows import (analyze_pair, merge_adapter, probe_examples, seed_examples, seeking_factors,
                              shared_tokenizer, train_adapter)


def _claim_output(cfg: TransferConfig) -> None:
    """Refuse a folder that holds another run; record this run's config otherwise."""
    marker = cfg.out / "transfer.json"
    if marker.is_file():
        if json.loads(marker.read_text()).get("fingerprint") not in (cfg.fingerprint(), cfg.legacy_fingerprint()):
            raise ConfigError(f"{cfg.out}: holds a run of another config; choose a new output folder "
                              "(or rerun the same config to resume).")
        return
    if cfg.out.exists() and any(cfg.out.iterdir()):
        raise ConfigError(f"{cfg.out}: folder exists and is not a pktjax transfer run; choose a new output folder.")
    splits = [laten_split(cfg.task, s) for s in ("extract", "align", "train")]
    _write_json(marker, {"fingerprint": cfg.fingerprint(), "config": cfg.raw,
                         "provenance": provenance(cfg.raw, splits)})


def _evaluate(model, cfg: TransferConfig, out: Path, tokenizer=None) -> None:
    """Evaluate a checkpoint path or a loaded :class:`Model` once; the report file is the stage's marker."""
    if out.is_file():
        return
    e = cfg.eval
    label = "/".join(out.relative_to(cfg.out).with_suffix("").parts) if out.is_relative_to(cfg.out) else out.stem
    partial = out.with_suffix(".partial.jsonl")  # finished batches: an interrupted evaluation goes on from there
    total = len(get_task(cfg.eval_task).load(e.limit))
    with progress_bar(total, f"eval {label}", "ex", enabled=is_main_process()) as bar:
        evaluate(model, cfg.eval_task, limit=e.limit, few_shot=e.few_shot, batch_size=e.batch_size,
                 max_new_tokens=e.max_new_tokens, out=out, tokenizer=tokenizer, progress=bar.update,
                 prompt_format=e.prompt_format,
                 resume=partial if jax.process_count() == 1 else None)  # hosts must decode the same batches
    partial.unlink(missing_ok=True)


def _fuse_steps(setting: Any, saved: list[int]) -> list[int]:
    if setting == "all":
        return saved
    if setting == "last":
        return saved[-1:]
    return [s for s in saved if s in set(setting)]


def _laten_seed(cfg: TransferConfig, teacher: Path, student: Path, seed: int, lr: float,
                sub: str) -> list[dict[str, Any]]:
    """Train the aligner for one seed (at ``lr``, in ``laten/<sub>seed<s>``), fuse and evaluate the chosen steps;
    returns one row per step, with the injected deltas' sizes (``delta``) when the fuse recorded them."""
    lt, folder = cfg.laten, cfg.out / "laten" / f"{sub}seed{seed}"
    tc = TrainConfig(lr=lr, rate=lt.rate, steps=lt.steps, examples_per_step=lt.examples_per_step,
                     cutoff_len=lt.cutoff_len, micro_batch=lt.micro_batch, seed=seed,
                     train_on_inputs=cfg.task == "mmlu", layers=lt.layers)
    t0 = time.time()
    if not (folder / "trained.json").is_file():
        train_aligner(teacher, student, laten_split(cfg.task, "extract"), laten_split(cfg.task, "align"),
                      folder / "aligner", tc)
        _write_json(folder / "trained.json", {"seconds": time.time() - t0})
    rows = []
    for step in _fuse_steps(lt.fuse_steps, aligner_steps(folder / "aligner")):
        report_path = folder / f"step{step}" / "eval.json"
        if not report_path.is_file():
            fused = folder / f"step{step}" / "model"
            shutil.rmtree(fused, ignore_errors=True)  # a fuse cut short leaves nothing reusable
            fuse(teacher, student, folder / "aligner", step, laten_split(cfg.task, "train"), fused,
                 rate=lt.rate, seed=seed)
            shutil.copyfile(fused / INJECTION, report_path.with_name(INJECTION))
            _evaluate(fused, cfg, report_path)
            shutil.rmtree(fused, ignore_errors=True)  # keep the report, not a copy of the student per step
        injection = report_path.with_name(INJECTION)
        delta = json.loads(injection.read_text())["delta"] if injection.is_file() else None
        method = "LaTen" if not sub else f"LaTen lr {lr:g}"
        rows.append({"method": method, "seed": seed, "step": step, "lr": lr, **_score(report_path),
                     "delta": delta})
    return rows


def _train_data(cfg: TransferConfig, sec: dict[str, Any]) -> Path:
    """A LoRA section's fine-tuning examples: ``data`` (a JSONL file or a Seeking task) or the LaTen train split."""
    return task_file(str(sec.data), "train") if sec.data else laten_split(cfg.task, "train")


def _seeking_seeds(cfg: TransferConfig) -> list[dict[str, Any]]:
    return seed_examples(str(cfg.seeking.seed_data or cfg.task), cfg.seeking.samples)


def _seeking_factors(cfg: TransferConfig, teacher: Path, student: Path, student_cfg: ModelConfig) -> dict:
    """Seeking's extracted LoRA, computed once for every seed (and the analysis) in ``seeking/extracted``."""
    s = cfg.seeking
    return seeking_factors(teacher, student, student_cfg, _seeking_seeds(cfg), cfg.out / "seeking" / "extracted",
                           rank=s.rank, targets=s.targets, samples=s.samples, cutoff_len=s.cutoff_len,
                           dtype=s.teacher_dtype)


def _postpkt_seed(cfg: TransferConfig, name: str, teacher: Path, student: Path, seed: int) -> dict[str, Any]:
    """One LoRA-trained student of section ``name`` (seeking, lora or pissa): train from its init, merge the
    adapter, evaluate. ``<name>/seed<s>/`` holds the adapter, checkpoints, metrics and ``eval.json`` (the marker)."""
    sec, folder = getattr(cfg, name), cfg.out / name / f"seed{seed}"
    report = folder / "eval.json"
    if not report.is_file():
        # the extraction holds the teacher and its gradients: it runs before the student is loaded
        teacher_lora = _seeking_factors(cfg, teacher, student, read_model_config(student)) \
            if name == "seeking" else None
        model, tokenizer = load_model(student), load_tokenizer(student)
        examples = read_jsonl(_train_data(cfg, sec), limit=sec.limit)
        adapter = train_adapter(model, tokenizer, examples, folder, lora_config(sec, seed), method=POSTPKT[name][1],
                                targets=sec.targets, teacher_lora=teacher_lora)
        merged = merge_adapter(model, adapter).replace(source=str(adapter))  # the eval report names the adapter
        _evaluate(merged, cfg, report, tokenizer=tokenizer)
    return {"method": POSTPKT[name][0], "seed": seed, "step": None, **_score(report)}


def _analysis(cfg: TransferConfig, teacher: Path, student: Path) -> Path:
    """The neural-incompatibility analysis into ``analysis/`` (``analysis.json`` marks it finished)."""
    a, folder = cfg.analysis, cfg.out / "analysis"
    if (folder / "analysis.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # an analysis cut short leaves nothing reusable
    examples = probe_examples(cfg.task, int(a.n_examples))
    tokenizer = shared_tokenizer(teacher, student, examples)
    t_model, s_model = load_model(teacher), load_model(student)
    reuse = a.seeking and _reuses_seeking(cfg)
    meta = {"teacher": cfg.teacher, "student": cfg.student,
            "probe": f"{cfg.task} train split ({len(examples)} examples)"}
    if reuse:
        meta["Seeking init"] = "the seeking stage's extraction (seeking/extracted)"
    analyze_pair(t_model, s_model, examples, folder, tokenizer=tokenizer, metric=a.metric, rank=int(a.rank),
                 modules=a.modules, batch_size=int(a.batch_size), cutoff_len=int(a.cutoff_len),
                 max_tokens=a.max_tokens, triangle=not a.full_heatmap, meta=meta,
                 seeking_lora=_seeking_factors(cfg, teacher, student, s_model.config) if reuse else None,
                 seeking_seeds=seed_examples(cfg.task, probe=len(examples)) if a.seeking and not reuse else None)
    return folder


def _reuses_seeking(cfg: TransferConfig) -> bool:
    """Whether the ``seeking`` stage's extraction serves the analysis (same rank, covers its modules)."""
    s = cfg.seeking
    return s is not None and s.rank == cfg.analysis.rank and \
        set(cfg.analysis.modules) & set(TARGETS) <= set(s.targets or TARGETS)


def _score(report_path: Path) -> dict[str, Any]:
    rep = json.loads(report_path.read_text())
    return {"score": rep["score"], "ci": rep.get("ci95"), "n": rep.get("n"), "report": str(report_path)}


def _check_data(cfg: TransferConfig) -> None:
    """Read one example of every data file the config needs: a missing or empty one fails before the models."""
    for split in ("extract", "align", "train"):
        read_jsonl(laten_split(cfg.task, split), limit=1)
    for name in POSTPKT:
        if getattr(cfg, name) is not None:
            read_jsonl(_train_data(cfg, getattr(cfg, name)), limit=1)
    if cfg.seeking is not None:
        _seeking_seeds(cfg)


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
    check_job_pair(teacher, student, cfg.laten, cfg.seeking)
    return True


def _timed(cfg: TransferConfig, timings: dict[str, float], key: str, fn: Callable, *args) -> Any:
    """Run one stage; its seconds add to those that earlier, interrupted runs spent on it (``timings.json``)."""
    path = cfg.out / "timings.json"
    t = time.time()
    try:
        return fn(*args)
    finally:
        spent = json.loads(path.read_text()) if path.is_file() else {}
        spent[key] = spent.get(key, 0.0) + time.time() - t
        timings[key] = spent[key]
        if is_main_process():
            _write_json(path, spent)


def _base_row(cfg: TransferConfig, name: str, path: Path) -> dict[str, Any]:
    _evaluate(path, cfg, cfg.out / "eval" / f"{name}.json")
    return {"method": f"base {name}", "seed": None, "step": None, **_score(cfg.out / "eval" / f"{name}.json")}


def run_transfer(cfg: TransferConfig) -> Path:
    """Run every stage of ``cfg`` (resuming finished ones) and return the report path."""
    _check_data(cfg)
    known = _check_models(cfg)
    _claim_output(cfg)
    timings: dict[str, float] = {}
    teacher = resolve_model(cfg.teacher, cfg.out / "models" / "teacher")
    student = resolve_model(cfg.student, cfg.out / "models" / "student")
    if not known:  # a hub model's config is known only now that it is downloaded
        check_job_pair(read_model_config(teacher), read_model_config(student), cfg.laten, cfg.seeking)
    if cfg.laten.seeds or cfg.seeking is not None:
        check_tokenizers(load_tokenizer(teacher), load_tokenizer(student))
    rows = [_timed(cfg, timings, f"eval {name}", _base_row, cfg, name, path)
            for name, path in (("student", student), ("teacher", teacher))]
    for lr, sub in laten_rates(cfg):
        for seed in cfg.laten.seeds:
            key = f"laten {'lr ' + format(lr, 'g') + ' ' if sub else ''}seed {seed}"
            rows += _timed(cfg, timings, key, _laten_seed, cfg, teacher, student, int(seed), lr, sub)
    for name in POSTPKT:
        for seed in getattr(getattr(cfg, name), "seeds", ()):
            rows.append(_timed(cfg, timings, f"{name} seed {seed}", _postpkt_seed, cfg, name, teacher, student,
                               int(seed)))
    analysis = None if cfg.analysis is None else _timed(cfg, timings, "analysis", _analysis, cfg, teacher, student)
    timings["total"] = sum(timings.values())
    return write_report(cfg, rows, timings, analysis)
