"""``pktjax transfer --mesh``: the main job on 8 simulated CPU devices writes the scores and per-example verdicts
of the one-device run (and its injected delta sizes, to float tolerance), on ``fsdp=4,tensor=2`` and on
``data=2,fsdp=2,tensor=2``.

jax fixes its device count when it starts, so the mesh runs go to a child process with 8 CPU devices
(``tests/sharding_checks.py transfer``), which also checks that every stage receives weights laid out by the
sharding rules; the one-device run goes on meanwhile in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from pktjax.cli import main
from tests.sharding_checks import MESHES, TRANSFER_MESHES
from tests.test_sharding import ROOT, _env

# demo.yaml made smaller: one aligner seed of one step, 8 MMLU questions, short examples. Four examples per step
# in micro-batches of 4, so that data x fsdp really splits the rows.
CONFIG = """\
teacher: tiny:hidden=64,layers=4,inter=128,heads=4,seed=1
student: tiny:hidden=32,layers=2,inter=64,heads=4,seed=2
task: mmlu
eval: {limit: 8, batch_size: 8}
laten: {seeds: [42], steps: 1, rate: 0.1, cutoff_len: 64, examples_per_step: 4, micro_batch: 4}
"""
TIMEOUT_S = 900


def results(out: Path) -> tuple[list[dict], dict, list]:
    """The scores table (without the report paths, which name the run folder, and the LaTen rows' injected delta
    sizes), per row every example's id, verdict and answer, and the delta sizes' numbers."""
    rows = json.loads((out / "scores.json").read_text())["rows"]
    verdicts, sizes = {}, []
    for r in rows:
        records = json.loads(Path(r.pop("report")).read_text())["records"]
        verdicts[r["method"], r["seed"], r["step"]] = [(x["id"], x["verdict"], x["output"]) for x in records]
        sizes.append(_numbers(r.pop("delta", None)))
    return rows, verdicts, sizes


def _numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for k in sorted(tree) for x in _numbers(tree[k])]
    return [float(tree)] if isinstance(tree, (int, float)) else []


def test_transfer_on_a_mesh_writes_the_one_device_scores(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(CONFIG)
    cmd = [sys.executable, "-m", "tests.sharding_checks", "transfer", str(config), str(tmp_path)]
    child = subprocess.Popen(cmd, cwd=ROOT, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert main(["transfer", str(config), "--out", str(tmp_path / "one")]) == 0
        stdout, stderr = child.communicate(timeout=TIMEOUT_S)
    finally:
        child.kill()
    assert child.returncode == 0 and "transfer ok" in stdout, f"{stdout[-3000:]}\n{stderr[-8000:]}"
    want = results(tmp_path / "one")
    assert len(want[0]) == 3 and all(len(v) == 8 for v in want[1].values())  # student, teacher, LaTen step 0
    for name in TRANSFER_MESHES:
        rows, verdicts, sizes = results(tmp_path / name)
        assert rows == want[0], (MESHES[name], rows)
        assert verdicts == want[1], MESHES[name]
        # RMS sizes of the injected deltas, from an aligner trained on the mesh: float32 sums run in another order
        # and the first AdamW update divides by each gradient's own size, so element differences grow well past
        # float32's 1e-7; their RMS agrees to 1e-3
        got, ref = (np.array([x for row in t for x in row]) for t in (sizes, want[2]))
        assert got.size == ref.size > 0 and np.allclose(got, ref, rtol=1e-3, atol=0), (MESHES[name], got, ref)
