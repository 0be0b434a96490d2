"""The ``pktjax`` command line. Each module of :mod:`pktjax.commands` adds its sub-commands with
``register(subparsers)``; a sub-command's handler is ``args.func(args) -> int``.

Launched as one of several processes (a TPU pod slice, SLURM, Open MPI, or ``JAX_COORDINATOR_ADDRESS`` with
``JAX_NUM_PROCESSES > 1``), :func:`main` first joins them with ``jax.distributed.initialize()``; a plain single
process skips that (:func:`pktjax.sharding.initialize_distributed`)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from pktjax.errors import PktjaxError


def build_parser() -> argparse.ArgumentParser:
    import pktjax.commands as commands

    parser = argparse.ArgumentParser(prog="pktjax", description="Cross-scale parametric knowledge transfer in JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"pktjax.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pktjax.sharding import initialize_distributed

    initialize_distributed()  # before any jax call touches the devices; a no-op in a single plain process
    try:
        return int(args.func(args) or 0)
    except PktjaxError as e:
        print(f"pktjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
