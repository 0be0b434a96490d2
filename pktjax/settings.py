"""Typed settings: one frozen dataclass per section, each default, range and help text written once.

- :class:`AlignerTrainConfig`: LaTen's aligner run (``pktjax laten train``, the ``laten:`` section);
- :class:`LoraTrainConfig`: a LoRA run (``pktjax lora train``, the ``seeking:`` / ``lora:`` / ``pissa:`` sections);
- :class:`DeviceSettings`: the devices and weights' dtype of every command that loads a model (``--mesh``,
  ``--dtype``) and of a transfer job (its top-level ``mesh``, ``dtype``, ``device_memory_gb``);
- :class:`TrackingSettings`: the optional experiment tracker of the trainers' commands (``--tracker``) and of a
  transfer job (its top-level ``tracker``);
- :class:`EvalSettings`, :class:`LatenSettings`, :class:`LoraSettings`, :class:`SeekingSettings`,
  :class:`SemalignSettings`, :class:`AnalysisSettings`: the sections of a transfer config
  (:mod:`pktjax.transfer.config`).

A field's metadata (:func:`setting`) holds its help text and allowed values; :func:`build` turns a mapping (a
YAML section, parsed command-line flags) into a checked instance, and :func:`add_arguments` generates
command-line flags from the same fields. A bad value is a :class:`ConfigError` naming the key, the value and
what is allowed. This module imports no array library, so building the command line stays cheap.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import operator
import types
import typing
from typing import Any, Callable, Mapping

from pktjax.errors import ConfigError
from pktjax.tasks import TASKS
from pktjax.tasks.common import PROMPT_FORMATS
from pktjax.tracking import TRACKERS

MODES = ("reference", "rmsnorm")  # attribution normalisation (SPEC §3.1)
ATTENTION = ("last_key", "all_keys")  # attention-neuron values
DTYPES = ("float32", "bfloat16")
# The weights' storage dtype of every command that loads a model, of a transfer job and of what `pktjax plan`
# counts. Computations that need float32 keep it whatever the weights are: norm statistics, attention softmax,
# logits, attribution scores, the aligner and its optimizer, LoRA factors.
DEFAULT_DTYPE = "float32"
METRICS = ("cka", "cosine", "both")
SEMALIGN_MODES = ("lora", "weights")  # SemAlign trains a LoRA on the paired layer, or its weights
COMPARES = ("ffn", "update", "residual")  # SemAlign's compared layer output (pktjax.semalign.COMPARE)
FRAMES = ("paper", "dual")  # SemAlign's recomposition frame
SEMALIGN_TARGETS = ("v_proj", "o_proj", "up_proj", "down_proj")  # the SemAlign paper's LoRA modules


def setting(default: Any = dataclasses.MISSING, help: str = "", *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, choices: tuple | None = None,
            result: bool = True, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with its help text and allowed values (``ge``/``gt``/``le``/``lt`` bounds, ``choices``).
    ``result=False``: the setting cannot change a run's results (a batch size, a progress bar), so it is left out
    of the run's fingerprint."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "result": result}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def inherit(cls: type, name: str, **changes: Any) -> Any:
    """Field ``name`` of ``cls`` again (same default, help and bounds, ``changes`` applied): a section that
    exposes a trainer's setting shares its one definition."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = {**f.metadata, **{k: v for k, v in changes.items() if k != "default"}}
    return dataclasses.field(default=changes.get("default", f.default), metadata=meta)


# ------------------------------------------------------------------------------------------- checking values


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if tp is type(None):
        return "null"
    if typing.get_origin(tp) in (list, tuple):
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], str(args[0]))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` as type ``tp`` (int, float, bool, str, ``X | None``, ``tuple[X, ...]``), else a ConfigError.
    A float may be written as a string ("3e-5": YAML 1.1 reads an exponent without a dot as text); lists
    become tuples so the settings stay hashable."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError:
                pass
    elif origin in (tuple, list) and isinstance(value, (list, tuple)):
        return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    elif tp is bool and isinstance(value, bool):
        return value
    elif tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif tp is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            x = float(value)
        except ValueError:
            x = math.nan
        if math.isfinite(x):
            return x
    elif tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} = {value!r}: must be {_type_name(tp)}.")


def _bounds_text(meta: Mapping[str, Any]) -> str:
    ops = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
    parts = [f"{op} {meta[k]}" for k, op in ops if meta[k] is not None]
    return " and ".join(parts)


def check_value(value: Any, meta: Mapping[str, Any], key: str) -> None:
    """The bounds and choices of a field's metadata (``None`` always passes: it means "the default rule")."""
    if value is None:
        return
    if meta.get("choices") is not None and value not in meta["choices"]:
        raise ConfigError(f"{key} = {value!r}: choose one of {', '.join(map(str, meta['choices']))}.")
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        ok = all(meta.get(k) is None or op(v, meta[k]) for k, op in (
            ("gt", operator.gt), ("ge", operator.ge), ("lt", operator.lt), ("le", operator.le)))
        if not ok:
            raise ConfigError(f"{key} = {value!r}: must be {_bounds_text(meta)}.")


def build(cls: type, given: Mapping[str, Any], where: str = "", **fixed: Any) -> Any:
    """A checked ``cls`` from ``given`` (missing keys take their defaults; unknown keys, bad types and values out
    of range are ConfigErrors naming ``where.key``); ``fixed`` values are set as they are."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ConfigError(f"unknown {where or cls.__name__} key(s) {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(names)}.")
    hints = typing.get_type_hints(cls)
    prefix = f"{where}." if where else ""
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in fixed:
            values[f.name] = fixed[f.name]
        elif f.name in given:
            values[f.name] = coerce(given[f.name], hints[f.name], prefix + f.name)
    obj = cls(**values)
    obj.validate(where)
    return obj


def check_fields(obj: Any, where: str = "") -> None:
    """Every field of ``obj`` against its type and metadata (the part of ``validate`` shared by all sections)."""
    hints = typing.get_type_hints(type(obj))
    prefix = f"{where}." if where else ""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        coerce(value, hints[f.name], prefix + f.name)
        check_value(value, f.metadata, prefix + f.name)


def as_dict(obj: Any) -> dict[str, Any]:
    """Plain values (tuples as lists): what a config file or ``--print-config`` shows."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def result_keys(cls: type) -> tuple[str, ...]:
    """The fields that can change a run's results (those the run's fingerprint covers)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("result", True))


# ----------------------------------------------------------------------------------------- command-line flags


_RENAMED = "_flag_of_"  # parsed flags: the option string of a field whose flag is spelled otherwise


def add_arguments(parser: argparse.ArgumentParser, cls: type, names: typing.Sequence[str] | None = None,
                  **custom: dict[str, Any]) -> None:
    """``--flag`` options for fields ``names`` of ``cls`` (default: all), their defaults shown in ``--help``.
    ``custom[name]``: keyword arguments that replace the generated ones for that flag (e.g. another default), and
    ``"flag"``: another option string than ``--field-name`` (:func:`from_args` names it in its messages)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names or list(fields):
        f, tp = fields[name], hints[name]
        args = typing.get_args(tp)
        base = next((a for a in args if a is not type(None)), tp) if args and typing.get_origin(tp) not in (
            tuple, list) else tp
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        kw: dict[str, Any] = {"default": default, "help": f.metadata.get("help", "")}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) in (tuple, list):
            kw.update(nargs="+", action=list_action(typing.get_args(base)[0]))
        else:
            kw["type"] = base
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        kw.update(custom.get(name, {}))
        flag = kw.pop("flag", "--" + name.replace("_", "-"))
        if flag != "--" + name.replace("_", "-"):
            parser.set_defaults(**{_RENAMED + name: flag})
            if base is not bool:
                kw.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
        if kw["default"] is not None and "%(default)" not in kw["help"]:
            # a list default as it is typed on the command line
            shown = " ".join(map(str, kw["default"])) if isinstance(kw["default"], tuple) else "%(default)s"
            kw["help"] = (kw["help"] + " " if kw["help"] else "") + f"(default: {shown})"
        parser.add_argument(flag, dest=name, **kw)


def list_action(item: Callable[[str], object] = str) -> type[argparse.Action]:
    """The action of an option taking a list, written the same way by every command: space-separated,
    comma-separated or both (``--modules up_proj down_proj``, ``--modules up_proj,down_proj``); the value is a
    tuple of ``item(s)``."""

    class _Items(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            try:
                parsed = tuple(item(v.strip()) for value in values for v in value.split(",") if v.strip())
            except ValueError as e:
                parser.error(f"{option_string}: {e}")
            setattr(namespace, self.dest, parsed)

    return _Items


def from_args(cls: type, args: argparse.Namespace, where: str = "", **fixed: Any) -> Any:
    """A checked ``cls`` from parsed flags (those :func:`add_arguments` made), ``fixed`` overriding them. A bad
    value is named ``flag.field``, or by its option string when the flag is not spelled like the field."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if f.name not in fixed and getattr(args, f.name, None) is not None}
    where = where or "flag"
    try:
        return build(cls, given, where, **fixed)
    except ConfigError as e:
        for f in dataclasses.fields(cls):
            flag, key = getattr(args, _RENAMED + f.name, None), f"{where}.{f.name} "
            if flag and str(e).startswith(key):
                raise ConfigError(f"{flag} {str(e)[len(key):]}") from None
        raise


# --------------------------------------------------------------------------------------------- the trainers


@dataclasses.dataclass(frozen=True)
class AlignerTrainConfig:
    """Settings of an aligner run (SPEC §3.6 defaults). ``steps``: stop after this many steps (``None``: run the
    whole extract split); the learning-rate schedule spans the whole split either way.
    ``micro_batch`` examples go through one compiled forward/backward; lengths round up to ``bucket``.
    ``train_on_inputs``: loss on prompt tokens too (the command line turns it on for MMLU)."""

    lr: float = setting(3e-5, "peak learning rate of the one-cycle schedule", gt=0)
    rate: float = setting(0.1, "fraction of neurons per layer to transfer", gt=0, le=1)
    steps: int | None = setting(
        None, "stop after this many steps (default: all, one per extract example); the one-cycle schedule spans the "
              "whole extract split either way, and a later run with more steps on the same --out continues this one",
        ge=1)
    examples_per_step: int = setting(16, "P: examples in each step's loss", ge=1)
    mse_weight: float = setting(1000.0, "lambda of the delta-size penalty", ge=0)
    cutoff_len: int = setting(768, "tokens per example at most", ge=1)
    train_on_inputs: bool = setting(False, "loss on prompt tokens too")
    # memory knobs only: a step's gradient is the same sum over its examples (up to float32 rounding) however they
    # are cut and padded, so a resumed run may change them
    micro_batch: int = setting(4, "examples per compiled forward/backward", ge=1, result=False)
    bucket: int = setting(64, "sequence lengths round up to a multiple of this", ge=1, result=False)
    seed: int = setting(42, "train: the example order and the aligner's init; fuse: the example located on")
    modules: tuple[str, ...] | None = setting(
        None, "subset of up_proj,down_proj,v_proj,o_proj (default: all four, or without v_proj for grouped-query "
              "attention)")
    mode: str = setting("reference", "attribution normalisation", choices=MODES)
    attention: str = setting("last_key", "attention-neuron values", choices=ATTENTION)
    layers: int | None = setting(
        None, "K, the layers transferred into (default: every student layer); neurons are scored only in each "
              "model's top K layers, so a small K makes locating about K/L as costly", ge=1)
    dtype: str = setting(DEFAULT_DTYPE, "storage dtype of the teacher's and student's weights (the aligner and "
                                        "its optimizer stay float32)", choices=DTYPES)

    def validate(self, where: str = "") -> None:
        check_fields(self, where)


@dataclasses.dataclass(frozen=True)
class LoraTrainConfig:
    """Hyper-parameters of a LoRA run (the Seeking authors' defaults, SPEC §4)."""

    rank: int = setting(16, "LoRA rank", ge=1)
    alpha: float = setting(16.0, "LoRA scale numerator (the update is alpha/rank B A)", gt=0)
    dropout: float = setting(0.05, "dropout on the LoRA input", ge=0, lt=1)
    lr: float = setting(3e-4, "peak learning rate", gt=0)
    epochs: int = setting(3, "passes over the training examples", ge=1)
    batch_size: int = setting(64, "examples per optimizer step", ge=1)
    micro_batch: int = setting(8, "examples per compiled forward/backward", ge=1)
    warmup_ratio: float = setting(0.03, "fraction of the steps with a linear warmup", ge=0, lt=1)
    weight_decay: float = setting(0.0, "AdamW weight decay", ge=0)
    max_grad_norm: float = setting(1.0, "gradient clipping at this global norm", gt=0)
    cutoff_len: int = setting(2048, "tokens per example at most", ge=1)
    bucket: int = setting(64, "sequence lengths round up to a multiple of this", ge=1)
    dtype: str = setting(DEFAULT_DTYPE, "storage dtype of the frozen base weights (the adapter stays float32)",
                         choices=DTYPES)
    seed: int = setting(1, "seed of the LoRA init, dropout and example order")
    save_every: int = setting(0, "extra checkpoints every N optimizer steps (0: after each epoch and at the end)",
                              ge=0, result=False)

    @property
    def scale(self) -> float:
        return float(self.alpha) / float(self.rank)  # PEFT's scaling

    def validate(self, where: str = "") -> None:
        check_fields(self, where)
        if self.batch_size % self.micro_batch or self.micro_batch > self.batch_size:
            raise ConfigError(f"bad LoRA training config: batch_size={self.batch_size} must be a multiple of "
                              f"micro_batch={self.micro_batch}.")


# ----------------------------------------------------------------------------------------------------- devices


@dataclasses.dataclass(frozen=True)
class DeviceSettings:
    """Where a job runs and how its weights are stored: ``--mesh`` / ``--dtype`` of every command that loads a
    model, and the top-level ``mesh``, ``dtype`` and ``device_memory_gb`` of a transfer config."""

    # a mesh splits the same computation over devices: only the order of float32 sums changes (the sharded
    # transfer test finds every score equal and the injected delta sizes within a relative 1e-3), so a run
    # resumes on any mesh
    mesh: str | None = setting(
        None, "device mesh to shard over, e.g. 'fsdp=8', 'fsdp=4,tensor=2' or 'data=2,fsdp=2,tensor=2' (its sizes "
              "multiply to the device count; -1: the devices left over; default: one device)", result=False)
    # bfloat16 weights give other activations and scores than float32 ones: the dtype is part of a run's identity
    dtype: str = setting(DEFAULT_DTYPE, "storage dtype of the models' weights; float32 computations (norms, "
                                        "softmax, logits, attribution scores, aligner, LoRA factors) stay float32",
                         choices=DTYPES)
    # only what is checked before a job starts, not what it computes
    device_memory_gb: float | None = setting(
        None, "memory of one device in GiB that the fit check of `pktjax plan` assumes (default: what the device "
              "reports; a CPU reports none, so no check)", gt=0, result=False)

    def validate(self, where: str = "") -> None:
        check_fields(self, where)
        if self.mesh is not None:
            from pktjax.sharding import parse_mesh_spec, spec_devices

            try:  # the syntax; the sizes meet the device count when the job starts
                parse_mesh_spec(self.mesh, spec_devices(self.mesh))
            except ConfigError as e:
                raise ConfigError(f"{where + '.' if where else ''}mesh: {e}") from None


@dataclasses.dataclass(frozen=True)
class TrackingSettings:
    """Where training curves and scores go besides pktjax's own files (:mod:`pktjax.tracking`): ``--tracker`` of
    the trainers' commands and the top-level ``tracker`` of a transfer config."""

    # a tracker shows the numbers a run writes anyway: it never changes them
    tracker: str = setting("none", "also log training curves and scores to TensorBoard (event files under "
                                   "OUT/tensorboard; needs tensorboardX) or W&B (needs wandb)", choices=TRACKERS,
                           result=False)

    def validate(self, where: str = "") -> None:
        from pktjax.tracking import require

        check_fields(self, where)
        require(self.tracker)  # a missing package is named before any work


# ------------------------------------------------------------------------------- sections of a transfer config


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How every model of a transfer job is evaluated."""

    task: str | None = setting(None, "evaluation task (default: the job's task)", choices=TASKS)
    limit: int | None = setting(None, "evaluate the first N test examples (default: all)", ge=1)
    max_new_tokens: int | None = setting(None, "tokens generated at most (default: the task's)", ge=1)
    batch_size: int = setting(8, "decode slots of the continuous batching (generation tasks) or forward batch "
                                 "(MMLU)", ge=1, result=False)
    few_shot: int = setting(0, "exemplars in each prompt (MMLU: 0 or 5)", ge=0)
    prompt_format: str = setting("paper", "the paper's <|user|> chat format, or the model's own chat template "
                                          "(tokenizer or GGUF)", choices=PROMPT_FORMATS)
    # bfloat16 products give other completions than float32 ones: part of a run's identity when set
    matmul_dtype: str | None = setting(None, "multiply by copies of the weight matrices in this dtype, activations, "
                                             "sums and logits staying float32 (bfloat16: half the bytes per decode "
                                             "step; fast on CPUs with AMX or AVX512-BF16; default: the weights' "
                                             "own dtype)", choices=DTYPES)

    def validate(self, where: str = "") -> None:
        check_fields(self, where)


def _fuse_steps_ok(value: Any) -> bool:
    return value in ("all", "last") or (isinstance(value, tuple) and len(value) > 0 and
                                        all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value))


@dataclasses.dataclass(frozen=True)
class LatenSettings:
    """The ``laten:`` section: seeds, which aligner steps to fuse, and the aligner's settings."""

    # seeds, steps and fuse_steps choose which runs and checkpoints are made, not what any of them holds (the
    # schedule spans the whole extract split): a run may be resumed with more or fewer of them
    seeds: tuple[int, ...] = setting(help="one aligner run per seed ([] skips LaTen)", factory=lambda: (42,),
                                     result=False)
    steps: int | None = inherit(AlignerTrainConfig, "steps", result=False)
    rate: float = inherit(AlignerTrainConfig, "rate")
    lr: float | tuple[float, ...] = inherit(AlignerTrainConfig, "lr",
                                            help="peak learning rate, or a list (an aligner run per rate and seed)")
    cutoff_len: int = inherit(AlignerTrainConfig, "cutoff_len")
    examples_per_step: int = inherit(AlignerTrainConfig, "examples_per_step")
    micro_batch: int = inherit(AlignerTrainConfig, "micro_batch")
    fuse_steps: str | tuple[int, ...] = setting("all", "aligner steps fused and evaluated: all, last or a list "
                                                       "of steps (0 is the first)", result=False)
    layers: int | None = inherit(AlignerTrainConfig, "layers")
    # the batched locate holds every example's activations of a pass at once (`pktjax plan` counts E of them)
    locate_batch: int = setting(32, "examples per batched locate pass (memory only: each example's scores are its "
                                    "own)", ge=1, result=False)

    def validate(self, where: str = "") -> None:
        check_fields(self, where)
        if isinstance(self.lr, tuple) and (not self.lr or len(set(self.lr)) != len(self.lr)):
            raise ConfigError(f"{where + '.' if where else ''}lr = {list(self.lr)}: give one rate or a list of "
                              "distinct rates.")
        if not _fuse_steps_ok(self.fuse_steps):
            raise ConfigError(f"{where + '.' if where else ''}fuse_steps = {self.fuse_steps!r}: choose all, last "
                              "or a non-empty list of steps >= 0.")
        if isinstance(self.fuse_steps, tuple) and self.steps is not None and max(self.fuse_steps) >= self.steps:
            raise ConfigError(f"{where + '.' if where else ''}fuse_steps = {list(self.fuse_steps)} names a step the "
                              f"run stops before: it saves steps 0 to {self.steps - 1} (steps = {self.steps}).")


_LORA_KEYS = ("rank", "alpha", "dropout", "lr", "epochs", "batch_size", "micro_batch", "cutoff_len", "dtype")


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """A ``lora:`` / ``pissa:`` section: seeds, the trainer's settings, the targets and the data."""

    seeds: tuple[int, ...] = setting(help="one LoRA run per seed", factory=lambda: (LoraTrainConfig.seed,))
    rank: int = inherit(LoraTrainConfig, "rank")
    alpha: float = inherit(LoraTrainConfig, "alpha")
    dropout: float = inherit(LoraTrainConfig, "dropout")
    lr: float = inherit(LoraTrainConfig, "lr")
    epochs: int = inherit(LoraTrainConfig, "epochs")
    batch_size: int = inherit(LoraTrainConfig, "batch_size")
    micro_batch: int = inherit(LoraTrainConfig, "micro_batch")
    cutoff_len: int = inherit(LoraTrainConfig, "cutoff_len")
    # None until the transfer config fills in its top-level dtype (pktjax.transfer.config)
    dtype: str | None = inherit(LoraTrainConfig, "dtype", default=None,
                                help="storage dtype of the frozen base weights (default: the job's dtype)")
    targets: tuple[str, ...] | None = setting(None, "modules to adapt among q_proj k_proj v_proj o_proj gate_proj "
                                                    "up_proj down_proj embed_tokens lm_head (default: all nine)")
    data: str | None = setting(None, "training examples: a JSONL file or a Seeking task (default: the LaTen "
                                     "train split)")
    limit: int | None = setting(None, "train on the first N examples", ge=1)

    def trainer(self, seed: int) -> LoraTrainConfig:
        """The LoRA trainer's settings of this section for one seed."""
        return LoraTrainConfig(**{k: getattr(self, k) for k in _LORA_KEYS if k != "dtype"},
                               dtype=self.dtype or DEFAULT_DTYPE, seed=seed)

    def validate(self, where: str = "") -> None:
        check_fields(self, where)
        self.trainer(seed=0).validate(where)


@dataclasses.dataclass(frozen=True)
class SeekingSettings(LoraSettings):
    """The ``seeking:`` section: a LoRA section plus the extraction's seed examples and teacher dtype."""

    samples: int = setting(32, "seed examples of the extraction at most", ge=1)
    seed_data: str | None = setting(None, "source of the seed examples (default: the job's task)")
    teacher_dtype: str | None = setting(None, "storage dtype of the teacher's weights during extraction (default: "
                                              "the job's dtype)", choices=DTYPES)


def semalign_lr(task: str | None) -> float:
    """SemAlign's paper learning rate for ``task``: 3e-5 for HumanEval, 3e-4 for the other tasks."""
    return 3e-5 if task == "humaneval" else 3e-4


@dataclasses.dataclass(frozen=True)
class SemalignSettings(SeekingSettings):
    """The ``semalign:`` section: the Seeking section's keys with the SemAlign paper's trainer settings (5 epochs,
    the task's learning rate, LoRA on up/down/v/o of the paired layer) and SemAlign's own choices
    (:class:`pktjax.semalign.SemAlignConfig`)."""

    epochs: int = inherit(LoraTrainConfig, "epochs", default=5)
    lr: float | None = inherit(LoraTrainConfig, "lr", default=None,
                               help="peak learning rate (default: the task's, 3e-5 for humaneval, else 3e-4)")
    targets: tuple[str, ...] = setting(help="matrices of the paired layer to train",
                                       factory=lambda: SEMALIGN_TARGETS)
    mode: str = setting("lora", "train a LoRA on the paired layer, or its weights", choices=SEMALIGN_MODES)
    compare: str = setting("ffn", "layer output compared: ffn (the MLP output before the residual), update "
                                  "(attention + MLP) or residual (the layer's residual output)", choices=COMPARES)
    frame: str = setting("paper", "recomposition: the paper's S_S a, or the dual frame (exact for equal heads)",
                         choices=FRAMES)
    layer: int | None = setting(None, "student layer to train, from 1 (default: the pairing's)", ge=1)
    # a figure beside the run: it cannot change the trained layer or any score
    cka: int = setting(0, "also plot the before / after CKA of the trained layer with every teacher layer on the "
                          "first N training examples (alignment_cka.png; 0: a transfer job with an analysis: "
                          "section plots it on that section's probe examples, else no plot)", ge=0, result=False)

    def trainer(self, seed: int, task: str | None = None) -> LoraTrainConfig:
        """The LoRA trainer's settings for one seed; ``lr`` null takes ``task``'s rate (:func:`semalign_lr`)."""
        lr = semalign_lr(task) if self.lr is None else self.lr
        return LoraTrainConfig(**{k: getattr(self, k) for k in _LORA_KEYS if k not in ("lr", "dtype")}, lr=lr,
                               dtype=self.dtype or DEFAULT_DTYPE, seed=seed)

    def validate(self, where: str = "") -> None:
        super().validate(where)
        if not self.targets:
            raise ConfigError(f"{where + '.' if where else ''}targets: name at least one matrix.")


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
    """The neural-incompatibility analysis (``pktjax analyze``, the ``analysis:`` section)."""

    metric: str = setting("cka", "representation similarity metric", choices=METRICS)
    n_examples: int = setting(16, "probe examples", ge=1)
    rank: int = setting(16, "LoRA rank of the PiSSA and Seeking inits", ge=1)
    modules: tuple[str, ...] = setting(help="modules compared",
                                       factory=lambda: ("up_proj", "down_proj", "v_proj", "o_proj"))
    batch_size: int = setting(4, "probe examples per forward", ge=1)
    cutoff_len: int = setting(768, "tokens per probe example at most", ge=1)
    max_tokens: int | None = setting(4096, "probe tokens counted at most", ge=1)
    seeking: bool = setting(True, "also the Seeking init (it needs teacher gradients)")
    full_heatmap: bool = setting(False, "show and summarise every cell, not only teacher layer >= student layer")

    def validate(self, where: str = "") -> None:
        check_fields(self, where)
        if not self.modules:
            raise ConfigError(f"{where + '.' if where else ''}modules: name at least one module.")
