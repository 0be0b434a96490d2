"""The main job: one config in, a report folder out (``pktjax transfer CONFIG``).

Stages, each skipped when its result file already exists (so an interrupted run resumes where it stopped):

1. ``models``: resolve the teacher and student (a checkpoint folder, a ``.gguf`` file, ``registry:PAIR/ROLE``
   for a model installed by ``pktjax models install``, ``tiny:k=v,...`` for a random model built on the spot,
   or a Hugging Face repo id ``org/name``, downloaded when online), check the pair before any heavy work;
2. ``eval/student.json``, ``eval/teacher.json``: the base models on the evaluation task;
3. ``laten/seed<s>/step<k>/eval.json``: the aligner run of each seed, then every chosen aligner step fused and
   evaluated (LaTen, Pre-Align PKT);
4. optional, when the config has the section: ``seeking/seed<s>/eval.json`` (Seeking, Post-Align PKT: teacher
   sensitivity, layer and sub-matrix selection, SVD into a LoRA of the student's shape, extracted once into
   ``seeking/extracted/``, then LoRA training from that init, merge, evaluate), ``lora/seed<s>/eval.json``
   (standard LoRA init) and ``pissa/seed<s>/eval.json`` (PiSSA init), each with its PEFT adapter beside it;
5. optional: ``analysis/analysis.json``: the neural-incompatibility analysis of the pair (figures + numbers);
6. ``report.md`` + ``scores.json`` + ``aligner_curves.png``: the table of scores with confidence intervals,
   the spread over seeds, each trained model against the base student (:func:`vs_student`), the analysis
   figures, the timings.

Config (YAML or JSON; an unknown key anywhere is an error naming the allowed ones)::

    teacher: PATH | registry:qwen2.5-coder/teacher | tiny:hidden=64,layers=4,inter=96,heads=4,seed=1 | org/name
    student: PATH | registry:qwen2.5-coder/student | tiny:... | org/name
    task: gsm | mmlu | humaneval | mbpp        # LaTen splits (../shared/data/laten/<task>/)
    eval: {task: null, limit: null, max_new_tokens: null, batch_size: 8, few_shot: 0}   # task: from the top
                                       # `task`; limit: the whole test set; max_new_tokens: the task's (512)
    laten: {seeds: [42], steps: null, rate: 0.1, lr: 3e-5, cutoff_len: 768, examples_per_step: 16,
            micro_batch: 4, fuse_steps: all | last | [1, 2], layers: null}   # seeds: [] skips LaTen;
                                                            # layers: K (default every student layer)
    seeking: {seeds: [1], rank: 16, alpha: 16, dropout: 0.05, lr: 3e-4, epochs: 3, batch_size: 64,
              micro_batch: 8, cutoff_len: 2048, dtype: float32, targets: null, data: null, limit: null,
              samples: 32, seed_data: null, teacher_dtype: float32}
    lora:  {seeds: [1], rank: 16, ..., targets: null, data: null, limit: null}   # the seeking keys up to limit
    pissa: {...}                                                                  # same keys as lora
    analysis: {metric: cka | cosine | both, n_examples: 16, rank: 16, modules: [up_proj, down_proj, v_proj,
               o_proj], batch_size: 4, cutoff_len: 768, max_tokens: 4096, seeking: true, full_heatmap: false}
    out: runs/NAME

LoRA-trained students default to SPEC §4 (the Seeking authors' trainer: rank 16, alpha 16, dropout 0.05,
lr 3e-4, 3 epochs, batch 64, all nine target modules), trained on the task's LaTen train split (``data``: a
JSONL file or a Seeking task name instead; ``limit``: its first N examples). Seeking's seed examples are up to
``samples`` (default 32) of a Seeking task's shipped samples (gsm, mmlu, super_ni, lima), else the first
``samples`` of the train split (``seed_data`` names another source). The analysis reuses the ``seeking``
stage's extraction when ranks and modules allow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from pktjax.config import ModelConfig
from pktjax.data import laten_split, read_jsonl
from pktjax.errors import ConfigError
from pktjax.lora_train import TrainConfig as LoraTrainConfig
from pktjax.workflows import ANALYSIS_DEFAULTS

EVAL_TASK = {"gsm": "gsm8k", "mmlu": "mmlu", "humaneval": "humaneval", "mbpp": "mbpp"}
LATEN_DEFAULTS = {"seeds": [42], "steps": None, "rate": 0.1, "lr": 3e-5, "cutoff_len": 768,
                  "examples_per_step": 16, "micro_batch": 4, "fuse_steps": "all", "layers": None}
EVAL_DEFAULTS = {"task": None, "limit": None, "max_new_tokens": None, "batch_size": 8, "few_shot": 0}
TRAIN_KEYS = ("rank", "alpha", "dropout", "lr", "epochs", "batch_size", "micro_batch", "cutoff_len", "dtype")
LORA_DEFAULTS = {"seeds": [LoraTrainConfig.seed], **{k: getattr(LoraTrainConfig, k) for k in TRAIN_KEYS},
                 "targets": None, "data": None, "limit": None}
SEEKING_DEFAULTS = {**LORA_DEFAULTS, "samples": 32, "seed_data": None, "teacher_dtype": "float32"}
# section -> (method name in the scores table, LoRA initialisation)
POSTPKT = {"seeking": ("Seeking", "seeking"), "lora": ("LoRA", "default"), "pissa": ("PiSSA", "pissa")}
SECTIONS = {"eval": EVAL_DEFAULTS, "laten": LATEN_DEFAULTS, "seeking": SEEKING_DEFAULTS, "lora": LORA_DEFAULTS,
            "pissa": LORA_DEFAULTS, "analysis": ANALYSIS_DEFAULTS}
TOP_KEYS = ("teacher", "student", "task", "out", *SECTIONS)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    teacher: str
    student: str
    task: str
    out: Path
    eval: dict[str, Any]
    laten: dict[str, Any]
    raw: dict[str, Any]
    seeking: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None
    pissa: dict[str, Any] | None = None
    analysis: dict[str, Any] | None = None

    @property
    def eval_task(self) -> str:
        return self.eval.get("task") or EVAL_TASK[self.task]

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_config(path: str | os.PathLike, out: str | None = None) -> TransferConfig:
    """Parse and check a transfer config (YAML or JSON); ``out`` overrides the config's output folder.
    Every mistake a config can hold is a :class:`ConfigError` here, before any model is touched."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such transfer config.")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a transfer config is a mapping of settings ({', '.join(TOP_KEYS)}).")
    _check_keys(path, "top-level", raw, TOP_KEYS)
    for key in ("teacher", "student", "task"):
        if key not in raw:
            raise ConfigError(f"{path}: the config needs a {key!r} entry.")
    if raw["task"] not in EVAL_TASK:
        raise ConfigError(f"{path}: task {raw['task']!r} has no LaTen splits; choose one of {', '.join(EVAL_TASK)}.")
    sections = {name: _section(path, raw, name) for name in SECTIONS if name in raw or name in ("eval", "laten")}
    out_dir = Path(out or raw.get("out") or Path("runs") / path.stem).expanduser()
    return TransferConfig(teacher=str(raw["teacher"]), student=str(raw["student"]), task=raw["task"], out=out_dir,
                          raw=raw, **sections)


def _check_keys(path: Path, where: str, given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}: unknown {where} key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(allowed)}.")


def _section(path: Path, raw: dict, name: str) -> dict[str, Any]:
    """One section with its defaults filled in, checked (an empty section runs with the defaults)."""
    given = raw.get(name) or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{path}: `{name}` must be a mapping of settings ({', '.join(SECTIONS[name])}).")
    _check_keys(path, f"`{name}`", given, SECTIONS[name])
    sec = {**SECTIONS[name], **given}
    try:
        if name in POSTPKT:
            _check_lora_section(sec)
        elif name == "analysis":
            _check_analysis_section(sec)
        elif name == "laten":
            sec["lr"] = float(sec["lr"])  # YAML reads 3e-5 (no dot) as a string
        if "seeds" in sec and (not isinstance(sec["seeds"], list) or not all(isinstance(s, int) for s in sec["seeds"])):
            raise ConfigError("seeds must be a list of integers")
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: bad `{name}` section: {str(e).rstrip('.')}.") from None
    return sec


def _check_lora_section(sec: dict[str, Any]) -> None:
    from pktjax.lora import check_targets

    for key in ("lr", "alpha", "dropout"):
        sec[key] = float(sec[key])
    lora_config(sec, seed=0).validate()
    if sec["targets"] is not None:
        check_targets(sec["targets"])
    if sec.get("teacher_dtype", "float32") not in ("float32", "bfloat16"):
        raise ConfigError("teacher_dtype must be float32 or bfloat16")


def _check_analysis_section(sec: dict[str, Any]) -> None:
    if sec["metric"] not in ("cka", "cosine", "both"):
        raise ConfigError(f"metric {sec['metric']!r}: choose cka, cosine or both")
    if not sec["modules"] or int(sec["n_examples"]) < 1:
        raise ConfigError("modules must name at least one module and n_examples be at least 1")


def lora_config(sec: dict[str, Any], seed: int) -> LoraTrainConfig:
    """The LoRA trainer's settings of a ``seeking`` / ``lora`` / ``pissa`` section for one seed."""
    return LoraTrainConfig(**{k: sec[k] for k in TRAIN_KEYS}, seed=seed)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def _claim_output(cfg: TransferConfig) -> None:
    """Refuse a folder that holds another run; record this run's config otherwise."""
    marker = cfg.out / "transfer.json"
    if marker.is_file():
        if json.loads(marker.read_text()).get("fingerprint") != cfg.fingerprint():
            raise ConfigError(f"{cfg.out}: holds a run of another config; choose a new output folder "
                              "(or rerun the same config to resume).")
        return
    if cfg.out.exists() and any(cfg.out.iterdir()):
        raise ConfigError(f"{cfg.out}: folder exists and is not a pktjax transfer run; choose a new output folder.")
    _write_json(marker, {"fingerprint": cfg.fingerprint(), "config": cfg.raw})


def parse_tiny(spec: str) -> tuple[ModelConfig, int, float]:
    """``tiny:hidden=64,layers=4,...,seed=1,std=0.2`` -> ``(config, seed, std)`` of a random model."""
    from pktjax.tiny import tiny_config

    fields = dict(kv.split("=", 1) for kv in spec.split(":", 1)[1].split(",") if kv)
    seed, std = int(fields.pop("seed", 0)), float(fields.pop("std", 0.2))
    model_type = fields.pop("model_type", "llama")
    try:
        return tiny_config(model_type=model_type, **{k: int(v) for k, v in fields.items()}), seed, std
    except TypeError as e:
        raise ConfigError(f"{spec}: {e}; tiny models take hidden, layers, inter, heads, kv_heads, vocab, seed, "
                          "std and model_type.") from None


def resolve_model(spec: str, folder: Path) -> Path:
    """A model spec as a local path: ``tiny:`` specs are built (once) into ``folder``, ``registry:PAIR/ROLE``
    names an installed packaged model, an existing path is itself, and ``org/name`` is a Hugging Face repo."""
    if spec.startswith("tiny:"):
        from pktjax.tiny import save_random_model

        if not (folder / "config.json").is_file():
            cfg, seed, std = parse_tiny(spec)
            save_random_model(folder, cfg, seed, std=std)
        return folder
    if spec.startswith("registry:"):
        from pktjax.registry import packaged_path

        return packaged_path(spec.split(":", 1)[1])
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if _HUB_ID.match(spec):
        return hub_model(spec)
    raise ConfigError(f"model {spec!r} does not exist; give a checkpoint folder, a .gguf file, "
                      "registry:qwen2.5-coder/teacher|student (after `pktjax models install qwen2.5-coder`), "
                      "a Hugging Face repo id org/name, or tiny:...")


def hub_model(repo_id: str) -> Path:
    """A Hugging Face repo's local copy (``$PKTJAX_HOME/hub/org--name``), downloaded first when online."""
    from pktjax.registry import download_hub, hub_folder

    local = hub_folder(repo_id)
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        if (local / "config.json").is_file():
            return local
        raise ConfigError(f"model {repo_id!r}: no such local path, and HF_HUB_OFFLINE is set, so the hub repo "
                          f"cannot be downloaded; run `pktjax models install {repo_id}` online first (it lands in "
                          f"{local}) or give a checkpoint folder.")
    try:
        return download_hub(repo_id)
    except Exception as e:  # network, authentication, missing repo: huggingface_hub raises many kinds
        raise ConfigError(f"cannot download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}); "
                          "gated repos (meta-llama/*) need their licence accepted on the hub and a token "
                          "(`huggingface-cli login` or HF_TOKEN); or give a local checkpoint folder.") from None


def check_pair(teacher: Path, student: Path) -> None:
    """Refuse a pair that does not share a vocabulary or whose teacher is the smaller model (configs only)."""
    from pktjax.checkpoint import read_model_config

    t, s = read_model_config(teacher), read_model_config(student)
    if t.vocab_size != s.vocab_size:
        raise ConfigError(f"teacher vocabulary {t.vocab_size} != student vocabulary {s.vocab_size}: "
                          "the pair must share a tokenizer.")
    if (t.hidden_size, t.num_layers) < (s.hidden_size, s.num_layers) or t.hidden_size < s.hidden_size:
        raise ConfigError(f"the teacher (d={t.hidden_size}, L={t.num_layers}) is smaller than the student "
                          f"(d={s.hidden_size}, L={s.num_layers}); swap them.")


def _evaluate(model, cfg: TransferConfig, out: Path, tokenizer=None) -> None:
    """Evaluate a checkpoint path or a loaded :class:`Model` once; the report file is the stage's marker."""
    import jax
    from tqdm.auto import tqdm

    from pktjax.evaluate import evaluate
    from pktjax.sharding import is_main_process

    if out.is_file():
        return
    e = cfg.eval
    label = "/".join(out.relative_to(cfg.out).with_suffix("").parts) if out.is_relative_to(cfg.out) else out.stem
    partial = out.with_suffix(".partial.jsonl")  # finished batches: an interrupted evaluation goes on from there
    with tqdm(total=e["limit"], desc=f"eval {label}", unit="ex", disable=not is_main_process()) as bar:
        evaluate(model, cfg.eval_task, limit=e["limit"], few_shot=e["few_shot"], batch_size=e["batch_size"],
                 max_new_tokens=e["max_new_tokens"], out=out, tokenizer=tokenizer, progress=bar.update,
                 resume=partial if jax.process_count() == 1 else None)  # hosts must decode the same batches
    partial.unlink(missing_ok=True)


def _fuse_steps(setting: Any, saved: list[int]) -> list[int]:
    if setting == "all":
        return saved
    if setting == "last":
        return saved[-1:]
    return [s for s in saved if s in set(setting)]


def _laten_seed(cfg: TransferConfig, teacher: Path, student: Path, seed: int) -> list[dict[str, Any]]:
    """Train the aligner for one seed, fuse and evaluate the chosen steps; returns one row per step."""
    from pktjax.fuse import fuse
    from pktjax.train_aligner import TrainConfig, aligner_steps, train_aligner

    lt, folder = cfg.laten, cfg.out / "laten" / f"seed{seed}"
    tc = TrainConfig(lr=lt["lr"], rate=lt["rate"], steps=lt["steps"], examples_per_step=lt["examples_per_step"],
                     cutoff_len=lt["cutoff_len"], micro_batch=lt["micro_batch"], seed=seed,
                     train_on_inputs=cfg.task == "mmlu", layers=lt["layers"])
    t0 = time.time()
    if not (folder / "trained.json").is_file():
        train_aligner(teacher, student, laten_split(cfg.task, "extract"), laten_split(cfg.task, "align"),
                      folder / "aligner", tc)
        _write_json(folder / "trained.json", {"seconds": time.time() - t0})
    rows = []
    for step in _fuse_steps(lt["fuse_steps"], aligner_steps(folder / "aligner")):
        report_path = folder / f"step{step}" / "eval.json"
        if not report_path.is_file():
            fused = folder / f"step{step}" / "model"
            shutil.rmtree(fused, ignore_errors=True)  # a fuse cut short leaves nothing reusable
            fuse(teacher, student, folder / "aligner", step, laten_split(cfg.task, "train"), fused,
                 rate=lt["rate"], seed=seed)
            _evaluate(fused, cfg, report_path)
            shutil.rmtree(fused, ignore_errors=True)  # keep the report, not a copy of the student per step
        rows.append({"method": "LaTen", "seed": seed, "step": step, **_score(report_path)})
    return rows


def _train_data(cfg: TransferConfig, sec: dict[str, Any]) -> Path:
    """A LoRA section's fine-tuning examples: ``data`` (a JSONL file or a Seeking task) or the LaTen train split."""
    from pktjax.seeking import task_file

    return task_file(str(sec["data"]), "train") if sec["data"] else laten_split(cfg.task, "train")


def _seeking_seeds(cfg: TransferConfig) -> list[dict[str, Any]]:
    from pktjax.workflows import seed_examples

    return seed_examples(str(cfg.seeking["seed_data"] or cfg.task), cfg.seeking["samples"])


def _seeking_factors(cfg: TransferConfig, teacher: Path, student: Path, student_cfg: ModelConfig) -> dict:
    """Seeking's extracted LoRA, computed once for every seed (and the analysis) in ``seeking/extracted``."""
    from pktjax.workflows import seeking_factors

    s = cfg.seeking
    return seeking_factors(teacher, student, student_cfg, _seeking_seeds(cfg), cfg.out / "seeking" / "extracted",
                           rank=s["rank"], targets=s["targets"], samples=s["samples"], cutoff_len=s["cutoff_len"],
                           dtype=s["teacher_dtype"])


def _postpkt_seed(cfg: TransferConfig, name: str, teacher: Path, student: Path, seed: int) -> dict[str, Any]:
    """One LoRA-trained student of section ``name`` (seeking, lora or pissa): train from its init, merge the
    adapter, evaluate. ``<name>/seed<s>/`` holds the adapter, checkpoints, metrics and ``eval.json`` (the marker)."""
    from pktjax.checkpoint import load_model, read_model_config
    from pktjax.tokenizer import load_tokenizer
    from pktjax.workflows import merge_adapter, train_adapter

    sec, folder = getattr(cfg, name), cfg.out / name / f"seed{seed}"
    report = folder / "eval.json"
    if not report.is_file():
        # the extraction holds the teacher and its gradients: it runs before the student is loaded
        teacher_lora = _seeking_factors(cfg, teacher, student, read_model_config(student)) \
            if name == "seeking" else None
        model, tokenizer = load_model(student), load_tokenizer(student)
        examples = read_jsonl(_train_data(cfg, sec), limit=sec["limit"])
        adapter = train_adapter(model, tokenizer, examples, folder, lora_config(sec, seed), method=POSTPKT[name][1],
                                targets=sec["targets"], teacher_lora=teacher_lora)
        merged = merge_adapter(model, adapter).replace(source=str(adapter))  # the eval report names the adapter
        _evaluate(merged, cfg, report, tokenizer=tokenizer)
    return {"method": POSTPKT[name][0], "seed": seed, "step": None, **_score(report)}


def _analysis(cfg: TransferConfig, teacher: Path, student: Path) -> Path:
    """The neural-incompatibility analysis into ``analysis/`` (``analysis.json`` marks it finished)."""
    from pktjax.checkpoint import load_model
    from pktjax.workflows import analyze_pair, probe_examples, seed_examples, shared_tokenizer

    a, folder = cfg.analysis, cfg.out / "analysis"
    if (folder / "analysis.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)  # an analysis cut short leaves nothing reusable
    examples = probe_examples(cfg.task, int(a["n_examples"]))
    tokenizer = shared_tokenizer(teacher, student, examples)
    t_model, s_model = load_model(teacher), load_model(student)
    reuse = a["seeking"] and _reuses_seeking(cfg)
    meta = {"teacher": cfg.teacher, "student": cfg.student,
            "probe": f"{cfg.task} train split ({len(examples)} examples)"}
    if reuse:
        meta["Seeking init"] = "the seeking stage's extraction (seeking/extracted)"
    analyze_pair(t_model, s_model, examples, folder, tokenizer=tokenizer, metric=a["metric"], rank=int(a["rank"]),
                 modules=a["modules"], batch_size=int(a["batch_size"]), cutoff_len=int(a["cutoff_len"]),
                 max_tokens=a["max_tokens"], triangle=not a["full_heatmap"], meta=meta,
                 seeking_lora=_seeking_factors(cfg, teacher, student, s_model.config) if reuse else None,
                 seeking_seeds=seed_examples(cfg.task, probe=len(examples)) if a["seeking"] and not reuse else None)
    return folder


def _reuses_seeking(cfg: TransferConfig) -> bool:
    """Whether the ``seeking`` stage's extraction serves the analysis (same rank, covers its modules)."""
    from pktjax.lora import TARGETS

    s = cfg.seeking
    return s is not None and s["rank"] == cfg.analysis["rank"] and \
        set(cfg.analysis["modules"]) & set(TARGETS) <= set(s["targets"] or TARGETS)


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


def _timed(cfg: TransferConfig, timings: dict[str, float], key: str, fn: Callable, *args) -> Any:
    """Run one stage; its seconds add to those that earlier, interrupted runs spent on it (``timings.json``)."""
    from pktjax.sharding import is_main_process

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
    _claim_output(cfg)
    timings: dict[str, float] = {}
    teacher = resolve_model(cfg.teacher, cfg.out / "models" / "teacher")
    student = resolve_model(cfg.student, cfg.out / "models" / "student")
    check_pair(teacher, student)
    rows = [_timed(cfg, timings, f"eval {name}", _base_row, cfg, name, path)
            for name, path in (("student", student), ("teacher", teacher))]
    for seed in cfg.laten["seeds"]:
        rows += _timed(cfg, timings, f"laten seed {seed}", _laten_seed, cfg, teacher, student, int(seed))
    for name in POSTPKT:
        for seed in (getattr(cfg, name) or {}).get("seeds", []):
            rows.append(_timed(cfg, timings, f"{name} seed {seed}", _postpkt_seed, cfg, name, teacher, student,
                               int(seed)))
    analysis = None if cfg.analysis is None else _timed(cfg, timings, "analysis", _analysis, cfg, teacher, student)
    timings["total"] = sum(timings.values())
    return write_report(cfg, rows, timings, analysis)


def write_report(cfg: TransferConfig, rows: list[dict[str, Any]], timings: dict[str, float],
                 analysis: Path | None = None) -> Path:
    """``scores.json``, ``aligner_curves.png`` and ``report.md`` (scores with CIs, the spread over seeds, the
    analysis figures and numbers when there is an ``analysis`` folder). Each trained model's row also gets
    ``vs_student``, its example-by-example comparison with the base student (:func:`vs_student`)."""
    base = next((r["report"] for r in rows if r["method"] == "base student"), None)
    rows = [dict(r, vs_student=vs_student(base, r["report"])) if base and r["seed"] is not None else r
            for r in rows]
    _write_json(cfg.out / "scores.json", {"rows": rows, "timings": timings})
    curves = plot_aligner_curves(cfg.out)
    lines = [f"# Transfer report: {cfg.task} ({cfg.eval_task})", "",
             f"teacher `{cfg.teacher}` → student `{cfg.student}`", "", *_weights_note(cfg),
             "| method | seed | aligner step | score | 95% CI | n |", "|---|---|---|---|---|---|"]
    for r in rows:
        ci = r.get("ci") or [None, None]
        ci_txt = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci[0] is not None else "—"
        lines.append(f"| {r['method']} | {r['seed'] if r['seed'] is not None else '—'} | "
                     f"{r['step'] if r['step'] is not None else '—'} | {r['score']:.3f} | {ci_txt} | {r.get('n')} |")
    lines += ["", *_seed_summary(rows), "", *_paired_section(rows), "",
              "## Timings (s; a resumed stage adds the time of its earlier tries)", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in timings.items()]
    if curves:
        lines += ["", f"![aligner curves]({curves.name})"]
    if analysis is not None:
        lines += ["", *_analysis_section(cfg.out, analysis)]
    path = cfg.out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _weights_note(cfg: TransferConfig) -> list[str]:
    """A line saying when the scores are those of GGUF (usually quantized) weights."""
    gguf = [name for name, spec in (("teacher", cfg.teacher), ("student", cfg.student))
            if spec.startswith("registry:") or spec.endswith(".gguf")]
    if not gguf:
        return []
    return [f"The {' and '.join(gguf)} weights come from GGUF files (the packaged pair: 4-bit-class "
            "quantizations), dequantized to float32 on load: every score here is that of the quantized model.", ""]


def _analysis_section(out: Path, folder: Path) -> list[str]:
    """The analysis' own report (headings one level down) and its figures, linked relative to ``out``."""
    text = (folder / "report.md").read_text().splitlines()
    body = ["#" + line if line.startswith("#") else line for line in text]
    figures = sorted(folder.glob("representation_*.png")) + sorted(folder.glob("parametric_similarity.png"))
    rel = folder.relative_to(out)
    return [*body, "", *[f"![{p.stem.replace('_', ' ')}]({rel / p.name})" for p in figures],
            "", f"Every number: [{rel / 'analysis.json'}]({rel / 'analysis.json'})."]


def _seed_summary(rows: list[dict[str, Any]]) -> list[str]:
    """Mean and spread over seeds of each trained method's score (per aligner step for LaTen)."""
    groups: dict[tuple[str, Any], list[float]] = {}
    for r in rows:
        if r["seed"] is not None:
            groups.setdefault((r["method"], r["step"]), []).append(r["score"])
    out = ["## Spread over seeds", "", "| method | aligner step | seeds | mean | std | min | max |",
           "|---|---|---|---|---|---|---|"]
    for (method, step), xs in groups.items():
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        out.append(f"| {method} | {step if step is not None else '—'} | {len(xs)} | {statistics.mean(xs):.3f} | "
                   f"{sd:.3f} | {min(xs):.3f} | {max(xs):.3f} |")
    return out


def vs_student(base_report: str | os.PathLike, report: str | os.PathLike) -> dict[str, Any] | None:
    """A trained model against the base student on the same examples: ``gained`` (solved here only), ``lost``
    (solved by the base student only), ``changed`` (outputs unlike the base student's), ``n`` and ``p``, the exact
    McNemar test of gained against lost. ``None`` when the two evaluations did not score the same example ids."""
    from pktjax.tasks.common import mcnemar_exact

    base, new = ({r["id"]: r for r in json.loads(Path(f).read_text())["records"]} for f in (base_report, report))
    if base.keys() != new.keys():
        return None
    gained = sum(bool(new[k]["correct"]) and not base[k]["correct"] for k in base)
    lost = sum(bool(base[k]["correct"]) and not new[k]["correct"] for k in base)
    changed = sum(new[k]["output"] != base[k]["output"] for k in base)
    return {"gained": gained, "lost": lost, "changed": changed, "n": len(base), "p": mcnemar_exact(gained, lost)}


def _paired_section(rows: list[dict[str, Any]]) -> list[str]:
    """The ``vs_student`` comparisons as a table (empty without trained rows)."""
    rows = [r for r in rows if "vs_student" in r]
    if not rows:
        return []
    out = ["## Against the base student, example by example", "",
           "gained: solved here and not by the base student; lost: the reverse; changed: outputs unlike the base "
           "student's; p: exact two-sided McNemar test of gained against lost.", "",
           "| method | seed | aligner step | gained | lost | changed | p |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        v, step = r["vs_student"], r["step"] if r["step"] is not None else "—"
        cells = ("— (other examples)",) * 4 if v is None else (
            v["gained"], v["lost"], f"{v['changed']} of {v['n']}", f"{v['p']:.3f}")
        out.append(f"| {r['method']} | {r['seed']} | {step} | " + " | ".join(map(str, cells)) + " |")
    return out


def plot_aligner_curves(out: Path) -> Path | None:
    """Loss, CE and MSE per aligner step for every seed, from each run's ``log.jsonl``."""
    logs = sorted((out / "laten").glob("seed*/aligner/log.jsonl"))
    if not logs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = ("loss", "ce", "mse")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for log in logs:
        recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        for ax, key in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=log.parts[-3])
    for ax, key in zip(axes, keys):
        ax.set_xlabel("aligner step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out / "aligner_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
