"""The ``pktjax`` command line. Each module of :mod:`pktjax.commands` adds its sub-commands with
``register(subparsers)``; a sub-command's handler is ``args.func(args) -> int``."""

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
    try:
        return int(args.func(args) or 0)
    except PktjaxError as e:
        print(f"pktjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
