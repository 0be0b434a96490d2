"""The transfer job's config: the YAML/JSON schema, its defaults and checks (:func:`read_config`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from pktjax import settings as S
from pktjax.errors import ConfigError
from pktjax.lora import check_targets
from pktjax.remote import check_url, is_url, staging_folder
from pktjax.settings import (DEFAULT_DTYPE, AnalysisSettings, DeviceSettings, EvalSettings, LatenSettings,
                             LoraSettings, LoraTrainConfig, SeekingSettings, SemalignSettings, TrackingSettings)
from pktjax.tasks import data_name
from pktjax.transfer.models import parse_tiny

EVAL_TASK = {"gsm": "gsm8k", "mmlu": "mmlu", "humaneval": "humaneval", "mbpp": "mbpp"}
# section -> its settings class (the one place its keys, defaults and ranges live: pktjax.settings)
SECTIONS = {"eval": EvalSettings, "laten": LatenSettings, "seeking": SeekingSettings, "lora": LoraSettings,
            "pissa": LoraSettings, "semalign": SemalignSettings, "analysis": AnalysisSettings}
EVAL_DEFAULTS, LATEN_DEFAULTS, LORA_DEFAULTS, SEEKING_DEFAULTS, SEMALIGN_DEFAULTS = (
    S.as_dict(c()) for c in (EvalSettings, LatenSettings, LoraSettings, SeekingSettings, SemalignSettings))
TRAIN_KEYS = S._LORA_KEYS
# section -> (method name in the scores table, LoRA initialisation)
POSTPKT = {"seeking": ("Seeking", "seeking"), "lora": ("LoRA", "default"), "pissa": ("PiSSA", "pissa")}
# the top-level keys mesh, dtype and device_memory_gb (pktjax.settings.DeviceSettings)
DEVICE_KEYS = tuple(f.name for f in dataclasses.fields(DeviceSettings))
TRACKING_KEYS = tuple(f.name for f in dataclasses.fields(TrackingSettings))  # the top-level key tracker
TOP_KEYS = ("teacher", "student", "task", "out", *DEVICE_KEYS, *TRACKING_KEYS, *SECTIONS)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """A checked transfer job: the models, the task, the output folder, the devices and weights' dtype
    (``device``: the top-level ``mesh``, ``dtype``, ``device_memory_gb``), the tracker (``tracking``: the
    top-level ``tracker``) and one settings object per section (``None``: the section is absent). ``raw``: the
    config as written, with the command line's overrides. ``remote``: the URL the run folder is mirrored to
    (:mod:`pktjax.remote`) when the output is one; ``out`` is then the local staging folder the job runs in."""

    teacher: str
    student: str
    task: str
    out: Path
    eval: EvalSettings
    laten: LatenSettings
    raw: dict[str, Any]
    seeking: SeekingSettings | None = None
    lora: LoraSettings | None = None
    pissa: LoraSettings | None = None
    semalign: SemalignSettings | None = None
    analysis: AnalysisSettings | None = None
    device: DeviceSettings = DeviceSettings()
    tracking: TrackingSettings = TrackingSettings()
    remote: str | None = None

    @property
    def eval_task(self) -> str:
        return self.eval.task or EVAL_TASK[self.task]

    def fingerprint(self) -> str:
        """The config's identity for resuming (:func:`result_fingerprint` of the config as written)."""
        return result_fingerprint(self.raw)

    def legacy_fingerprint(self) -> str:
        """The fingerprint of the whole config as written (what runs recorded before settings were typed)."""
        return _hash(self.raw)

    def resumes(self, marker: dict[str, Any]) -> bool:
        """Whether a run folder's marker (``transfer.json``) records this run. Its config is fingerprinted again
        under today's rules as well, so a setting found since to leave results alone (``result=False``) does not
        lock older run folders out."""
        recorded = marker.get("config")
        return (marker.get("fingerprint") in (self.fingerprint(), self.legacy_fingerprint())
                or isinstance(recorded, dict) and result_fingerprint(recorded) == self.fingerprint())

    def resolved(self) -> dict[str, Any]:
        """Every setting with its defaults filled in (what ``--print-config`` shows)."""
        out = {"teacher": self.teacher, "student": self.student, "task": self.task, "out": self.remote or str(self.out),
               **S.as_dict(self.device), **S.as_dict(self.tracking)}
        for name in SECTIONS:
            sec = getattr(self, name)
            if sec is not None:
                out[name] = S.as_dict(sec)
        return out


def result_fingerprint(raw: dict[str, Any]) -> str:
    """A config's identity for resuming, from the config as written (``raw``): settings that cannot change results
    (``result=False`` in :mod:`pktjax.settings`, e.g. ``eval.batch_size``, ``laten.micro_batch``, the ``mesh``)
    are left out (the top-level ``tracker`` too), so changing them does not block a resume; ``dtype`` counts when it is not the default (runs
    recorded before it existed were float32)."""
    raw = {k: v for k, v in raw.items()
           if (k not in DEVICE_KEYS or k in S.result_keys(DeviceSettings)) and
           (k not in TRACKING_KEYS or k in S.result_keys(TrackingSettings))}
    if raw.get("dtype") == DEFAULT_DTYPE:
        del raw["dtype"]
    for name, cls in SECTIONS.items():
        if isinstance(raw.get(name), dict):
            keep = S.result_keys(cls)
            raw[name] = {k: v for k, v in raw[name].items() if k in keep}
    return _hash(raw)


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_config(path: str | os.PathLike, out: str | None = None, overrides: Sequence[str] = (),
                staging: str | os.PathLike | None = None) -> TransferConfig:
    """Parse and check a transfer config (YAML or JSON); ``out`` overrides the config's output folder and
    ``overrides`` its settings (``key=value``, dotted keys such as ``laten.lr=3e-4``, values read as YAML). An
    output that is a URL (``gs://…``) is staged in the local folder ``staging`` (default:
    :func:`pktjax.remote.staging_folder`) and mirrored to the URL.
    Every mistake a config can hold is a :class:`ConfigError` here, before any model is touched."""
    path = Path(path)
    raw = apply_overrides(_load_yaml(path), overrides)
    _check_keys(path, "top-level", raw, TOP_KEYS)
    for key in ("teacher", "student", "task"):
        if key not in raw:
            raise ConfigError(f"{path}: the config needs a {key!r} entry.")
        if not isinstance(raw[key], str):
            raise ConfigError(f"{path}: {key} = {raw[key]!r}: must be a string.")
    task = data_name(raw["task"])  # gsm8k is gsm
    if task not in EVAL_TASK:
        raise ConfigError(f"{path}: task {raw['task']!r} has no LaTen splits; choose one of {', '.join(EVAL_TASK)}.")
    for key in ("teacher", "student"):
        if raw[key].startswith("tiny:"):
            try:
                parse_tiny(raw[key])
            except ConfigError as e:
                raise ConfigError(f"{path}: {key}: {e}") from None
    if raw.get("out") is not None and not isinstance(raw["out"], str):
        raise ConfigError(f"{path}: out = {raw['out']!r}: must be a folder path or a URL (a string).")
    target = out or raw.get("out")
    remote = target.rstrip("/") if target and is_url(target) else None
    if remote:
        check_url(remote, f"{path}: out" if out is None else "--out")
    elif staging is not None:
        raise ConfigError(f"--staging {staging}: a staging folder is for an output URL (out: gs://...); the output "
                          f"{target or 'runs/' + path.stem} is a local folder already.")
    try:
        device = S.build(DeviceSettings, {k: raw[k] for k in DEVICE_KEYS if k in raw})
        tracking = S.build(TrackingSettings, {k: raw[k] for k in TRACKING_KEYS if k in raw})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    sections = {name: _section(path, raw, name, device.dtype) for name in SECTIONS
                if name in raw or name in ("eval", "laten")}
    out_dir = staging_folder(remote, staging) if remote else Path(target or Path("runs") / path.stem).expanduser()
    return TransferConfig(teacher=raw["teacher"], student=raw["student"], task=task, out=out_dir,
                          raw=raw, device=device, tracking=tracking, remote=remote, **sections)


def _load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such transfer config.")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e}); save the config as UTF-8.") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a transfer config is a mapping of settings ({', '.join(TOP_KEYS)}).")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """``raw`` with each ``key=value`` set (``section.key`` for a section's setting; ``value`` read as a YAML
    scalar or flow list, e.g. ``laten.seeds=[1,2]``); ``raw`` itself is left unchanged."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, eq, text = item.partition("=")
        parts = key.strip().split(".")
        if not eq or not all(parts) or len(parts) > 2:
            raise ConfigError(f"override {item!r}: write key=value or section.key=value (e.g. laten.lr=3e-4).")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(e).split())}).") \
                from None
        if len(parts) == 1:
            raw[parts[0]] = value
            continue
        section = raw.get(parts[0])
        if section is None:
            section = raw[parts[0]] = {}
        if not isinstance(section, dict):
            raise ConfigError(f"override {item!r}: {parts[0]} is not a section of settings.")
        section[parts[1]] = value
    return raw


def _check_keys(path: Path, where: str, given: dict, allowed) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{path}: unknown {where} key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(allowed)}.")


def _section(path: Path, raw: dict, name: str, dtype: str) -> Any:
    """One section's settings object, checked (an empty section runs with the defaults; an unset ``dtype`` or
    ``teacher_dtype`` is the job's ``dtype``)."""
    given = raw.get(name) or {}
    cls = SECTIONS[name]
    fields = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(given, dict):
        raise ConfigError(f"{path}: `{name}` must be a mapping of settings ({', '.join(fields)}).")
    _check_keys(path, f"`{name}`", given, fields)
    given = {**given, **{k: dtype for k in ("dtype", "teacher_dtype") if k in fields and given.get(k) is None}}
    try:
        sec = S.build(cls, given, name)
        if isinstance(sec, LoraSettings) and sec.targets is not None:
            check_targets(sec.targets)
        if isinstance(sec, SemalignSettings):
            semalign_config(sec).validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: bad `{name}` section: {str(e).rstrip('.')}.") from None
    return sec


def laten_rates(cfg: TransferConfig) -> list[tuple[float, str]]:
    """``(learning rate, folder under laten/)`` per LaTen rate: ``""`` for a single rate (``laten/seed<s>``),
    ``lr<lr>/`` for each of several (``laten/lr0.0003/seed<s>``)."""
    lr = cfg.laten.lr
    return [(lr, "")] if not isinstance(lr, tuple) else [(x, f"lr{x:g}/") for x in lr]


def lora_config(sec: LoraSettings, seed: int) -> LoraTrainConfig:
    """The LoRA trainer's settings of a ``seeking`` / ``lora`` / ``pissa`` section for one seed (a ``semalign``
    section's: :meth:`pktjax.settings.SemalignSettings.trainer`, which needs the task)."""
    return sec.trainer(seed)


def semalign_config(sec: SemalignSettings):
    """SemAlign's own settings of a ``semalign`` section (:class:`pktjax.semalign.SemAlignConfig`)."""
    from pktjax.semalign import SemAlignConfig

    return SemAlignConfig(mode=sec.mode, targets=sec.targets, compare=sec.compare, frame=sec.frame,
                          layer=sec.layer, samples=sec.samples)
