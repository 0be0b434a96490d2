"""``pktjax lora train`` (LoRA students: standard, PiSSA or Seeking init, SPEC §4) and ``pktjax lora merge``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pktjax.settings import (DeviceSettings, LoraTrainConfig, SeekingSettings, TrackingSettings, add_arguments,
                             from_args)


def register(sub: argparse._SubParsersAction) -> None:
    from pktjax.commands import task_argument
    p = sub.add_parser("lora", help="LoRA students: train (default / PiSSA / Seeking init), merge into a checkpoint")
    lora = p.add_subparsers(dest="lora_command", required=True)
    t = lora.add_parser("train", help="fine-tune a LoRA on a task (resumes when --out holds checkpoints)")
    t.add_argument("--student", required=True, help="student checkpoint folder or .gguf")
    t.add_argument("--init", default="default",
                   help="default | pissa | seeking (extract from --teacher) | seeking:PATH (an extracted adapter)")
    t.add_argument("--teacher", help="teacher checkpoint for --init seeking without a PATH")
    task_argument(t, "data", required=True, help="gsm | mmlu | super_ni | lima (the shipped 1000 examples) or a JSONL")
    t.add_argument("--out", required=True, help="output folder: adapter/, checkpoints/, metrics.jsonl")
    add_arguments(t, LoraTrainConfig, rank={"default": None,
                                            "help": "LoRA rank (default 16, or the extracted adapter's)"})
    add_arguments(t, SeekingSettings, ("targets", "limit", "samples"),
                  samples={"flag": "--seed-samples", "help": "seed examples for --init seeking with --teacher"})
    add_arguments(t, DeviceSettings, ("mesh",))
    add_arguments(t, TrackingSettings)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)
    m = lora.add_parser("merge", help="merge an adapter into the student and save a transformers checkpoint")
    m.add_argument("--student", required=True, help="the checkpoint the adapter applies to")
    m.add_argument("--adapter", required=True, help="PEFT adapter folder (e.g. the adapter/ of 'lora train')")
    m.add_argument("--out", required=True, help="new checkpoint folder")
    add_arguments(m, DeviceSettings, ("dtype",), dtype={
        "help": "storage dtype of the saved weights (the merge itself runs in float32)"})
    m.set_defaults(func=_merge)


def _parse_init(value: str) -> tuple[str, str | None]:
    from pktjax.errors import ConfigError

    method, _, path = value.partition(":")
    if method not in ("default", "pissa", "seeking") or (path and method != "seeking"):
        raise ConfigError(f"--init {value!r}: use default, pissa, seeking or seeking:PATH.")
    return method, path or None


def _teacher_lora(args, method: str, path: str | None, student_cfg, out: Path, rank: int):
    """The Seeking factors: read from ``path``, else extracted from ``--teacher`` into ``out/extracted`` (once).
    Needs only the student's config: it runs before the student is loaded (the extraction holds the teacher)."""
    from pktjax.lora import import_peft
    from pktjax.workflows import seeking_factors

    if method != "seeking":
        return None
    if path is not None:
        return import_peft(path, student_cfg)[0]
    return seeking_factors(args.teacher, args.student, student_cfg, args.task, out / "extracted", rank=rank,
                           targets=args.targets, samples=args.samples, cutoff_len=args.cutoff_len,
                           dtype=args.dtype, mesh=args.mesh)


def _adapter_rank(method: str, path: str | None, student_cfg, out: Path, default: int) -> int:
    """The rank a run without ``--rank`` trains at, known before any model loads: an extracted adapter's
    (``seeking:PATH``, or a finished extraction in ``out/extracted``), else ``default`` (what a new extraction
    uses)."""
    from pktjax.lora import import_peft, rank_of
    from pktjax.runfolder import read_result

    if method != "seeking":
        return default
    if path is not None:
        return rank_of(import_peft(path, student_cfg)[0])
    info = read_result(out / "extracted" / "extraction.json", "extraction record")  # a damaged one: extracted again
    return int(info["rank"]) if info else default


def _check_flags(args: argparse.Namespace, method: str, path: str | None, out: Path) -> LoraTrainConfig:
    """Every flag checked before any work (nothing loaded, nothing written); the training settings (their rank
    the given one or the default, which an extracted adapter's rank replaces when ``--rank`` is not given)."""
    from pktjax.errors import ConfigError
    from pktjax.lora import check_targets

    tc = from_args(LoraTrainConfig, args)  # --rank 0, --micro-batch 0, ... are refused here
    from_args(TrackingSettings, args)  # a tracker whose package is missing too
    from_args(SeekingSettings, args)  # also --limit 0, --seed-samples 0
    if args.targets is not None:
        check_targets(args.targets)
    if method == "seeking" and path is None and not args.teacher and \
            not (out / "extracted" / "extraction.json").is_file():
        raise ConfigError("--init seeking needs --teacher (or seeking:PATH with an extracted adapter).")
    return tc


def _train(args: argparse.Namespace) -> int:
    import dataclasses

    from pktjax import sharding as S
    from pktjax.checkpoint import load_model, read_model_config
    from pktjax.data import read_jsonl
    from pktjax.lora_train import check_resume, run_record
    from pktjax.seeking import task_file
    from pktjax.settings import as_dict
    from pktjax.tokenizer import load_tokenizer
    from pktjax.tracking import open_tracker
    from pktjax.workflows import train_adapter

    method, path = _parse_init(args.init)
    out = Path(args.out).expanduser()
    tc = _check_flags(args, method, path, out)
    mesh = S.as_mesh(args.mesh)
    student_cfg = read_model_config(args.student)  # a missing or unreadable student is named before any work
    if method == "seeking" and args.teacher and path is None:
        read_model_config(args.teacher)
    examples = read_jsonl(task_file(args.task, "train"), limit=args.limit)  # every line checked
    if args.rank is None:
        tc = dataclasses.replace(tc, rank=_adapter_rank(method, path, student_cfg, out, tc.rank))
    # an --out holding a run with other settings is refused before the teacher or the student loads
    check_resume(out, run_record(tc, len(examples)))
    teacher_lora = _teacher_lora(args, method, path, student_cfg, out, tc.rank)
    student = load_model(args.student, dtype=args.dtype, mesh=mesh)
    tokenizer = load_tokenizer(args.student)
    with open_tracker(args.tracker, out, config={**as_dict(tc), "init": args.init}) as tracker:
        adapter = train_adapter(student, tokenizer, examples, out, tc, method=method, targets=args.targets,
                                teacher_lora=teacher_lora, progress=not args.no_progress, mesh=mesh,
                                data_files=[task_file(args.task, "train")], tracker=tracker)
    S.main_print(f"adapter for {args.student} in {adapter}; metrics in {out / 'metrics.jsonl'}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from pktjax.checkpoint import load_model, save_model
    from pktjax.workflows import merge_adapter

    merged = merge_adapter(load_model(args.student), args.adapter, args.dtype)
    print(f"merged checkpoint in {save_model(merged, args.out)}")
    return 0
