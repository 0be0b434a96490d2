"""The plan's per-stage memory (:mod:`pktjax.memory`) against XLA's compiled programs on simulated CPU devices.

A child process with 4 CPU devices compiles (never runs) each LaTen stage's step of the tiny pair with the job's
shardings and reads XLA's per-device ``memory_analysis()`` (``experiments/bench_memory_plan.py``); the plan's
figure for the same stage must be within 15% of it: every stage on ``data=2``, locate and the update on
``fsdp=2,tensor=2``. The training step on meshes with ``tensor`` or ``fsdp`` is outside 15% (docs/scale.md,
"Measured against the plan": XLA lays the logits out otherwise than the plan counts them), so it is not asserted
there. XLA's optimisations stay on (unlike the other multi-device tests): they decide which buffers exist.
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
rows = compare("tiny", "data=2") + compare("tiny", "fsdp=2,tensor=2", stages=("locate (teacher)",
               "locate (student)", "AdamW update"))
print(json.dumps(rows))
"""


def test_plan_matches_compiled_memory_of_each_stage():
    env = _env(4)
    env.pop("JAX_DISABLE_MOST_OPTIMIZATIONS")
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 4 + 3
    assert {r["stage"] for r in rows} == {"locate (teacher)", "locate (student)",
                                          "train step (micro-batch gradient)", "AdamW update"}
    for r in rows:
        assert r["measured"] > 0 and abs(r["measured"] / r["predicted"] - 1) <= TOLERANCE, r
