"""The ``pktjax`` command line. Each module of :mod:`pktjax.commands` adds its sub-commands with
``register(subparsers)``; a sub-command's handler is ``args.func(args) -> int``.

Launched as one of several processes (a TPU pod slice, SLURM, Open MPI, or ``JAX_COORDINATOR_ADDRESS`` with
``JAX_NUM_PROCESSES > 1``), :func:`main` first joins them with ``jax.distributed.initialize()``; a plain single
process skips that (:func:`pktjax.sharding.initialize_distributed`). It also turns on JAX's persistent compilation
cache (:func:`enable_compilation_cache`)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import pktjax.commands as commands
from pktjax.errors import PktjaxError
from pktjax.runfolder import is_disk_full


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the text already speaks of it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)".lstrip()


class Parser(argparse.ArgumentParser):
    """An argument parser whose sub-command parsers (``add_subparsers`` makes them of this class) show
    defaults."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)


def version_line() -> str:
    from pktjax.provenance import git_commit, version

    git = git_commit()
    where = f" (commit {git['commit'][:12]}{', modified' if git['dirty'] else ''})" if git else ""
    return f"pktjax {version()}{where}"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pktjax", description="Cross-scale parametric knowledge transfer in JAX.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"pktjax.commands.{info.name}").register(sub)
    return parser


def enable_compilation_cache() -> str | None:
    """Keep compiled programs in ``$PKTJAX_HOME/jax-cache`` so that a new process does not compile them again
    (``PKTJAX_COMPILE_CACHE=0`` turns it off, ``PKTJAX_COMPILE_CACHE=/dir`` picks the folder). Returns the folder."""
    import os

    import jax

    from pktjax.registry import home

    setting = os.environ.get("PKTJAX_COMPILE_CACHE", "1").strip()
    if setting.lower() in ("0", "false", "no", "off"):
        return None
    folder = str(home() / "jax-cache") if setting.lower() in ("1", "true", "yes", "on", "") else setting
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # decode loops compile in seconds
    return folder


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "out", None) is not None:
        from pktjax.remote import check_url, is_url
        from pktjax.runfolder import check_local

        try:  # before anything starts: no process group, no model, no folder
            if getattr(args, "out_url", False) and is_url(args.out):
                check_url(args.out)
            else:
                check_local(args.out)
        except PktjaxError as e:
            print(f"pktjax: error: {e}", file=sys.stderr)
            return 2
    from pktjax.sharding import initialize_distributed  # loads jax: only once a command runs, not for --help

    initialize_distributed()  # before any jax call touches the devices; a no-op in a single plain process
    enable_compilation_cache()
    try:
        return int(args.func(args) or 0)
    except PktjaxError as e:
        print(f"pktjax: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not is_disk_full(e):
            raise
        print(f"pktjax: error: the disk is full ({type(e).__name__}: {str(e)[:300]}). Free some space, then rerun "
              "the same command: the run resumes where it stopped.", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
