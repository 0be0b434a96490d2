"""``pktjax laten train`` (train the aligner, SPEC §3.6) and ``pktjax laten fuse`` (write the fused student, §3.7).

Splits default to the shipped ``laten/<task>/<task>_<split>_split.jsonl``; any JSONL path may be passed instead.
``--cache DIR`` keeps the located attribution scores (:mod:`pktjax.attribution_cache`, one subfolder per model) so
that later calls on the same models and examples read them back; each call prints how many it read.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Iterator

from pktjax.commands import task_argument
from pktjax.settings import AlignerTrainConfig, DeviceSettings, TrackingSettings, add_arguments, from_args

TASKS = ("gsm", "mmlu", "humaneval", "mbpp")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("laten", help="LaTen (locate, then align): train the aligner, fuse the student")
    laten = p.add_subparsers(dest="laten_command", required=True)
    _train_parser(laten.add_parser("train", help="train the aligner hypernetworks (one checkpoint per step)"))
    _fuse_parser(laten.add_parser("fuse", help="inject aligned teacher knowledge into the student and save it"))


def _common(p: argparse.ArgumentParser, cache_default: str) -> None:
    p.add_argument("--teacher", required=True, help="teacher checkpoint folder or .gguf (the larger model)")
    p.add_argument("--student", required=True, help="student checkpoint folder or .gguf")
    task_argument(p, "data", required=True, choices=TASKS, help="task whose LaTen splits are used by default "
                  "(gsm8k is gsm)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="folder of located attribution scores, shared by calls on the same models (its teacher/ and "
                        "student/ subfolders; scores of other weights are refused)" + cache_default)
    add_arguments(p, DeviceSettings, ("mesh",))


def _train_parser(p: argparse.ArgumentParser) -> None:
    _common(p, " (default: OUT/attribution_cache)")
    p.add_argument("--extract", help="extract split JSONL (default: the task's)")
    p.add_argument("--align", help="align split JSONL (default: the task's)")
    add_arguments(p, AlignerTrainConfig, train_on_inputs={
        "default": None, "help": "loss on prompt tokens too (default: yes for mmlu, no otherwise)"})
    add_arguments(p, TrackingSettings)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_train)


def _fuse_parser(p: argparse.ArgumentParser) -> None:
    _common(p, " (default: none, the example is located again)")
    p.add_argument("--aligner", required=True, help="output folder of 'pktjax laten train'")
    p.add_argument("--step", type=int, required=True,
                   help="which saved aligner to apply: step t is the aligner after t + 1 updates")
    p.add_argument("--train", help="train split JSONL to locate on (default: the task's)")
    # the fuse repeats the training run's choices unless told otherwise
    add_arguments(p, AlignerTrainConfig, ("rate", "seed", "modules", "mode", "attention", "layers", "dtype"),
                  mode={"default": None}, attention={"default": None},
                  layers={"help": "K, the layers transferred into (default: the training run's)"},
                  dtype={"default": None, "help": "storage dtype of the teacher's and student's weights and of the "
                                                  "saved student (default: the training run's)"})
    p.set_defaults(func=_fuse)


def _split(args: argparse.Namespace, name: str):
    from pktjax.data import laten_split

    return getattr(args, name) or laten_split(args.task, name)


@contextlib.contextmanager
def _cache_report() -> Iterator[None]:
    """Tally the attribution cache's reads (the records :func:`pktjax.attribution.locate_each` logs) during the
    block, then print one line: how many examples each model's scores came from the cache for."""
    counts: dict[str, list[int]] = {}

    class Tally(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "cache_read"):
                c = counts.setdefault(record.cache_folder, [0, 0])
                c[0] += record.cache_read
                c[1] += record.cache_total

    logger, handler = logging.getLogger("pktjax.attribution"), Tally(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    if counts:
        from pathlib import Path

        from pktjax.sharding import main_print

        parts = [f"{read} of {total} for the {Path(folder).name}" for folder, (read, total) in counts.items()]
        main_print(f"attribution scores read from the cache {Path(next(iter(counts))).parent}: "
                   f"{', '.join(parts)} (examples; the rest located and stored)")


def _train(args: argparse.Namespace) -> int:
    from pktjax.settings import as_dict
    from pktjax.sharding import main_print
    from pktjax.tracking import open_tracker
    from pktjax.train_aligner import train_aligner

    train_on_inputs = args.task == "mmlu" if args.train_on_inputs is None else args.train_on_inputs
    config = from_args(AlignerTrainConfig, args, train_on_inputs=train_on_inputs)
    tracking = from_args(TrackingSettings, args)
    with _cache_report(), open_tracker(tracking.tracker, args.out, config=as_dict(config)) as tracker:
        train_aligner(args.teacher, args.student, _split(args, "extract"), _split(args, "align"), args.out, config,
                      progress=not args.no_progress, mesh=args.mesh, cache=args.cache, tracker=tracker)
    main_print(f"aligner checkpoints in {args.out}/aligner (one per step); metrics and injected delta sizes in "
               f"{args.out}/log.jsonl")
    return 0


def _fuse(args: argparse.Namespace) -> int:
    from pktjax.fuse import fuse

    with _cache_report():
        out = fuse(args.teacher, args.student, args.aligner, args.step, _split(args, "train"), args.out,
                   rate=args.rate, seed=args.seed, modules=args.modules, mode=args.mode, attention=args.attention,
                   layers=args.layers, cache=args.cache, dtype=args.dtype, mesh=args.mesh)
    from pktjax.fuse import INJECTION
    from pktjax.runfolder import read_json

    size = read_json(out / INJECTION, "injection record")["delta"]["all"]
    print(f"fused student saved to {out}; injected deltas: RMS {size['rms']:.3g}, {size['relative']:.3g} of the "
          f"RMS of the weights they change (per module: {out / INJECTION})")
    return 0
