"""``pktjax semalign train``: SemAlign (knowledge moved through layer outputs) from a teacher into one student layer."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from pktjax.settings import COMPARES, FRAMES, SEMALIGN_MODES, SEMALIGN_TARGETS

    p = sub.add_parser("semalign", help="SemAlign: align one student layer with the teacher's recomposed outputs")
    sem = p.add_subparsers(dest="semalign_command", required=True)
    t = sem.add_parser("train", help="attribution, pairing, recomposed targets, training of the paired layer "
                                     "(resumes when --out holds checkpoints)")
    t.add_argument("--teacher", required=True, help="teacher checkpoint folder or .gguf (the larger model)")
    t.add_argument("--student", required=True, help="student checkpoint folder or .gguf (same vocabulary)")
    t.add_argument("--task", required=True, help="training data: gsm | mmlu | humaneval | mbpp (the LaTen train "
                   "split), super_ni | lima (the Seeking 1000 examples) or a JSONL file")
    t.add_argument("--out", required=True, help="output folder: plan.json, adapter/ or model/, checkpoints/, "
                   "metrics.jsonl, semalign.json")
    t.add_argument("--mode", choices=SEMALIGN_MODES, default="lora", help="train a LoRA on the layer or its weights")
    t.add_argument("--compare", choices=COMPARES, default="ffn",
                   help="layer output compared: ffn (pre-residual MLP output), update (attention + MLP) or "
                        "residual (the layer's residual output)")
    t.add_argument("--frame", choices=FRAMES, default="paper", help="recomposition: the paper's S_S a, or the "
                   "dual frame (exact when the heads are equal)")
    t.add_argument("--layer", type=int, default=None, help="student layer to train (from 1) instead of the pairing's")
    t.add_argument("--targets", nargs="+", default=list(SEMALIGN_TARGETS), help="matrices of the layer to train")
    t.add_argument("--epochs", type=int, default=5, help="passes over the training data")
    t.add_argument("--lr", type=float, default=None, help="default 3e-4 (3e-5 for humaneval), as in the paper")
    t.add_argument("--batch-size", type=int, default=64, help="examples per optimizer step")
    t.add_argument("--micro-batch", type=int, default=8, help="examples per forward pass (gradient accumulation)")
    t.add_argument("--rank", type=int, default=16, help="LoRA rank (mode lora)")
    t.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (mode lora)")
    t.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (mode lora)")
    t.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype of the student")
    t.add_argument("--teacher-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the teacher's weights")
    t.add_argument("--seed", type=int, default=1, help="PRNG seed of the LoRA init and data order")
    t.add_argument("--cutoff-len", type=int, default=2048, help="tokens kept per training example")
    t.add_argument("--limit", type=int, default=None, help="read at most this many training examples")
    t.add_argument("--seed-data", default=None, help="attribution examples (default: the task's Seeking samples, "
                   "else the first --seed-samples training examples)")
    t.add_argument("--seed-samples", type=int, default=32, help="attribution examples used")
    t.add_argument("--cka", type=int, default=0, metavar="N", help="also plot the before / after CKA of the trained "
                   "layer with every teacher layer on the first N training examples (alignment_cka.png)")
    t.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    t.add_argument("--mesh", default=None, help="device mesh, e.g. 'fsdp=8' (default: one device)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from pktjax import sharding as S
    from pktjax.checkpoint import read_model_config
    from pktjax.data import LATEN_TASKS, laten_split, read_jsonl
    from pktjax.errors import ConfigError
    from pktjax.lora_train import TrainConfig
    from pktjax.seeking import task_file
    from pktjax.semalign import SemAlignConfig, default_lr
    from pktjax.workflows import check_semalign_pair, seed_examples, train_semalign

    tc = TrainConfig(rank=args.rank, alpha=args.alpha, dropout=args.dropout, lr=args.lr or default_lr(args.task),
                     epochs=args.epochs, batch_size=args.batch_size, micro_batch=args.micro_batch,
                     cutoff_len=args.cutoff_len, dtype=args.dtype, seed=args.seed, save_every=args.save_every)
    tc.validate()
    if args.rank < 1 or (args.limit is not None and args.limit < 1) or args.cka < 0:
        raise ConfigError("--rank and --limit must be at least 1, --cka at least 0.")
    sc = SemAlignConfig(mode=args.mode, targets=tuple(args.targets), compare=args.compare, frame=args.frame,
                        layer=args.layer, samples=args.seed_samples)
    check_semalign_pair(read_model_config(args.teacher), read_model_config(args.student), sc)
    data = laten_split(args.task, "train") if args.task in LATEN_TASKS else task_file(args.task, "train")
    examples = read_jsonl(data, limit=args.limit)
    seeds = seed_examples(args.seed_data or args.task, args.seed_samples)
    _, info = train_semalign(args.teacher, args.student, seeds, examples, Path(args.out), tc, sc,
                             teacher_dtype=args.teacher_dtype, progress=not args.no_progress, mesh=S.as_mesh(args.mesh),
                             probe=examples[:args.cka])
    p = info["pairing"]
    S.main_print(f"critical teacher layer {p['critical']} -> student layer {p['student_layer']} (teacher "
                 f"{p['a']}/{p['b']}, lambda {p['lam']:.3f}); output in {info.get('adapter') or info.get('model')}")
    return 0
