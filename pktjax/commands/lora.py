"""``pktjax lora train`` (LoRA students: standard, PiSSA or Seeking init, SPEC §4) and ``pktjax lora merge``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from pktjax.commands.seeking import add_targets_argument

    p = sub.add_parser("lora", help="LoRA students: train (default / PiSSA / Seeking init), merge into a checkpoint")
    lora = p.add_subparsers(dest="lora_command", required=True)
    t = lora.add_parser("train", help="fine-tune a LoRA on a task (resumes when --out holds checkpoints)")
    t.add_argument("--student", required=True, help="student checkpoint folder or .gguf")
    t.add_argument("--init", default="default",
                   help="default | pissa | seeking (extract from --teacher) | seeking:PATH (an extracted adapter)")
    t.add_argument("--teacher", help="teacher checkpoint for --init seeking without a PATH")
    t.add_argument("--task", required=True, help="gsm | mmlu | super_ni | lima (the shipped 1000 examples) or a JSONL")
    t.add_argument("--out", required=True, help="output folder: adapter/, checkpoints/, metrics.jsonl")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--micro-batch", type=int, default=8, help="examples per compiled forward/backward")
    t.add_argument("--rank", type=int, default=None, help="LoRA rank (default 16, or the extracted adapter's)")
    t.add_argument("--alpha", type=float, default=16.0)
    t.add_argument("--dropout", type=float, default=0.05)
    add_targets_argument(t)
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of the base")
    t.add_argument("--seed", type=int, default=1)
    t.add_argument("--cutoff-len", type=int, default=2048)
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
    """The Seeking factors: read from ``path``, from a previous run's ``out/extracted``, or extracted now."""
    from pktjax.commands.seeking import extract_to
    from pktjax.errors import ConfigError
    from pktjax.lora import import_peft

    if method != "seeking":
        return None
    cached = out / "extracted"
    if path is None and not cached.is_dir():
        if not args.teacher:
            raise ConfigError("--init seeking needs --teacher (or seeking:PATH with an extracted adapter).")
        extract_to(args.teacher, args.student, student.config, args.task, cached, rank=args.rank or 16,
                   targets=args.targets, samples=args.seed_samples, cutoff_len=args.cutoff_len)
    return import_peft(path or cached, student.config)[0]


def _train(args: argparse.Namespace) -> int:
    import jax

    from pktjax import lora as lora_mod
    from pktjax import sharding as S
    from pktjax.checkpoint import load_model
    from pktjax.data import read_jsonl, tokenize_seeking
    from pktjax.lora_train import TrainConfig, train
    from pktjax.seeking import task_file
    from pktjax.tokenizer import load_tokenizer

    method, path = _parse_init(args.init)
    mesh = S.as_mesh(args.mesh)
    out = Path(args.out).expanduser()
    student = load_model(args.student, mesh=mesh)
    tokenizer = load_tokenizer(args.student)
    teacher_lora = _teacher_lora(args, method, path, student, out)
    targets = args.targets or (lora_mod.targets_of(teacher_lora) if teacher_lora else lora_mod.TARGETS)
    rank = args.rank or (lora_mod.rank_of(teacher_lora) if teacher_lora else 16)
    base, lora0 = lora_mod.init(student.params, student.config, rank, args.alpha, targets, method,
                                key=jax.random.key(args.seed), teacher_lora=teacher_lora)
    items = [tokenize_seeking(tokenizer, ex, args.cutoff_len)
             for ex in read_jsonl(task_file(args.task, "train"), limit=args.limit)]
    tc = TrainConfig(rank=rank, alpha=args.alpha, dropout=args.dropout, lr=args.lr, epochs=args.epochs,
                     batch_size=args.batch_size, micro_batch=args.micro_batch, cutoff_len=args.cutoff_len,
                     dtype=args.dtype, seed=args.seed, save_every=args.save_every)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    trained = train(base, student.config, lora0, items, out, tc, pad_id=pad, progress=not args.no_progress,
                    mesh=mesh)
    trained, lora0 = S.to_host((trained, lora0))  # gathered on every process; process 0 writes the adapter
    if S.is_main_process():
        adapter = lora_mod.export_peft(trained, student.config, out / "adapter", alpha=args.alpha,
                                       dropout=args.dropout, initial=None if method == "default" else lora0,
                                       base_model=str(args.student), overwrite=True)
        print(f"adapter for {args.student} in {adapter}; metrics in {out / 'metrics.jsonl'}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from pktjax.checkpoint import Model, load_model, save_model
    from pktjax.lora import import_peft, merge_model

    student = load_model(args.student)
    lora, scale = import_peft(args.adapter, student.config)
    merged = merge_model(student, lora, scale)
    dtype = getattr(jnp, args.dtype)
    merged = Model(params=jax.tree.map(lambda x: x.astype(dtype), merged.params), config=merged.config,
                   source=merged.source)
    print(f"merged checkpoint in {save_model(merged, args.out)}")
    return 0
