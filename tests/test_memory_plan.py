"""The plan's per-stage memory (:mod:`pktjax.memory`) against XLA's compiled programs on simulated CPU devices.

A child process with 4 CPU devices compiles (never runs) each LaTen stage's step of the tiny pair with the job's
shardings and reads XLA's per-device ``memory_analysis()`` (``experiments/bench_memory_plan.py``); the plan's
figure for the same stage must be within 15% of it: every stage on ``data=2`` and on ``fsdp=2,tensor=2``, and the
training step on ``fsdp=2`` (where, without the model's activation constraints, XLA kept every row of the
micro-batch's logits on each device: 2x the plan); and locate of the ``tenth`` pair on ``fsdp=2,tensor=2`` (seconds
to compile), where slicing a neuron block's columns from the whole ``[L, d, f]`` stack made XLA gather the stack
over ``tensor`` (1.2x the plan on ``data=2,fsdp=2,tensor=2``); and locate of the tiny pair in passes of
``E = 4`` examples on ``data=2`` (the ``[L, E, V]`` log-probability arrays, trace and scores of every example of a
pass). XLA's optimisations stay on (unlike the other multi-device tests): they decide which buffers exist.
The plan's own arithmetic in ``locate_batch``, and ``pktjax plan CONFIG`` turning a fit into a misfit with it,
need no compiler.
"""

from __future__ import annotations

import json
import subprocess
import sys

import dataclasses

import yaml

from pktjax import memory as M
from pktjax.cli import main
from tests.test_sharding import ROOT, _env

TOLERANCE = 0.15
CHILD = """
import json
from experiments.bench_memory_plan import compare
rows = (compare("tiny", "data=2") + compare("tiny", "fsdp=2,tensor=2")
        + compare("tiny", "fsdp=2", stages=("train step (micro-batch gradient)",))
        + compare("tenth", "fsdp=2,tensor=2", stages=("locate (teacher)", "locate (student)"))
        + compare("tiny", "data=2", stages=("locate (teacher)", "locate (student)"), locate_batch=4))
print(json.dumps(rows))
"""


def test_plan_matches_compiled_memory_of_each_stage():
    env = _env(4)
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS")
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 4 + 4 + 1 + 2 + 2
    assert [r["locate_batch"] for r in rows[-2:]] == [4, 4] and rows[-1]["stage"] == "locate (student)"
    assert {(r["size"], r["mesh"]) for r in rows if r["stage"].startswith("locate") and r["locate_batch"] == 1} == {
        ("tiny", "data=2"), ("tiny", "fsdp=2,tensor=2"), ("tenth", "fsdp=2,tensor=2")}
    assert {r["mesh"] for r in rows if r["stage"].startswith("train")} == {"data=2", "fsdp=2,tensor=2", "fsdp=2"}
    assert {r["stage"] for r in rows} == {"locate (teacher)", "locate (student)",
                                          "train step (micro-batch gradient)", "AdamW update"}
    for r in rows:
        assert r["measured"] > 0 and abs(r["measured"] / r["predicted"] - 1) <= TOLERANCE, r


def _tiny_input(**kw) -> M.PlanInput:
    from experiments.bench_memory_plan import plan_input
    return dataclasses.replace(plan_input("tiny", {"data": 1, "fsdp": 1, "tensor": 1}), **kw)


def test_locate_grows_with_the_examples_of_a_pass():
    """Every example of a pass adds its ``[L, V]`` arrays, trace and scores: the locate term grows by the same
    amount per example (the neuron block does not grow), and ``located`` caps ``E``."""
    cfg = _tiny_input().teacher
    sizes = [M.locate_bytes(cfg, "float32", _tiny_input(locate_batch=e)) for e in (1, 2, 4, 8)]
    assert sizes[0] < sizes[1] < sizes[2] < sizes[3]
    step = sizes[1] - sizes[0]
    # the loops' arrays set the maximum at every E here: exactly linear in E (integers, no rounding)
    assert sizes[2] - sizes[1] == 2 * step and sizes[3] - sizes[2] == 4 * step
    # at least the six [L, V] float32 arrays per example; the one-example term holds the [c, V] block too
    assert step >= 6 * cfg.num_layers * cfg.vocab_size * 4 and sizes[0] > 2 * step
    assert M.locate_bytes(cfg, "float32", _tiny_input(locate_batch=32, located=4)) == sizes[2]
    # the plan's locate phase is this term (at tiny sizes the training step still sets the peak)
    assert M.plan(_tiny_input(locate_batch=8))["locate"]["attribution (teacher)"] == sizes[3]


def test_plan_config_with_a_big_locate_batch_does_not_fit(tmp_path, capsys):
    """Llama-2 13B -> 7B, bfloat16 weights on fsdp=4 x 32 GiB fits in locate passes of 32 examples (the default)
    and not in passes of 128 (the teacher's activations, logits and log-probabilities of 128 examples); the
    config's locate_batch is the default of --locate-batch, and laten.steps caps it."""
    job = {"teacher": "llama-2-13b", "student": "llama-2-7b", "task": "gsm", "mesh": "fsdp=4",
           "device_memory_gb": 32, "dtype": "bfloat16", "out": str(tmp_path / "run")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "locate passes of 32 example(s)" in out and "FITS: peak" in out
    assert main(["plan", str(path), "--locate-batch", "128"]) == 0
    out = capsys.readouterr().out
    assert "locate passes of 128 example(s)" in out and "DOES NOT FIT: peak" in out
    assert "it fits with --locate-batch 64" in out
    path.write_text(yaml.safe_dump({**job, "laten": {"locate_batch": 128}}))
    assert main(["plan", str(path)]) == 0
    assert "DOES NOT FIT: peak" in capsys.readouterr().out
    # one seed of 3 steps locates at most 4 examples (3 extract examples and the fuse example)
    path.write_text(yaml.safe_dump({**job, "laten": {"locate_batch": 128, "steps": 3, "seeds": [42]}}))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "locate passes of 4 example(s)" in out and "FITS: peak" in out
