"""The transfer job's config: the YAML/JSON schema, its defaults and checks (:func:`read_config`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pktjax.errors import ConfigError
from pktjax.lora_train import TrainConfig as LoraTrainConfig
from pktjax.tasks import data_name
from pktjax.workflows import ANALYSIS_DEFAULTS

EVAL_TASK = {"gsm": "gsm8k", "mmlu": "mmlu", "humaneval": "humaneval", "mbpp": "mbpp"}
LATEN_DEFAULTS = {"seeds": [42], "steps": None, "rate": 0.1, "lr": 3e-5, "cutoff_len": 768,
                  "examples_per_step": 16, "micro_batch": 4, "fuse_steps": "all", "layers": None}
EVAL_DEFAULTS = {"task": None, "limit": None, "max_new_tokens": None, "batch_size": 8, "few_shot": 0,
                 "prompt_format": "paper"}
TRAIN_KEYS = ("rank", "alpha", "dropout", "lr", "epochs", "batch_size", "micro_batch", "cutoff_len", "dtype")
LORA_DEFAULTS = {"seeds": [LoraTrainConfig.seed], **{k: getattr(LoraTrainConfig, k) for k in TRAIN_KEYS},
                 "targets": None, "data": None, "limit": None}
SEEKING_DEFAULTS = {**LORA_DEFAULTS, "samples": 32, "seed_data": None, "teacher_dtype": "float32"}
# SemAlign: the paper's trainer settings (5 epochs, lr 3e-4 or 3e-5 for HumanEval when `lr` is null, batch 64,
# LoRA r 16 on up/down/v/o of the paired layer) and its own choices (pktjax.semalign.SemAlignConfig)
SEMALIGN_DEFAULTS = {**SEEKING_DEFAULTS, "epochs": 5, "lr": None,
                     "targets": ["v_proj", "o_proj", "up_proj", "down_proj"], "mode": "lora", "compare": "ffn",
                     "frame": "paper", "layer": None}
# section -> (method name in the scores table, LoRA initialisation)
POSTPKT = {"seeking": ("Seeking", "seeking"), "lora": ("LoRA", "default"), "pissa": ("PiSSA", "pissa")}
SECTIONS = {"eval": EVAL_DEFAULTS, "laten": LATEN_DEFAULTS, "seeking": SEEKING_DEFAULTS, "lora": LORA_DEFAULTS,
            "pissa": LORA_DEFAULTS, "semalign": SEMALIGN_DEFAULTS, "analysis": ANALYSIS_DEFAULTS}
TOP_KEYS = ("teacher", "student", "task", "out", *SECTIONS)


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
    semalign: dict[str, Any] | None = None
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
    task = data_name(str(raw["task"]))  # gsm8k is gsm
    if task not in EVAL_TASK:
        raise ConfigError(f"{path}: task {raw['task']!r} has no LaTen splits; choose one of {', '.join(EVAL_TASK)}.")
    sections = {name: _section(path, raw, name) for name in SECTIONS if name in raw or name in ("eval", "laten")}
    out_dir = Path(out or raw.get("out") or Path("runs") / path.stem).expanduser()
    return TransferConfig(teacher=str(raw["teacher"]), student=str(raw["student"]), task=task, out=out_dir,
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
        if name == "semalign":
            _check_semalign_section(sec, raw["task"])
        elif name in POSTPKT:
            _check_lora_section(sec)
        elif name == "analysis":
            _check_analysis_section(sec)
        elif name == "laten":
            _check_laten_section(sec)
        if "seeds" in sec and (not isinstance(sec["seeds"], list) or not all(isinstance(s, int) for s in sec["seeds"])):
            raise ConfigError("seeds must be a list of integers")
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{path}: bad `{name}` section: {str(e).rstrip('.')}.") from None
    return sec


def _check_laten_section(sec: dict[str, Any]) -> None:
    lrs = sec["lr"] if isinstance(sec["lr"], list) else [sec["lr"]]
    lrs = [float(x) for x in lrs]  # YAML reads 3e-5 (no dot) as a string
    if not lrs or len(set(lrs)) != len(lrs) or not all(x > 0 for x in lrs):
        raise ConfigError(f"lr {sec['lr']!r} must be a positive rate or a list of distinct positive rates")
    sec["lr"] = lrs if isinstance(sec["lr"], list) else lrs[0]
    steps, fuse = sec["steps"], sec["fuse_steps"]
    if isinstance(fuse, list):
        if not fuse or not all(isinstance(x, int) and x >= 0 for x in fuse):
            raise ConfigError(f"fuse_steps {fuse!r} must be all, last or a list of step numbers (0, 1, ...)")
        if steps is not None and max(fuse) >= steps:
            raise ConfigError(f"fuse_steps {fuse} names a step the run stops before (steps: {steps} saves "
                              f"steps 0 to {steps - 1})")
    elif fuse not in ("all", "last"):
        raise ConfigError(f"fuse_steps {fuse!r} must be all, last or a list of step numbers")


def laten_rates(cfg: TransferConfig) -> list[tuple[float, str]]:
    """``(learning rate, folder under laten/)`` per LaTen rate: ``""`` for a single rate (``laten/seed<s>``),
    ``lr<lr>/`` for each of several (``laten/lr0.0003/seed<s>``)."""
    lr = cfg.laten["lr"]
    return [(lr, "")] if not isinstance(lr, list) else [(x, f"lr{x:g}/") for x in lr]


def _check_lora_section(sec: dict[str, Any]) -> None:
    from pktjax.lora import check_targets

    for key in ("lr", "alpha", "dropout"):
        sec[key] = float(sec[key])
    lora_config(sec, seed=0).validate()
    if sec["targets"] is not None:
        check_targets(sec["targets"])
    if sec.get("teacher_dtype", "float32") not in ("float32", "bfloat16"):
        raise ConfigError("teacher_dtype must be float32 or bfloat16")


def _check_semalign_section(sec: dict[str, Any], task: str) -> None:
    from pktjax.semalign import default_lr

    if sec["lr"] is None:
        sec["lr"] = default_lr(task)
    _check_lora_section(sec)
    sec["targets"] = list(sec["targets"])
    semalign_config(sec).validate()


def _check_analysis_section(sec: dict[str, Any]) -> None:
    if sec["metric"] not in ("cka", "cosine", "both"):
        raise ConfigError(f"metric {sec['metric']!r}: choose cka, cosine or both")
    if not sec["modules"] or int(sec["n_examples"]) < 1:
        raise ConfigError("modules must name at least one module and n_examples be at least 1")


def lora_config(sec: dict[str, Any], seed: int) -> LoraTrainConfig:
    """The LoRA trainer's settings of a ``seeking`` / ``lora`` / ``pissa`` / ``semalign`` section for one seed."""
    return LoraTrainConfig(**{k: sec[k] for k in TRAIN_KEYS}, seed=seed)


def semalign_config(sec: dict[str, Any]):
    """SemAlign's own settings of a ``semalign`` section (:class:`pktjax.semalign.SemAlignConfig`)."""
    from pktjax.semalign import SemAlignConfig

    return SemAlignConfig(mode=sec["mode"], targets=tuple(sec["targets"]), compare=sec["compare"],
                          frame=sec["frame"], layer=sec["layer"], samples=int(sec["samples"]))
