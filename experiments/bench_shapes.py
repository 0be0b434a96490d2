"""The decoder's programs on a real model, one shape at a time: prefill throughput by group size and prompt
length, decode steps by slot count, and decode steps by attended window over a fixed cache.

    .venv/bin/python experiments/bench_shapes.py --gguf ~/.cache/pktjax/qwen2.5-coder-0.5b-instruct-q4.gguf prefill
    .venv/bin/python experiments/bench_shapes.py --gguf … decode   # 16 / 32 / 64 slots, 64-token prompts
    .venv/bin/python experiments/bench_shapes.py --gguf … window   # 16 slots, 1,536-position cache, 200 filled
    .venv/bin/python experiments/bench_shapes.py --gguf … --matmul-dtype bfloat16 --slots 16,32 decode

Random prompts, no EOS, greedy; every shape runs once to compile, then once timed (the persistent compilation cache
on, as for the CLI). Prints one line per shape.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _generate(model, n: int, p: int, new: int, slots: int, matmul_dtype=None) -> dict:
    """``generate``'s stats for ``n`` random prompts of ``p`` tokens, after a compiling run of the same shapes."""
    from pktjax.generate import generate

    ids = np.random.RandomState(0).randint(1000, 20000, size=(n, p)).astype(np.int32)
    kw = dict(eos_ids=(), pad_id=0, slots=slots, matmul_dtype=matmul_dtype)
    generate(model.params, model.config, ids, np.ones_like(ids), new, **kw)
    stats: dict = {}
    generate(model.params, model.config, ids, np.ones_like(ids), new, stats=stats, **kw)
    return stats


def prefill(model, args) -> None:
    for n, p in [(1, 320), (2, 320), (4, 320), (16, 320), (1, 832), (2, 832)]:
        st = _generate(model, n, p, 1, n, args.matmul_dtype)
        print(f"prefill n={n} P={p}: {st['prefill_s']:.2f} s, {n * p / st['prefill_s']:.0f} positions/s", flush=True)


def decode(model, args) -> None:
    for slots in args.slots:
        st = _generate(model, slots, 64, 64, slots, args.matmul_dtype)
        per = st["decode_s"] / st["decode_steps"]
        print(f"decode slots={slots} P=64 new=64: {st['decode_steps']} steps, {per * 1000:.0f} ms/step, "
              f"{slots / per:.1f} tokens/s", flush=True)


def window(model, args) -> None:
    from experiments.bench_decode_step import _state
    from pktjax.generate import _decode, _eos_array
    from pktjax.model import unstack_layers

    cfg, params = model.config, unstack_layers(model.params)
    consts = dict(eos=_eos_array(()), pad_id=jnp.int32(0), temperature=jnp.float32(1e-6), top_k=0, sample=False)
    key = jax.random.key(0)
    for w in (256, 512, 1024, 1536):
        st = jax.block_until_ready(_state(cfg, 16, 1536, 200, 512))
        st = _decode(params, cfg, st, key, st["n"] + 2, jnp.bool_(False), jnp.int32(512), **consts, window=w)
        jax.block_until_ready(st["done"])
        t = time.perf_counter()
        st = _decode(params, cfg, st, key, st["n"] + 16, jnp.bool_(False), jnp.int32(512), **consts, window=w)
        jax.block_until_ready(st["done"])
        print(f"window {w}: {(time.perf_counter() - t) / 16 * 1000:.0f} ms/step (16 slots, cache 1536, 200 filled)",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, required=True, help="a real model (GGUF, dequantized to float32)")
    ap.add_argument("what", choices=("prefill", "decode", "window"))
    ap.add_argument("--slots", default=(16, 32, 64), type=lambda v: tuple(int(x) for x in v.split(",")),
                    help="decode: slot counts, comma-separated")
    ap.add_argument("--matmul-dtype", choices=("float32", "bfloat16"),
                    help="prefill, decode: generate's matmul_dtype (window: float32 only)")
    args = ap.parse_args()
    if args.what == "window" and args.matmul_dtype == "bfloat16":
        ap.error("window runs the float32 decode program; drop --matmul-dtype")
    import pktjax
    from pktjax.cli import enable_compilation_cache

    enable_compilation_cache()
    {"prefill": prefill, "decode": decode, "window": window}[args.what](pktjax.load_model(args.gguf), args)


if __name__ == "__main__":
    main()
