"""``pktjax inspect``: load a checkpoint and print its config and size."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print a checkpoint's config and parameter count")
    p.add_argument("model", help="checkpoint folder or .gguf file")
    p.set_defaults(func=_inspect)


def _inspect(args: argparse.Namespace) -> int:
    import jax

    from pktjax.checkpoint import load_model

    model = load_model(args.model)
    n = sum(x.size for x in jax.tree.leaves(model.params))
    print(model.config)
    print(f"parameters: {n:,}")
    return 0
