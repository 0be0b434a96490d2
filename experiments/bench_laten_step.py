"""Time one LaTen aligner step (SPEC §3.6) stage by stage on random Llama-2 shaped models.

Shapes as in ``bench_attribution.py``: ~1/10 of Llama-2 13B (teacher) and 7B (student) in width, the real layer
counts (40/32) and the real 32000-token vocabulary. One step = locate in the teacher and in the student (every
layer and neuron score), select + extract, tokenize ``P`` examples and micro-batch them, loss + aligner gradient
over the ``P`` examples (inject ``g(K)``, student forward/backward, accumulated over micro-batches), the AdamW
update. Data: the shipped GSM8K extract/align splits, tokenized by a byte-level tokenizer (one token per byte, so
every training sequence reaches ``cutoff_len``: the costly case). The step is repeated on the same example:
the first run includes compilation, the later ones are the steady state.

    .venv/bin/python experiments/bench_laten_step.py                       # P=16, cutoff 768, micro-batch 4
    .venv/bin/python experiments/bench_laten_step.py --cutoff-len 256 --repeats 1
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench_attribution import SIZES, make_config, peak_memory, random_params  # noqa: E402
from pktjax.attribution import locate  # noqa: E402
from pktjax.checkpoint import Model  # noqa: E402
from pktjax.data import laten_split, read_jsonl, tokenize_laten  # noqa: E402
from pktjax.extract import default_modules, extract  # noqa: E402
from pktjax.align import init_aligner  # noqa: E402
from pktjax.select import neuron_counts, select  # noqa: E402
from pktjax.train_aligner import OPTIMIZER, apply_update, micro_batches, step_gradients  # noqa: E402
from tests.tiny import build_tokenizer  # noqa: E402


def _timed(times: dict, label: str, fn):
    """Run ``fn``, record ``(wall seconds, process CPU seconds)`` under ``label``: on a shared machine the CPU
    seconds show the work, the wall seconds also the waiting."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    times[label] = (time.perf_counter() - t0, time.process_time() - c0)
    return out


def one_step(teacher: Model, student: Model, tokenizer, example, align_items, aligner, opt_state, args):
    """Run one aligner step; returns ``(seconds per stage, loss, aligner, opt_state)``."""
    times: dict[str, float] = {}
    n_f, n_a = neuron_counts(student.config.f, student.config.d, args.rate)
    k = student.config.num_layers
    modules = default_modules(teacher.config, student.config)
    attr_t = _timed(times, "locate teacher", lambda: locate(teacher.params, teacher.config, tokenizer, [example]))
    attr_s = _timed(times, "locate student", lambda: locate(student.params, student.config, tokenizer, [example]))
    sel_t, sel_s = select(attr_t, k, n_f, n_a), select(attr_s, k, n_f, n_a)
    know = _timed(times, "select + extract", lambda: extract(teacher.params, teacher.config, sel_t, modules))
    items = align_items + [tokenize_laten(tokenizer, example, args.cutoff_len, True)]
    batches = _timed(times, "tokenize + batch", lambda: micro_batches(items, args.micro_batch, tokenizer.eos_token_id,
                                                                       args.bucket, args.cutoff_len))
    loss, _, _, grads = _timed(times, f"loss + grad (P={len(items)})",
                               lambda: step_gradients(aligner, student, sel_s, know, batches, 1000.0))
    aligner, opt_state = _timed(times, "AdamW update",
                                lambda: apply_update(aligner, opt_state, grads, jnp.float32(args.lr)))
    return times, float(loss), aligner, opt_state


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tenth")
    p.add_argument("--task", default="gsm")
    p.add_argument("--examples-per-step", type=int, default=16)
    p.add_argument("--cutoff-len", type=int, default=768)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--bucket", type=int, default=64)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--repeats", type=int, default=1, help="steady-state repeats after the compiling run")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    print(f"backend {jax.default_backend()}: {jax.devices()[0].device_kind}, {len(jax.devices())} device(s)")
    dtype = jnp.dtype(args.dtype)
    models = {}
    for i, name in enumerate(("teacher", "student")):
        cfg = make_config(*SIZES[args.size][name])
        models[name] = Model(params=random_params(cfg, jax.random.key(i), dtype), config=cfg)
        print(f"{name}: d={cfg.d} f={cfg.f} L={cfg.num_layers} H={cfg.num_heads} V={cfg.vocab_size}")
    teacher, student = models["teacher"], models["student"]
    tokenizer = build_tokenizer()
    example = read_jsonl(laten_split(args.task, "extract"))[0]
    align_ex = read_jsonl(laten_split(args.task, "align"))
    drawn = random.Random(0).sample(range(len(align_ex)), args.examples_per_step - 1)
    align_items = [tokenize_laten(tokenizer, align_ex[i], args.cutoff_len, True) for i in drawn]
    modules = default_modules(teacher.config, student.config)
    aligner = init_aligner(jax.random.key(2), modules, teacher.config.d, student.config.d)
    opt_state = OPTIMIZER.init(aligner)
    print(f"P={args.examples_per_step} cutoff_len={args.cutoff_len} micro_batch={args.micro_batch} "
          f"rate={args.rate} modules={','.join(modules)} dtype={args.dtype}", flush=True)
    for rep in range(1 + args.repeats):
        times, loss, aligner, opt_state = one_step(teacher, student, tokenizer, example, align_items, aligner,
                                                   opt_state, args)
        kind = "first run (incl. compile)" if rep == 0 else "steady state"
        wall, cpu = (sum(t[i] for t in times.values()) for i in (0, 1))
        print(f"step {rep} [{kind}]: loss {loss:.4f}, total {wall:.2f} s wall, {cpu:.2f} s CPU")
        for label, (sec, cpu) in times.items():
            print(f"  {label:24s} {sec:9.3f} s wall {cpu:9.3f} s CPU", flush=True)
    print(f"  {peak_memory()}", flush=True)


if __name__ == "__main__":
    main()
