"""One decode step, two ways, in one process, on the same decode state, timed alternately: by default the scan over
the stacked layer weights against the loop over per-layer weight copies (:func:`pktjax.model.unstack_layers`);
``--variants per_layer,bfloat16`` the per-layer float32 weights against per-layer bfloat16 copies of the matrices
(:func:`pktjax.model.with_matmul_dtype`, ``pktjax eval --matmul-dtype bfloat16``).

The state is ``--slots`` running slots over a KV cache of ``--cache`` positions, ``--filled`` of them written
(random keys and values), greedy. Each variant is compiled once (its first call less a step: wall and process CPU
seconds), then the two steps alternate ``--reps`` times; per-step wall and process CPU seconds (both threads of
XLA's pool count) are reported with their medians and the first / second ratio, beside the step's floors timed in
the same run: one pass over every matrix, and the step's matrix products alone at batch ``--slots``, in float32
(keys ``stream_*``, ``matmul_*``) and, for the bfloat16 variant, with bfloat16 matrices (``*_bfloat16``).
``--profile`` adds the milliseconds per step of each kind of compiled operation (JAX's profiler), a fusion that
holds a matrix product named by the product's output shape (``dot f32[16,4864]``: a gate or up projection at 16
slots), others by their fusion kind (e.g. ``dynamic-slice_bitcast_fusion``: a weight sliced out of its stack).

    .venv/bin/python experiments/bench_decode_step.py --gguf ~/.cache/pktjax/qwen2.5-coder-0.5b-instruct-q4.gguf \
        --slots 16 --cache 832 --filled 300 [--variants per_layer,bfloat16] [--profile] [--json out.json]
    .venv/bin/python experiments/bench_decode_step.py --size mid     # a random 8-layer model, no download
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _clock(fn) -> tuple[float, float, object]:
    """``(wall s, process CPU s, result)`` of ``fn()``, waiting for the device."""
    t, c = time.perf_counter(), _cpu()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t, _cpu() - c, out


def _model(args):
    from pktjax.checkpoint import load_model
    from pktjax.tiny import save_random_model, tiny_config

    if args.gguf is not None:
        return load_model(args.gguf.expanduser())
    kw = dict(hidden=512, layers=8, inter=1408, heads=8, vocab=32000) if args.size == "mid" else \
        dict(hidden=32, layers=2, inter=48, heads=4, vocab=260)
    folder = Path(tempfile.mkdtemp(prefix="bench-step-")) / "model"
    save_random_model(folder, tiny_config(**kw), seed=0)
    return load_model(folder)


def _floors(params, cfg, slots: int, reps: int, dtype=jnp.float32) -> dict:
    """Best-of-``reps`` wall and CPU seconds of one pass over every matrix the step multiplies by (a sum) and of
    the step's matrix products alone (every linear layer and the vocabulary projection at batch ``slots``), with
    the matrices in ``dtype``: bfloat16 ones transposed to ``[in, out]`` and multiplied with float32 sums, as
    :func:`pktjax.model.with_matmul_dtype` stores and :func:`pktjax.model._dot` multiplies them."""
    from pktjax.model import InOut, with_matmul_dtype

    low = jnp.dtype(dtype) != jnp.float32
    if low:  # the decoder's own copies: [in, out] matrices in dtype
        cast = with_matmul_dtype(params, dtype)
        lin = {k: v.w for k, v in cast["layers"].items() if isinstance(v, InOut)}
        head = cast["lm_head"].w
    else:
        lin = {k: v for k, v in params["layers"].items() if v.ndim == 3}
        head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    x, xf = jnp.ones((slots, cfg.hidden_size)), jnp.ones((slots, cfg.intermediate_size))

    def prod(eq, a, w):
        if not low:
            return jnp.einsum(eq, a, w, precision=jax.lax.Precision.HIGHEST)
        return jnp.einsum(eq, a.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def matmuls(lin, head, x, xf):
        total = jnp.sum(prod("bi,iv->bv" if low else "bi,vi->bv", x, head))
        for w in lin.values():
            wide = w.shape[-2 if low else -1] == cfg.intermediate_size
            total += jnp.sum(prod("bi,lio->lbo" if low else "bi,loi->lbo", xf if wide else x, w))
        return total

    stream = jax.jit(lambda p: sum(jnp.sum(a, dtype=jnp.float32) for a in jax.tree.leaves(p)))
    mm = jax.jit(matmuls)
    out = {}
    for name, fn in (("stream", lambda: stream((lin, head))), ("matmul", lambda: mm(lin, head, x, xf))):
        _clock(fn)
        runs = [_clock(fn)[:2] for _ in range(reps)]
        out[f"{name}_wall_s"], out[f"{name}_cpu_s"] = min(w for w, _ in runs), min(c for _, c in runs)
    return out


def _state(cfg, slots: int, cache_len: int, filled: int, n_new: int) -> dict:
    """A decode state with every slot running at cache position ``filled`` over random keys and values."""
    from pktjax.generate import _empty_slots

    st = _empty_slots(cfg, slots, cache_len, n_new, jnp.float32, 0)
    k, v = (0.5 * jax.random.normal(jax.random.key(i), st["cache"][n].shape) for i, n in enumerate("kv"))
    full = lambda n: jnp.full((slots,), n, jnp.int32)  # noqa: E731
    return {**st, "cache": {"k": k, "v": v, "index": full(filled)},
            "key_mask": jnp.zeros((slots, cache_len), jnp.int32).at[:, :filled].set(1),
            "done": jnp.zeros((slots,), bool), "pos": full(filled), "step": full(1),
            "tok": 100 + jnp.arange(slots, dtype=jnp.int32)}


def _dot_fusions(hlo: str) -> dict[str, str]:
    """``{fusion instruction: "dot <output shape>"}`` for the fusions of a compiled module that hold a product."""
    called = dict(re.findall(r"%([\w.\-]+) = [^\n]*? fusion\([^\n]*?calls=%([\w.\-]+)", hlo))
    dots, current = {}, None
    for line in hlo.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            current = (re.match(r"(?:ENTRY )?%([\w.\-]+)", line) or [None, None])[1]
        elif current and (m := re.search(r"= (\w+\[[\d,]*\])\S* dot\(", line)):
            dots[current] = f"dot {m[1]}"
    return {inst: dots[comp] for inst, comp in called.items() if comp in dots}


def _op_groups(step, state, hlo: str, trace_dir: str, steps: int = 2) -> tuple[dict, object]:
    """Milliseconds per step of each kind of compiled operation, from JAX's profiler: fusions holding a product
    by the product's output shape (:func:`_dot_fusions` of the step's compiled ``hlo``), the rest by name with
    the numbering dropped."""
    from jax.profiler import ProfileData

    jax.profiler.start_trace(trace_dir)
    for _ in range(steps):
        state = jax.block_until_ready(step(state))
    jax.profiler.stop_trace()
    data = ProfileData.from_file(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1])
    dots = _dot_fusions(hlo)
    groups: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if not ev.name.startswith(("ThunkExecutor", "end: ", "SlinkyThreadPool", "ThreadpoolListener")):
                    groups[dots.get(ev.name) or re.sub(r"[._]\d+$", "", ev.name)] += ev.duration_ns / 1e6 / steps
    return {k: round(v, 1) for k, v in groups.most_common(10)}, state


def run(args) -> dict:
    from pktjax.generate import _decode, _eos_array
    from pktjax.model import unstack_layers, with_matmul_dtype

    load_s, _, model = _clock(lambda: _model(args))
    cfg, stacked = model.config, model.params
    res = {"model": str(args.gguf or args.size), "slots": args.slots, "cache": args.cache, "filled": args.filled,
           "load_s": round(load_s, 1), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "jax_device": str(jax.devices()[0]), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    floors = {"float32": _floors(stacked, cfg, args.slots, args.reps)}
    if "bfloat16" in args.variants:
        floors["bfloat16"] = _floors(stacked, cfg, args.slots, args.reps, jnp.bfloat16)
    res.update({f"{k}_{dt}" if dt != "float32" else k: round(v, 4) for dt, f in floors.items() for k, v in f.items()})
    print(json.dumps(res), flush=True)
    make = {"stacked": lambda: stacked, "per_layer": lambda: unstack_layers(stacked),
            "bfloat16": lambda: with_matmul_dtype(unstack_layers(stacked), "bfloat16")}
    variants = {name: make[name]() for name in args.variants}
    consts = dict(eos=_eos_array(()), pad_id=jnp.int32(0), temperature=jnp.float32(1e-6), top_k=0, sample=False)
    key = jax.random.key(0)

    def call(params, st):
        return (params, cfg, st, key, st["n"] + 1, jnp.bool_(False), jnp.int32(512))

    def stepper(params):  # the whole cache attended, as before decode windows
        return lambda st: _decode(*call(params, st), **consts, window=st["key_mask"].shape[1])

    states, steps, times, first = {}, {}, {name: [] for name in variants}, {}
    for name, params in variants.items():
        steps[name] = stepper(params)
        st = jax.block_until_ready(_state(cfg, args.slots, args.cache, args.filled, 512))
        first[name] = _clock(lambda: steps[name](st))
        states[name] = first[name][2]
    for _ in range(args.reps):  # alternate, so both see the same machine load
        for name in variants:
            wall, cpu, states[name] = _clock(lambda: steps[name](states[name]))
            times[name].append((wall, cpu))
    for name in variants:
        res[f"{name}_step_wall_s"] = [round(w, 3) for w, _ in times[name]]
        res[f"{name}_step_cpu_s"] = [round(c, 3) for _, c in times[name]]
    med = {f"{n}_{k}": statistics.median(x[i] for x in times[n]) for n in variants for i, k in enumerate(("w", "c"))}
    for name in variants:  # the first call compiled, then stepped once
        res[f"{name}_compile_wall_s"] = round(first[name][0] - med[f"{name}_w"], 2)
        res[f"{name}_compile_cpu_s"] = round(first[name][1] - med[f"{name}_c"], 2)
    a, b = args.variants
    res[f"ratio_{a}_over_{b}_wall"] = round(med[f"{a}_w"] / med[f"{b}_w"], 2)
    res[f"ratio_{a}_over_{b}_cpu"] = round(med[f"{a}_c"] / med[f"{b}_c"], 2)
    for name in variants:  # each against the floors of its own matrices' dtype
        own = floors["bfloat16" if name == "bfloat16" else "float32"]
        for floor in ("stream", "matmul"):
            res[f"{name}_over_{floor}_floor_cpu"] = round(med[f"{name}_c"] / max(own[f"{floor}_cpu_s"], 1e-9), 2)
    res["same_tokens"] = bool(np.array_equal(states[a]["out"], states[b]["out"]))
    if args.profile:
        for name, params in variants.items():
            hlo = _decode.lower(*call(params, states[name]), **consts,
                                window=states[name]["key_mask"].shape[1]).compile().as_text()
            res[f"{name}_ms_per_op_kind"], states[name] = _op_groups(steps[name], states[name], hlo,
                                                                     tempfile.mkdtemp(prefix=f"prof-{name}-"))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, help="a real model (GGUF, dequantized to float32)")
    ap.add_argument("--size", choices=("tiny", "mid"), default="mid", help="without --gguf: a random model")
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--cache", type=int, default=832, help="cache positions (prompt bucket + new-token bucket)")
    ap.add_argument("--filled", type=int, default=300, help="positions already written")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--variants", default="stacked,per_layer", type=lambda v: tuple(v.split(",")),
                    help="the two steps compared: two of stacked, per_layer, bfloat16 (default: stacked,per_layer)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if len(set(args.variants)) != 2 or not set(args.variants) <= {"stacked", "per_layer", "bfloat16"}:
        ap.error(f"--variants {','.join(args.variants)}: name two of stacked, per_layer, bfloat16")
    res = run(args)
    print(json.dumps(res, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
