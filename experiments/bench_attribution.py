"""Time LaTen's attribution (every layer and neuron score, SPEC §3.1) on random Llama-2 shaped models.

Shapes default to ~1/10 of Llama-2 13B (teacher) and 7B (student) in width with the real layer counts and the
real 32000-token vocabulary. For each model it prints the seconds of one attribution call (median after a
warm-up that compiles), the seconds of the bare vocabulary products alone (the same ``[chunk, d] x [d, V]``
blocks, each reduced by a sum: the floor any implementation of the method pays), the forward pass alone, and
the peak resident memory of the process (plus peak device memory where the backend reports it). On a CPU the
process CPU seconds are printed too (steadier than wall time on a shared host).

    .venv/bin/python experiments/bench_attribution.py                 # tenth sizes, float32, prompt of 128
    .venv/bin/python experiments/bench_attribution.py --size full     # real 13B/7B shapes (accelerator only)
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pktjax.attribution import attribution, matmul_flops  # noqa: E402
from pktjax.config import ModelConfig  # noqa: E402
from pktjax.model import forward  # noqa: E402

# (hidden, ffn, layers, heads) with head_dim 128, as in Llama-2
SIZES = {
    "tiny": {"teacher": (64, 176, 4, 4), "student": (48, 128, 3, 3)},  # rehearsals only
    "tenth": {"teacher": (512, 1384, 40, 4), "student": (384, 1104, 32, 3)},
    "full": {"teacher": (5120, 13824, 40, 40), "student": (4096, 11008, 32, 32)},
}
VOCAB = 32000


def make_config(hidden: int, ffn: int, layers: int, heads: int) -> ModelConfig:
    return ModelConfig(model_type="llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn,
                       num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                       rms_norm_eps=1e-5)


def random_params(cfg: ModelConfig, key: jax.Array, dtype) -> dict:
    """A random parameter pytree (std ``1/sqrt(fan_in)`` matrices, unit norms), built on the device."""
    d, f, n_l, q, kv = cfg.d, cfg.f, cfg.num_layers, cfg.q_dim, cfg.kv_dim
    shapes = {"q_proj": (n_l, q, d), "k_proj": (n_l, kv, d), "v_proj": (n_l, kv, d), "o_proj": (n_l, d, q),
              "gate_proj": (n_l, f, d), "up_proj": (n_l, f, d), "down_proj": (n_l, d, f)}
    keys = iter(jax.random.split(key, len(shapes) + 2))

    def mat(shape):
        return (jax.random.normal(next(keys), shape, jnp.float32) * shape[-1] ** -0.5).astype(dtype)

    layers = {name: mat(shape) for name, shape in shapes.items()}
    layers["input_norm"] = layers["post_attn_norm"] = jnp.ones((n_l, d), dtype)
    return {"embed": mat((VOCAB, d)), "lm_head": mat((VOCAB, d)), "final_norm": jnp.ones((d,), dtype),
            "layers": layers}


def vocab_floor(params: dict, chunk: int) -> jax.Array:
    """The products alone: every output column of down_proj and o_proj, in blocks of ``chunk``, times ``W_U``."""
    w_u = params["lm_head"]
    precision = jax.lax.Precision.HIGHEST if w_u.dtype == jnp.float32 else None

    def run(w_out):  # [L, d, n]
        n_l, d, n = w_out.shape
        c = min(chunk, n)
        blocks = -(-n // c)

        def block(i):
            start = jnp.minimum((i % blocks) * c, n - c)
            cols = jax.lax.dynamic_slice(w_out, (i // blocks, 0, start), (1, d, c))[0]
            z = jnp.einsum("dc,vd->cv", cols, w_u, precision=precision, preferred_element_type=jnp.float32)
            return z.sum(axis=1)

        return jax.lax.map(block, jnp.arange(n_l * blocks)).sum()

    return run(params["layers"]["down_proj"]) + run(params["layers"]["o_proj"])


def timed(fn, repeats: int) -> dict[str, float]:
    """Seconds of the first call (compile + run) and the median wall and process-CPU seconds of ``repeats``
    further calls (CPU seconds are the steadier figure on a shared host)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"first": first, "wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def peak_memory() -> str:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    out = f"peak RSS {rss:,.0f} MiB"
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out += f", peak device memory {stats['peak_bytes_in_use'] / 2**20:,.0f} MiB"
    return out


def bench(name: str, cfg: ModelConfig, args: argparse.Namespace) -> None:
    dtype = jnp.dtype(args.dtype)
    params = random_params(cfg, jax.random.key(args.seed), dtype)
    ids = jax.random.randint(jax.random.key(args.seed + 1), (1, args.seq_len), 3, VOCAB)
    target = 1234
    n_neurons = cfg.num_layers * (cfg.f + cfg.q_dim)
    print(f"{name}: d={cfg.d} f={cfg.f} L={cfg.num_layers} H={cfg.num_heads} hd={cfg.head_dim} V={VOCAB} "
          f"T={args.seq_len} neurons={n_neurons:,} chunk={args.chunk} dtype={args.dtype}", flush=True)
    flops = matmul_flops(cfg)
    fwd = jax.jit(lambda p, x: forward(p, cfg, x, capture=True)[1])
    floor = jax.jit(vocab_floor, static_argnums=1)
    runs = {
        "attribution": lambda: attribution(params, cfg, ids, target, mode=args.mode, attention=args.attention,
                                           chunk=args.chunk),
        "vocab products only": lambda: floor(params, args.chunk),
        "forward (capture) only": lambda: fwd(params, ids),
    }
    for label, fn in runs.items():
        t = timed(fn, args.repeats)
        rate = "" if label.startswith("forward") else f", {flops / t['wall'] / 1e9:,.0f} GFLOP/s of vocab products"
        print(f"  {label:24s} {t['wall']:8.3f} s/call, process CPU {t['cpu']:8.2f} s/call "
              f"(first call incl. compile {t['first']:7.2f} s){rate}", flush=True)
    print(f"  {peak_memory()}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tenth")
    p.add_argument("--models", default="teacher,student", help="comma-separated subset of teacher,student")
    p.add_argument("--seq-len", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--chunk", type=int, default=512, help="neurons per [chunk, d] x [d, V] block")
    p.add_argument("--dtype", default="float32", help="parameter dtype (float32 or bfloat16)")
    p.add_argument("--mode", default="reference", choices=("reference", "rmsnorm"))
    p.add_argument("--attention", default="last_key", choices=("last_key", "all_keys"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}, {len(jax.devices())} device(s), "
          f"{os.cpu_count()} CPUs")
    for name in args.models.split(","):
        bench(name, make_config(*SIZES[args.size][name]), args)


if __name__ == "__main__":
    main()
