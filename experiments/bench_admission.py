"""One admission into the decode slots on a real model: a prompt's plain prefill against a prefill that checks a
draft (:func:`pktjax.generate.generate`'s ``drafts``), and the two parts of the latter, the prefill over prompt
and draft and the check of the draft (the argmax and its margin at every drafted position). The check is timed
twice in the same run: as the decoder does it (two reductions per position) and with ``lax.top_k``, which it used
before (a sort over the vocabulary on CPU).

    .venv/bin/python experiments/bench_admission.py --gguf ~/.cache/pktjax/qwen2.5-coder-0.5b-instruct-q4.gguf

Random prompt tokens, 16 decode slots, greedy; every program runs once to compile, then ``--reps`` times (the
best is printed, in milliseconds).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

SHAPES = [(1, 320, 0), (1, 512, 192), (4, 512, 192), (1, 1024, 448)]  # rows, prompt (+ draft) bucket, draft


def _best_ms(fn, reps: int) -> float:
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best * 1000


def _top2_sorted(params, cfg, x):
    """The check as ``lax.top_k(logits, 2)``, 16 positions at a time (the decoder's form before)."""
    from pktjax.model import unembed

    n, w, d = x.shape
    chunks = x.reshape(n, w // 16, 16, d).transpose(1, 0, 2, 3)

    def one(xc):
        values, index = jax.lax.top_k(unembed(params, cfg, xc), 2)
        return index[..., 0].astype(jnp.int32), values[..., 0] - values[..., 1]

    best, margin = jax.lax.map(one, chunks)
    return best.transpose(1, 0, 2).reshape(n, w), margin.transpose(1, 0, 2).reshape(n, w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, required=True, help="a real model (GGUF or checkpoint folder)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import pktjax
    from pktjax.cli import enable_compilation_cache
    from pktjax.model import init_cache

    enable_compilation_cache()
    G = importlib.import_module("pktjax.generate")  # the module (pktjax.generate is also the function's name)
    model = pktjax.load_model(args.gguf.expanduser())
    cfg, params = model.config, model.params
    eos, pad = G._eos_array(tuple(cfg.eos_ids)), jnp.int32(0)
    prefill = jax.jit(G._prefill, static_argnames=("cfg",))
    check = jax.jit(G._top2, static_argnames=("cfg",))
    check_sorted = jax.jit(_top2_sorted, static_argnames=("cfg",))
    rng = np.random.RandomState(0)
    print(f"{args.gguf.name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    for n, p, drafted in SHAPES:
        ids = jnp.asarray(rng.randint(1000, 20000, size=(n, p)), jnp.int32)
        mask, pos = jnp.ones((n, p), jnp.int32), jnp.broadcast_to(jnp.arange(p), (n, p))
        state = G._empty_slots(cfg, 16, p + 512, 512, jnp.float32, 0)
        slots = jnp.arange(n, dtype=jnp.int32)
        fresh = lambda: jax.tree.map(jnp.copy, state)  # noqa: E731  (the admission donates the state)
        if not drafted:
            ms = _best_ms(lambda: G._admit(params, cfg, fresh(), jax.random.key(0), ids, mask, slots, slots,
                                           jnp.int32(512), eos, pad, jnp.float32(1e-6), top_k=0, sample=False),
                          args.reps)
            print(f"plain admission  n={n} P={p}: {ms:.0f} ms", flush=True)
            continue
        window = G.round_length(drafted + 1)
        ms = _best_ms(lambda: G._admit_drafts(params, cfg, fresh(), ids, mask, slots, slots,
                                              jnp.full((n,), drafted, jnp.int32), jnp.float32(G.DRAFT_MARGIN),
                                              jnp.int32(512), eos, pad, window=window), args.reps)
        x, _ = prefill(params, cfg, ids, pos, mask, init_cache(cfg, n, p, jnp.float32))
        parts = {"prefill": _best_ms(lambda: prefill(params, cfg, ids, pos, mask,
                                                     init_cache(cfg, n, p, jnp.float32))[0], args.reps),
                 "check": _best_ms(lambda: check(params, cfg, x[:, p - window:]), args.reps),
                 "check with top_k": _best_ms(lambda: check_sorted(params, cfg, x[:, p - window:]), args.reps)}
        print(f"draft admission  n={n} P={p} draft={drafted} window={window}: {ms:.0f} ms; "
              + ", ".join(f"{k} {v:.0f} ms" for k, v in parts.items())
              + f" (top_k / reductions {parts['check with top_k'] / parts['check']:.1f}x)", flush=True)


if __name__ == "__main__":
    main()
