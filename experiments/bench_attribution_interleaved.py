"""Batched against per-example attribution, timed interleaved in one process (process CPU seconds).

On a shared host the load changes from one minute to the next, so timing one route after the other can move their
ratio by more than the difference being measured. This script warms every call up, then times them in rounds
(per-example route, then each batched call in turn, once per round) and reports each call's median CPU seconds and
the batched route's CPU seconds per example as a fraction of the per-example route's. ``--baseline FILE`` adds
the batched route of another version of ``pktjax/attribution.py`` (e.g. ``git show <commit>:pktjax/attribution.py
> /tmp/attribution_before.py``), loaded under another name beside the current one, so before and after are timed
in the same rounds. Random models of ``experiments/bench_attribution.py``'s shapes, mode ``reference``.

    .venv/bin/python experiments/bench_attribution_interleaved.py --model teacher --layers 2 --examples 1,4,16 \\
        --rounds 3 --baseline /tmp/attribution_before.py
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_attribution import SIZES, VOCAB, make_config, random_params  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tenth")
    p.add_argument("--model", choices=("teacher", "student"), default="teacher")
    p.add_argument("--layers", type=int, default=None, help="layer count (default: the size's)")
    p.add_argument("--examples", default="1,4,16", help="comma-separated batch sizes E")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--baseline", default=None, help="another version's pktjax/attribution.py to time beside")
    args = p.parse_args(argv)
    current = importlib.import_module("pktjax.attribution")
    routes = {"after": current}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("attribution_baseline", args.baseline)
        baseline = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(baseline)
        routes = {"before": baseline, "after": current}
    hidden, ffn, layers, heads = SIZES[args.size][args.model]
    cfg = make_config(hidden, ffn, args.layers or layers, heads)
    params = random_params(cfg, jax.random.key(0), jnp.float32)
    sizes = [int(x) for x in args.examples.split(",")]
    ids = jax.random.randint(jax.random.key(1), (max(sizes), args.seq_len), 3, VOCAB)
    targets = jax.random.randint(jax.random.key(2), (max(sizes),), 3, VOCAB)
    calls = {("per-example", 1): lambda: current._per_example(params, cfg, ids[0], int(targets[0]))}
    for e in sizes:
        for name, module in routes.items():
            calls[(name, e)] = lambda m=module, e=e: m.attribution_batch(params, cfg, ids[:e], targets[:e])
    for fn in calls.values():
        jax.block_until_ready(fn())
    cpu = {key: [] for key in calls}
    for _ in range(args.rounds):
        for key, fn in calls.items():
            c0 = time.process_time()
            jax.block_until_ready(fn())
            cpu[key].append(time.process_time() - c0)
    print(f"{args.model} at {args.size}: L={cfg.num_layers} d={cfg.d} f={cfg.f} V={VOCAB} T={args.seq_len}, "
          f"{args.rounds} interleaved rounds, process CPU seconds (median)")
    single = statistics.median(cpu[("per-example", 1)])
    for (name, e), values in cpu.items():
        med = statistics.median(values)
        print(f"  {name:11s} E={e:3d}: {med:8.3f} s/call, {med / e:7.3f} s/example = {med / e / single:.3f} of the "
              f"per-example route (min {min(values):.3f} s/call)", flush=True)


if __name__ == "__main__":
    main()
