"""``pktjax lora train`` (LoRA students: standard, PiSSA or Seeking init, SPEC §4) and ``pktjax lora merge``."""

from __future__ import annotations

import argparse
from pathlib import Path


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
    t.add_argument("--epochs", type=int, default=3, help="passes over the training examples")
    t.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    t.add_argument("--batch-size", type=int, default=64, help="examples per optimizer step")
    t.add_argument("--micro-batch", type=int, default=8, help="examples per compiled forward/backward")
    t.add_argument("--rank", type=int, default=None, help="LoRA rank (default 16, or the extracted adapter's)")
    t.add_argument("--alpha", type=float, default=16.0, help="LoRA scale numerator (the update is alpha/rank B A)")
    t.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA input")
    add_targets_argument(t)
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of the base")
    t.add_argument("--seed", type=int, default=1, help="seed of the LoRA init, dropout and example order")
    t.add_argument("--cutoff-len", type=int, default=2048, help="tokens per example at most")
    t.add_argument("--limit", type=int, default=None, help="read at most this many training examples")
    t.add_argument("--seed-samples", type=int, default=32, help="seed examples for --init seeking with --teacher")
    t.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    t.add_argument("--mesh", default=None, help="device mesh to shard over, e.g. 'fsdp=8' or "
                   "'data=2,fsdp=2,tensor=2' (its sizes multiply to the device count; default: one device)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)
    m = lora.add_parser("merge", help="merge an adapter into the student and save a transformers checkpoint")
    m.add_argument("--student", required=True, help="the checkpoint the adapter applies to")
    m.add_argument("--adapter", required=True, help="PEFT adapter folder (e.g. the adapter/ of 'lora train')")
    m.add_argument("--out", required=True, help="new checkpoint folder")
    m.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the saved weights")
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
                           rank=args.rank or 16, targets=args.targets, samples=args.seed_samples,
                           cutoff_len=args.cutoff_len)


def _train(args: argparse.Namespace) -> int:
    from pktjax import lora as lora_mod
    from pktjax import sharding as S
    from pktjax.checkpoint import load_model
    from pktjax.data import read_jsonl
    from pktjax.lora_train import TrainConfig
    from pktjax.seeking import task_file
    from pktjax.tokenizer import load_tokenizer
    from pktjax.workflows import train_adapter

    method, path = _parse_init(args.init)
    mesh = S.as_mesh(args.mesh)
    out = Path(args.out).expanduser()
    student = load_model(args.student, mesh=mesh)
    tokenizer = load_tokenizer(args.student)
    teacher_lora = _teacher_lora(args, method, path, student, out)
    rank = args.rank or (lora_mod.rank_of(teacher_lora) if teacher_lora else 16)
    tc = TrainConfig(rank=rank, alpha=args.alpha, dropout=args.dropout, lr=args.lr, epochs=args.epochs,
                     batch_size=args.batch_size, micro_batch=args.micro_batch, cutoff_len=args.cutoff_len,
                     dtype=args.dtype, seed=args.seed, save_every=args.save_every)
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
