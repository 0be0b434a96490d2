"""``pktjax transfer CONFIG``: the main job (evaluate the pair, run LaTen, evaluate every result, report)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transfer", help="run a whole transfer experiment from one YAML/JSON config")
    p.add_argument("config", help="config file, e.g. experiments/configs/demo.yaml")
    p.add_argument("--out", help="output folder (default: the config's `out`); rerun to resume")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pktjax.transfer import read_config, run_transfer

    report = run_transfer(read_config(args.config, args.out))
    print(report.read_text())
    print(f"report: {report}")
    return 0
