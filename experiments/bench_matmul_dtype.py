"""float32 against bfloat16 products on this CPU, side by side in one process, alternating.

``products``: 48 products ``[16, 896] x [4864, 896]^T`` (the student's gate / up projections at 16 decode slots)
with float32 operands, with bfloat16 operands summed in float32, and with bfloat16 weights converted to float32
first. ``generate``: the real student decoding 16 random 320-token prompts (48 new tokens, 16 slots) with
``matmul_dtype`` float32 and bfloat16 (prefill seconds, decode milliseconds per step, equal tokens).

    .venv/bin/python experiments/bench_matmul_dtype.py products
    .venv/bin/python experiments/bench_matmul_dtype.py generate --gguf ~/.cache/pktjax/qwen2.5-coder-0.5b-instruct-q4.gguf
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


def _best_ms(fns: dict, reps: int = 6) -> dict:
    for fn in fns.values():
        jax.block_until_ready(fn())
    times: dict = {name: [] for name in fns}
    for _ in range(reps):  # alternate, so every variant sees the same machine load
        for name, fn in fns.items():
            t = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append((time.perf_counter() - t) * 1000)
    return {name: round(min(v), 1) for name, v in times.items()}


def products() -> None:
    d, f, n = 896, 4864, 48
    ws = [jax.random.normal(jax.random.key(i), (f, d)) * 0.02 for i in range(n)]
    wb = [w.astype(jnp.bfloat16) for w in ws]
    x = jnp.ones((16, d)) * 0.1
    hi = jax.lax.Precision.HIGHEST
    f32 = jax.jit(lambda x, W: sum(jnp.einsum("bi,oi->bo", x, w, precision=hi) for w in W))
    b16 = jax.jit(lambda x, W: sum(jnp.einsum("bi,oi->bo", x.astype(jnp.bfloat16), w,
                                              preferred_element_type=jnp.float32) for w in W))
    up = jax.jit(lambda x, W: sum(jnp.einsum("bi,oi->bo", x, w.astype(jnp.float32), precision=hi) for w in W))
    print({"ms for 48 products": _best_ms({"float32": lambda: f32(x, ws), "bfloat16, float32 sums": lambda: b16(x, wb),
                                           "bfloat16 converted first": lambda: up(x, wb)})})


def generate(gguf: Path) -> None:
    import pktjax
    from pktjax.generate import generate as gen

    m = pktjax.load_model(gguf.expanduser())
    ids = np.random.RandomState(0).randint(1000, 20000, size=(16, 320)).astype(np.int32)
    res, toks = {}, {}
    for name in ("float32", "bfloat16"):
        gen(m.params, m.config, ids, np.ones_like(ids), 48, eos_ids=(), pad_id=0, slots=16, matmul_dtype=name)
    for _ in range(2):
        for name in ("float32", "bfloat16"):
            st: dict = {}
            out = gen(m.params, m.config, ids, np.ones_like(ids), 48, eos_ids=(), pad_id=0, slots=16, stats=st,
                      matmul_dtype=name)
            res.setdefault(name, []).append((round(st["prefill_s"], 2),
                                             round(st["decode_s"] / st["decode_steps"] * 1000)))
            toks[name] = np.asarray(out.tokens)
    print({"(prefill s, decode ms/step)": res, "equal tokens": float((toks["float32"] == toks["bfloat16"]).mean())})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("products", "generate"))
    ap.add_argument("--gguf", type=Path, help="generate: a real model (GGUF, dequantized to float32)")
    args = ap.parse_args()
    if args.what == "generate" and args.gguf is None:
        ap.error("generate needs --gguf")
    products() if args.what == "products" else generate(args.gguf)


if __name__ == "__main__":
    main()
