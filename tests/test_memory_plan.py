"""The plan's per-stage memory (:mod:`pktjax.memory`) against XLA's compiled programs on simulated CPU devices.

A child process with 4 CPU devices compiles (never runs) each LaTen stage's step of the tiny pair with the job's
shardings and reads XLA's per-device ``memory_analysis()`` (``experiments/bench_memory_plan.py``); the plan's
figure for the same stage must be within 15% of it: every stage on ``data=2`` and on ``fsdp=2,tensor=2``, and the
training step on ``fsdp=2`` (where, without the model's activation constraints, XLA kept every row of the
micro-batch's logits on each device: 2x the plan); and locate of the ``tenth`` pair on ``fsdp=2,tensor=2`` (seconds
to compile), where slicing a neuron block's columns from the whole ``[L, d, f]`` stack made XLA gather the stack
over ``tensor`` (1.2x the plan on ``data=2,fsdp=2,tensor=2``). XLA's optimisations stay on (unlike the other
multi-device tests): they decide which buffers exist.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.test_sharding import ROOT, _env

TOLERANCE = 0.15
CHILD = """
import json
from experiments.bench_memory_plan import compare
rows = (compare("tiny", "data=2") + compare("tiny", "fsdp=2,tensor=2")
        + compare("tiny", "fsdp=2", stages=("train step (micro-batch gradient)",))
        + compare("tenth", "fsdp=2,tensor=2", stages=("locate (teacher)", "locate (student)")))
print(json.dumps(rows))
"""


def test_plan_matches_compiled_memory_of_each_stage():
    env = _env(4)
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS")
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 4 + 4 + 1 + 2
    assert {(r["size"], r["mesh"]) for r in rows if r["stage"].startswith("locate")} == {
        ("tiny", "data=2"), ("tiny", "fsdp=2,tensor=2"), ("tenth", "fsdp=2,tensor=2")}
    assert {r["mesh"] for r in rows if r["stage"].startswith("train")} == {"data=2", "fsdp=2,tensor=2", "fsdp=2"}
    assert {r["stage"] for r in rows} == {"locate (teacher)", "locate (student)",
                                          "train step (micro-batch gradient)", "AdamW update"}
    for r in rows:
        assert r["measured"] > 0 and abs(r["measured"] / r["predicted"] - 1) <= TOLERANCE, r
