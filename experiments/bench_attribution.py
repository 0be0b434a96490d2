"""Time LaTen's attribution (every layer and neuron score, SPEC §3.1) on random Llama-2 shaped models.

Shapes default to ~1/10 of Llama-2 13B (teacher) and 7B (student) in width with the real layer counts and the
real 32000-token vocabulary. For each model it prints the seconds of one attribution call (median after a
warm-up that compiles), the seconds of the bare vocabulary products alone (the same ``[chunk, d] x [d, V]``
blocks, each reduced by a sum: the floor any implementation of the method pays), the forward pass alone, and
the peak resident memory of the process (plus peak device memory where the backend reports it). On a CPU the
process CPU seconds are printed too (steadier than wall time on a shared host).

    .venv/bin/python experiments/bench_attribution.py                 # tenth sizes, float32, prompt of 128
    .venv/bin/python experiments/bench_attribution.py --size full     # real 13B/7B shapes (accelerator only)
    .venv/bin/python experiments/bench_attribution.py --examples 1,4,16   # batched against per-example route

With ``--examples E1,E2,...`` it times, for each batch size ``E``, the seconds per example of the batched route
(:func:`pktjax.attribution.attribution_batch` on ``E`` prompts) and of the per-example route (the same scores,
every vocabulary product paid again per example; timed once, it does not depend on ``E``), the batched route's
elementwise pass alone (its ``expm1`` and weighted sums over fixed ``[c, V]`` blocks, without the products), and
the floor of that pass: a plain ``expm1``-and-sum over the same number of floats, all in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pktjax.attribution import (_block_gain, _per_example, attribution, attribution_batch,  # noqa: E402
                                matmul_flops)
from pktjax.config import ModelConfig  # noqa: E402
from pktjax.model import forward_trace  # noqa: E402

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
    further calls (CPU seconds are the steadier figure on a shared host); ``repeats=0``: the first call's."""
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    if repeats == 0:
        return {"first": first, "wall": first, "cpu": time.process_time() - c0}
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
    fwd = jax.jit(lambda p, x: forward_trace(p, cfg, x)[1])
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


def _blocks(n: int, chunk: int) -> tuple[int, int]:
    """``(blocks, c)`` per layer as the attribution cuts ``n`` neurons (evenly sized blocks of at most ``chunk``)."""
    blocks = -(-n // chunk)
    return blocks, -(-n // blocks)


def elementwise_pass(cfg: ModelConfig, e: int, chunk: int, rms: bool):
    """The batched route's per-example work alone, over fixed blocks: for every block of every layer (FFN and
    attention neurons) ``_block_gain`` of ``E`` examples on a ``[c, V]`` block of ``M`` that is not recomputed."""
    key = jax.random.key(7)
    logp = jax.nn.log_softmax(jax.random.normal(key, (e, VOCAB)), axis=1)
    u = jax.random.normal(jax.random.key(8), (e, VOCAB)) if rms else None
    targets = jnp.arange(e, dtype=jnp.int32)
    shapes = [_blocks(n, chunk) for n in (cfg.f, cfg.q_dim)]
    m_blocks = [jax.random.normal(jax.random.key(9), (c, VOCAB)) * 0.01 for _, c in shapes]
    spread = jax.random.uniform(jax.random.key(10), (e, max(c for _, c in shapes)), minval=0.5, maxval=1.5)

    @jax.jit
    def run(logp, u, m_blocks):
        total = 0.0
        for (blocks, c), m in zip(shapes, m_blocks):
            def one(i):
                # varies with the example and the neuron, as the route's coefficients do (a constant would let
                # the compiler form expm1 once for all examples)
                b = (1.0 + 1e-3 * i.astype(jnp.float32)) * spread[:e, :c]
                a = None if u is None else 1e-3 * b
                return _block_gain(m, a, b, u, logp, targets).sum()
            total = total + jax.lax.map(one, jnp.arange(cfg.num_layers * blocks)).sum()
        return total

    return lambda: run(logp, u, m_blocks)


def expm1_floor(cfg: ModelConfig, e: int, chunk: int):
    """A plain ``expm1``-and-sum over as many floats as :func:`elementwise_pass` reads (``E c V`` per block)."""
    shapes = [_blocks(n, chunk) for n in (cfg.f, cfg.q_dim)]
    xs = [jax.random.normal(jax.random.key(9), (c, VOCAB)) * 0.01 for _, c in shapes]
    scales = jnp.linspace(1.0, 2.0, e)

    @jax.jit
    def run(xs, scales):
        total = 0.0
        for (blocks, _), x in zip(shapes, xs):
            def one(i):
                return jnp.sum(jnp.expm1((scales + 1e-3 * i.astype(jnp.float32))[:, None, None] * x[None]))
            total = total + jax.lax.map(one, jnp.arange(cfg.num_layers * blocks)).sum()
        return total

    return lambda: run(xs, scales)


def bench_examples(name: str, cfg: ModelConfig, args: argparse.Namespace) -> list[dict]:
    """Seconds per example of the batched and per-example routes for each ``E`` of ``--examples``."""
    params = random_params(cfg, jax.random.key(args.seed), jnp.dtype(args.dtype))
    sizes = [int(x) for x in args.examples.split(",")]
    ids = jax.random.randint(jax.random.key(args.seed + 1), (max(sizes), args.seq_len), 3, VOCAB)
    targets = jax.random.randint(jax.random.key(args.seed + 2), (max(sizes),), 3, VOCAB)
    opts = dict(mode=args.mode, attention=args.attention, chunk=args.chunk)
    print(f"{name}: d={cfg.d} f={cfg.f} L={cfg.num_layers} H={cfg.num_heads} V={VOCAB} T={args.seq_len} "
          f"chunk={args.chunk} mode={args.mode}", flush=True)
    single = timed(lambda: _per_example(params, cfg, ids[0], int(targets[0]), **opts), args.repeats)
    print(f"  per-example route        {single['wall']:8.3f} s/example (CPU {single['cpu']:.2f} s)", flush=True)
    rows = []
    for e in sizes:
        batched = timed(lambda: attribution_batch(params, cfg, ids[:e], targets[:e], **opts), args.repeats)
        ew = timed(elementwise_pass(cfg, e, args.chunk, args.mode == "rmsnorm"), args.repeats)
        floor = timed(expm1_floor(cfg, e, args.chunk), args.repeats)
        row = {"model": name, "E": e, "layers": cfg.num_layers, "batched_s_per_example": batched["wall"] / e,
               "per_example_s": single["wall"], "ratio": batched["wall"] / e / single["wall"],
               "elementwise_s": ew["wall"], "floor_s": floor["wall"], "elementwise_over_floor": ew["wall"] / floor["wall"],
               "batched_cpu_s_per_example": batched["cpu"] / e, "per_example_cpu_s": single["cpu"]}
        rows.append(row)
        row.update(cpu_ratio=row["batched_cpu_s_per_example"] / single["cpu"], elementwise_cpu_s=ew["cpu"],
                   floor_cpu_s=floor["cpu"], elementwise_over_floor_cpu=ew["cpu"] / floor["cpu"])
        print(f"  E={e:3d}: batched {row['batched_s_per_example']:8.3f} s/example, CPU "
              f"{row['batched_cpu_s_per_example']:.2f} s ({row['ratio']:.3f} / CPU {row['cpu_ratio']:.3f} of "
              f"per-example); elementwise pass {ew['wall']:8.3f} s, expm1-and-sum floor {floor['wall']:8.3f} s "
              f"({row['elementwise_over_floor']:.2f}x, CPU {row['elementwise_over_floor_cpu']:.2f}x)", flush=True)
    print(f"  {peak_memory()}", flush=True)
    return rows


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
    p.add_argument("--examples", default=None,
                   help="comma-separated batch sizes E: time the batched against the per-example route")
    p.add_argument("--layers", type=int, nargs="+", default=None,
                   help="layer counts of the models, in --models order (default: the size's; every figure here "
                        "scales with it, ratios do not)")
    p.add_argument("--json", default=None, help="with --examples: write the figures here")
    args = p.parse_args(argv)
    print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}, {len(jax.devices())} device(s), "
          f"{os.cpu_count()} CPUs")
    rows = []
    for i, name in enumerate(args.models.split(",")):
        hidden, ffn, layers, heads = SIZES[args.size][name]
        cfg = make_config(hidden, ffn, args.layers[i] if args.layers else layers, heads)
        if args.examples:
            rows += bench_examples(name, cfg, args)
        else:
            bench(name, cfg, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
