"""``pktjax transfer CONFIG``: the main job (evaluate the pair, run LaTen, evaluate every result, report)."""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
from typing import Iterator

from pktjax.settings import DEFAULT_DTYPE, DeviceSettings, TrackingSettings, add_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transfer", help="run a whole transfer experiment from one YAML/JSON config")
    p.add_argument("config", help="config file, e.g. experiments/configs/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override a setting of the config, e.g. laten.lr=3e-4 eval.limit=50 (values read as YAML)")
    p.add_argument("--out", help="output folder or URL, e.g. gs://BUCKET/run (default: the config's `out`); rerun "
                                 "to resume")
    p.add_argument("--staging", help="with an output URL: the local folder the run is staged in and mirrored from "
                                     "(default: $PKTJAX_HOME/staging/<hash of the URL>)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every default filled in) and exit")
    # the config's top-level mesh and dtype, set from the command line (the same as mesh=... dtype=...)
    add_arguments(p, DeviceSettings, ("mesh", "dtype"), mesh={
        "help": "device mesh to shard over, e.g. 'fsdp=4,tensor=2' (default: the config's `mesh`, else one "
                "device); a run resumes on any mesh"}, dtype={
        "default": None, "help": f"storage dtype of the models' weights (default: the config's `dtype`, else "
                                 f"{DEFAULT_DTYPE})"})
    add_arguments(p, TrackingSettings, tracker={
        "default": None, "help": "also log training curves and scores to TensorBoard (OUT/tensorboard; needs "
                                 "tensorboardX) or W&B (needs wandb) (default: the config's `tracker`, else none)"})
    p.set_defaults(func=_run, out_url=True)  # --out may be a URL (pktjax.remote), checked by pktjax.cli.main


@contextlib.contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM (``timeout``, a scheduler's preemption, ``kill``) ends the run as Ctrl-C does:
    the stage in progress still records its seconds in ``timings.json``, then the process exits with 143."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _run(args: argparse.Namespace) -> int:
    from pktjax.runfolder import read_text
    from pktjax.sharding import is_main_process
    from pktjax.transfer import read_config, run_transfer

    flags = [f"{key}={getattr(args, key)}" for key in ("mesh", "dtype", "tracker") if getattr(args, key) is not None]
    cfg = read_config(args.config, args.out, [*args.overrides, *flags], staging=args.staging)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.resolved(), sort_keys=False), end="")
        return 0
    with exit_on_sigterm():
        report = run_transfer(cfg)
    if is_main_process():  # the process that wrote the report
        print(read_text(report, "report"))
        print(f"report: {report}" + (f" (uploaded to {cfg.remote}/{report.name})" if cfg.remote else ""))
    return 0
