"""``pktjax laten train`` (train the aligner, SPEC §3.6) and ``pktjax laten fuse`` (write the fused student, §3.7).

Splits default to the shipped ``laten/<task>/<task>_<split>_split.jsonl``; any JSONL path may be passed instead.
"""

from __future__ import annotations

import argparse

from pktjax.commands import list_argument, task_argument

TASKS = ("gsm", "mmlu", "humaneval", "mbpp")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("laten", help="LaTen (locate, then align): train the aligner, fuse the student")
    laten = p.add_subparsers(dest="laten_command", required=True)
    _train_parser(laten.add_parser("train", help="train the aligner hypernetworks (one checkpoint per step)"))
    _fuse_parser(laten.add_parser("fuse", help="inject aligned teacher knowledge into the student and save it"))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder or .gguf (the larger model)")
    p.add_argument("--student", required=True, help="student checkpoint folder or .gguf")
    task_argument(p, "data", required=True, choices=TASKS, help="task whose LaTen splits are used by default "
                  "(gsm8k is gsm)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--rate", type=float, default=0.1, help="fraction of neurons per layer to transfer (0, 1]")
    p.add_argument("--seed", type=int, default=42,
                   help="train: the example order and the aligner's init; fuse: the example located on")
    list_argument(p, "--modules", default=None,
                  help="subset of up_proj down_proj v_proj o_proj (default: all four, or "
                       "without v_proj for grouped-query attention)")
    p.add_argument("--mode", choices=("reference", "rmsnorm"), default=None, help="attribution normalisation")
    p.add_argument("--attention", choices=("last_key", "all_keys"), default=None, help="attention-neuron values")
    p.add_argument("--layers", type=int, default=None,
                   help="K, the layers transferred into (default: every student layer; the fuse defaults to the "
                        "training run's); neurons are scored only in each model's top K layers, so a small K "
                        "makes locating about K/L as costly")


def _train_parser(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--extract", help="extract split JSONL (default: the task's)")
    p.add_argument("--align", help="align split JSONL (default: the task's)")
    p.add_argument("--lr", type=float, default=3e-5, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--steps", type=int, default=None,
                   help="stop after this many steps (default: all, one per extract example); the one-cycle "
                        "schedule spans the whole extract split either way, and a later run with more steps on "
                        "the same --out continues this one")
    p.add_argument("--examples-per-step", type=int, default=16, help="P: examples in each step's loss")
    p.add_argument("--mse-weight", type=float, default=1000.0, help="lambda of the delta-size penalty")
    p.add_argument("--cutoff-len", type=int, default=768, help="tokens per example at most")
    p.add_argument("--train-on-inputs", action=argparse.BooleanOptionalAction, default=None,
                   help="loss on prompt tokens too (default: yes for mmlu, no otherwise)")
    p.add_argument("--micro-batch", type=int, default=4, help="examples per compiled forward/backward")
    p.add_argument("--bucket", type=int, default=64, help="sequence lengths round up to a multiple of this")
    p.add_argument("--mesh", default=None, help="device mesh to shard over, e.g. 'fsdp=8' or "
                   "'data=2,fsdp=2,tensor=2' (its sizes multiply to the device count; default: one device)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _fuse_parser(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--aligner", required=True, help="output folder of 'pktjax laten train'")
    p.add_argument("--step", type=int, required=True,
                   help="which saved aligner to apply: step t is the aligner after t + 1 updates")
    p.add_argument("--train", help="train split JSONL to locate on (default: the task's)")
    p.set_defaults(func=_fuse)


def _split(args: argparse.Namespace, name: str):
    from pktjax.data import laten_split

    return getattr(args, name) or laten_split(args.task, name)


def _train(args: argparse.Namespace) -> int:
    from pktjax.sharding import main_print
    from pktjax.train_aligner import TrainConfig, train_aligner

    train_on_inputs = args.task == "mmlu" if args.train_on_inputs is None else args.train_on_inputs
    config = TrainConfig(lr=args.lr, rate=args.rate, steps=args.steps, examples_per_step=args.examples_per_step,
                         mse_weight=args.mse_weight, cutoff_len=args.cutoff_len, train_on_inputs=train_on_inputs,
                         micro_batch=args.micro_batch, bucket=args.bucket, seed=args.seed, modules=args.modules,
                         mode=args.mode or "reference", attention=args.attention or "last_key",
                         layers=args.layers)
    train_aligner(args.teacher, args.student, _split(args, "extract"), _split(args, "align"), args.out, config,
                  progress=not args.no_progress, mesh=args.mesh)
    main_print(f"aligner checkpoints in {args.out}/aligner (one per step); metrics and injected delta sizes in "
               f"{args.out}/log.jsonl")
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from pktjax.fuse import fuse

    out = fuse(args.teacher, args.student, args.aligner, args.step, _split(args, "train"), args.out,
               rate=args.rate, seed=args.seed, modules=args.modules, mode=args.mode, attention=args.attention,
               layers=args.layers)
    import json

    from pktjax.fuse import INJECTION

    size = json.loads((out / INJECTION).read_text())["delta"]["all"]
    print(f"fused student saved to {out}; injected deltas: RMS {size['rms']:.3g}, {size['relative']:.3g} of the "
          f"RMS of the weights they change (per module: {out / INJECTION})")
    return 0
