"""``pktjax lora train`` (LoRA students: standard, PiSSA or Seeking init, SPEC §4) and ``pktjax lora merge``."""

from __future__ import annotations

import argparse
from pathlib import Path

from pktjax.settings import DeviceSettings, LoraTrainConfig, SeekingSettings, add_arguments, from_args


def register(sub: argparse._SubParsersAction) -> None:
    from pktjax.commands import task_argument
    from pktjax.commands.seeking import add_targets_argument
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
    add_targets_argument(t)
    t.add_argument("--limit", type=int, default=None, help="read at most this many training examples")
    t.add_argument("--seed-samples", type=int, default=SeekingSettings.samples,
                   help="seed examples for --init seeking with --teacher (default: %(default)s)")
    add_arguments(t, DeviceSettings, ("mesh",))
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


def _teacher_lora(args, method: str, path: str | None, student, out: Path):
    """The Seeking factors: read from ``path``, else extracted from ``--teacher`` into ``out/extracted`` (once)."""
    from pktjax.errors import ConfigError
    from pktjax.lora import import_peft
    from pktjax.workflows import seeking_factors

    if method != "seeking":
        return None
    if path is not None:
        return import_peft(path, student.config)[0]
    if not args.teacher and not (out / "extracted" / "extraction.json").is_file():
        raise ConfigError("--init seeking needs --teacher (or seeking:PATH with an extracted adapter).")
    return seeking_factors(args.teacher, args.student, student.config, args.task, out / "extracted",
                           rank=args.rank or LoraTrainConfig.rank, targets=args.targets, samples=args.seed_samples,
                           cutoff_len=args.cutoff_len, dtype=args.dtype, mesh=args.mesh)


def _train(args: argparse.Namespace) -> int:
    from pktjax import lora as lora_mod
    from pktjax import sharding as S
    from pktjax.checkpoint import load_model
    from pktjax.data import read_jsonl
    from pktjax.seeking import task_file
    from pktjax.tokenizer import load_tokenizer
    from pktjax.workflows import train_adapter

    method, path = _parse_init(args.init)
    mesh = S.as_mesh(args.mesh)
    out = Path(args.out).expanduser()
    student = load_model(args.student, dtype=args.dtype, mesh=mesh)
    tokenizer = load_tokenizer(args.student)
    teacher_lora = _teacher_lora(args, method, path, student, out)
    rank = args.rank or (lora_mod.rank_of(teacher_lora) if teacher_lora else LoraTrainConfig.rank)
    tc = from_args(LoraTrainConfig, args, rank=rank)
    examples = read_jsonl(task_file(args.task, "train"), limit=args.limit)
    adapter = train_adapter(student, tokenizer, examples, out, tc, method=method, targets=args.targets,
                            teacher_lora=teacher_lora, progress=not args.no_progress, mesh=mesh)
    S.main_print(f"adapter for {args.student} in {adapter}; metrics in {out / 'metrics.jsonl'}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from pktjax.checkpoint import load_model, save_model
    from pktjax.workflows import merge_adapter

    merged = merge_adapter(load_model(args.student), args.adapter, args.dtype)
    print(f"merged checkpoint in {save_model(merged, args.out)}")
    return 0
