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


def _cpu_sync_dispatch() -> None:
    """Run CPU computations as they are dispatched, unless ``JAX_CPU_ENABLE_ASYNC_DISPATCH`` says otherwise.

    A long ``pktjax transfer`` on the CPU once stopped for good inside JAX's CPU asynchronous dispatch (every
    thread idle, the main one waiting for a buffer that never became ready; cf. jax-ml/jax#25861). The CPU gains
    little from dispatching ahead, so the command line turns it off; accelerators are not affected."""
    import os

    import jax

    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ:
        jax.config.update("jax_cpu_enable_async_dispatch", False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _cpu_sync_dispatch()
    from pktjax.sharding import initialize_distributed

    initialize_distributed()  # before any jax call touches the devices; a no-op in a single plain process
    try:
        return int(args.func(args) or 0)
    except PktjaxError as e:
        print(f"pktjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
