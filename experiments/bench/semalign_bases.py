"""Time SemAlign's basis work on random LM heads of a pair's shapes (default: Qwen2.5-Coder 1.5B -> 0.5B,
V 151936, d 1536 -> 896): the two Gram pseudo-inverses and the ``[d_S, d_T]`` alignment map, both frames.

    python -m experiments.bench.semalign_bases [--vocab V] [--d-teacher D] [--d-student D]

Prints seconds per call and the peak resident memory of the process (random weights: the timing does not
depend on their values)."""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--d-teacher", type=int, default=1536)
    p.add_argument("--d-student", type=int, default=896)
    args = p.parse_args()
    from pktjax.semalign import alignment_map, gram_pinv

    rng = np.random.default_rng(0)
    wt = (rng.standard_normal((args.vocab, args.d_teacher), np.float32) / np.sqrt(args.d_teacher))
    ws = (rng.standard_normal((args.vocab, args.d_student), np.float32) / np.sqrt(args.d_student))
    for name, fn in (("gram_pinv teacher", lambda: gram_pinv(wt)), ("gram_pinv student", lambda: gram_pinv(ws)),
                     ("alignment_map paper", lambda: alignment_map(wt, ws, "paper")),
                     ("alignment_map dual", lambda: alignment_map(wt, ws, "dual"))):
        t = time.perf_counter()
        fn()
        print(f"{name}: {time.perf_counter() - t:.1f} s")
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
