"""``python -m experiments.bench --size tiny|tenth|llama2-13b-7b --device cpu|gpu --out FILE.json [--reps 5]``

Builds a random teacher/student pair with ``transformers``, saves it as safetensors, loads it in the PyTorch
baseline and in pktjax, and times every stage of both on the same device and the same inputs: one warm-up each,
then timed repetitions taken in turns. Writes the JSON record and refreshes this run's section of
``experiments/bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = """# pktjax vs a PyTorch baseline

Produced by `python -m experiments.bench` (`experiments/bench/`); the baseline is `experiments/torch_baseline/`
(`transformers` models, hooks, batched products under `torch.no_grad`, `peft` for LoRA). Both frameworks read one
random safetensors checkpoint and get the same inputs. Every stage runs once untimed in each framework (JAX
compiles then), then the timed repetitions alternate between the frameworks, so drifting load on a shared
machine hits both alike; times are medians. `torch/pktjax` above 1 means pktjax is faster. `matmul floor` is the
time of the attribution's vocabulary products alone: `ceil(L (f + H*hd) / chunk)` products `[chunk, d] x [d, V]`,
timed in JAX and in torch in the same run; `pktjax/floor` uses the JAX one. Peak MB is the growth of the resident
set during a repetition (CPU; glibc's mmap threshold is fixed so freed blocks return to the system) or of the
allocator's peak (GPU). Agreement, pktjax taken as the reference: attribution scores (relative = max abs
difference / max |score|, per score array), both also against a float64 recomputation; selections made from each
side's own scores; extraction, one aligner step and one LoRA step from the same start (the baseline's selection,
the same initial factors; the LoRA step compared with dropout off, timed with dropout 0.05). JAX's float32
products run at `highest` precision (true float32, as torch's do by default) unless a section says otherwise.
"""


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[1])
    p.add_argument("--size", choices=("tiny", "tenth", "llama2-13b-7b"), required=True)
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per stage (after one warm-up)")
    p.add_argument("--layers", type=int, nargs=2, metavar=("TEACHER", "STUDENT"),
                   help="override the layer counts (same widths); recorded in the results")
    p.add_argument("--threads", type=int, default=0,
                   help="pin the process to this many cores, so both frameworks use that many threads "
                        "(0: all usable cores)")
    p.add_argument("--no-float64", action="store_true",
                   help="skip the float64 recomputation of the scores (always skipped for llama2-13b-7b)")
    p.add_argument("--precision", choices=("highest", "default"), default="highest",
                   help="JAX's float32 matrix-product precision: 'highest' is true float32, as torch computes by "
                        "default; 'default' lets a GPU use TF32-class products (faster, ~1e-4 relative error)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", type=Path, default=RESULTS_MD, help="markdown file whose section is refreshed")
    p.add_argument("--no-markdown", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    if args.reps < 1:
        p.error("--reps must be at least 1")
    if args.layers and not args.layers[0] >= args.layers[1] >= 1:
        p.error("--layers needs TEACHER >= STUDENT >= 1")
    if args.size == "llama2-13b-7b" and args.device != "gpu":
        p.error("the full Llama-2 13B -> 7B shapes need a GPU (about 80 GB of float32 weights per framework)")
    return args


def _environment(args: argparse.Namespace) -> None:
    """Fix the allocator thresholds (re-executing once so glibc sees them), pin the cores, pick JAX's platform.
    Runs before torch and jax are imported: both size their thread pools from the process's CPU affinity."""
    if any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.environ.update(MALLOC_ENV)
        os.execv(sys.executable, [sys.executable, "-m", "experiments.bench", *sys.argv[1:]])
    if args.threads:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, cores[:args.threads])
    os.environ.setdefault("JAX_PLATFORMS", "cpu" if args.device == "cpu" else "cuda")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = args.precision
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def chosen_size(args: argparse.Namespace):
    """The named size, with the layer counts of ``--layers`` if given."""
    from experiments.bench.sizes import SIZES

    size = SIZES[args.size]
    if not args.layers:
        return size
    t, s = args.layers
    return dataclasses.replace(size, teacher=dataclasses.replace(size.teacher, layers=t),
                               student=dataclasses.replace(size.student, layers=s),
                               note=f"{size.note}; depth cut to {t}/{s} layers")


def run(args: argparse.Namespace) -> dict:
    from experiments.bench import compare, driver, report
    from experiments.bench.models import build_pair
    from experiments.bench.workload import make_workload

    size, t0, load = chosen_size(args), time.perf_counter(), os.getloadavg()[0]
    together = args.size != "llama2-13b-7b"
    with tempfile.TemporaryDirectory(prefix="pktjax-bench-") as tmp:
        dirs = build_pair(size, Path(tmp), args.seed)
        work = make_workload(size, args.seed)
        run_stages = driver.interleaved if together else driver.sequential
        (torch_out, jax_out), (torch_res, jax_res) = run_stages(dirs, size, work, args.device, args.reps,
                                                                float64=together and not args.no_float64)
    agree = compare.agreement(torch_out, jax_out, work)
    rec = report.record(args, size, jax_res, torch_res, agree, time.perf_counter() - t0, load,
                        "in turns" if together else "one framework after the other")
    report.write_json(args.out, rec)
    if not args.no_markdown:
        report.update_markdown(args.markdown, rec, HEADER)
    return rec


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    _environment(args)
    rec = run(args)
    for name, e in rec["stages"].items():
        floor = f"  floor {e['matmul_floor_s']:.3g}s" if "matmul_floor_s" in e else ""
        print(f"{name:22s} pktjax {e['pktjax_s']:.4g}s  torch {e['torch_s']:.4g}s  torch/pktjax {e['ratio']:.2f}{floor}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
