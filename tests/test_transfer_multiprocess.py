"""``pktjax transfer`` as two processes joined by ``jax.distributed`` (2 simulated CPU devices each, a 4-device
mesh across them, coordinator on 127.0.0.1): the job's scores and every example's verdict are the one-process run's,
and only process 0 writes the report, the records and the evaluation reports.

The processes find each other through ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, as
the CLI reads them (:func:`pktjax.sharding.initialize_distributed`), and share one output folder on this disk.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys

import numpy as np

from pktjax.cli import main
from tests.test_sharding import ROOT, _env, _free_port, _report
from tests.test_sharding_transfer import results

# The demo job at its smallest: one aligner seed of one step, 4 MMLU questions. Four examples per step in
# micro-batches of 4, split over data x fsdp of the 4-device mesh.
CONFIG = """\
teacher: tiny:hidden=64,layers=4,inter=128,heads=4,seed=1
student: tiny:hidden=32,layers=2,inter=64,heads=4,seed=2
task: mmlu
eval: {limit: 4, batch_size: 4}
laten: {seeds: [42], steps: 1, rate: 0.1, cutoff_len: 64, examples_per_step: 4, micro_batch: 4}
"""
MESH = "data=2,fsdp=1,tensor=2"
TIMEOUT_S = 400


def _worker(config, out, port: int, pid: int) -> subprocess.CompletedProcess:
    env = {**_env(2), "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": str(pid)}
    cmd = [sys.executable, "-m", "pktjax.cli", "transfer", str(config), "--out", str(out), "--mesh", MESH]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, -9, str(e.stdout or ""), f"{e.stderr or ''}\nTIMED OUT")


def test_two_processes_run_the_job_to_the_one_process_scores(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(CONFIG)
    port = _free_port()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the two workers; the one-process run meanwhile here
        workers = [pool.submit(_worker, config, tmp_path / "two", port, i) for i in (0, 1)]
        assert main(["transfer", str(config), "--out", str(tmp_path / "one")]) == 0
        procs = [w.result() for w in workers]
    for proc in procs:
        assert proc.returncode == 0, _report(proc)
    assert "report: " in procs[0].stdout and "report: " not in procs[1].stdout  # process 0 prints the report
    rows, verdicts, sizes = results(tmp_path / "two")
    want = results(tmp_path / "one")
    assert len(want[0]) == 3 and all(len(v) == 4 for v in want[1].values())  # student, teacher, LaTen step 0
    assert rows == want[0] and verdicts == want[1]
    # the injected deltas' RMS sizes: float32 sums in another order (see tests/test_sharding_transfer.py)
    got, ref = (np.array([x for row in t for x in row]) for t in (sizes, want[2]))
    assert got.size == ref.size > 0 and np.allclose(got, ref, rtol=1e-3, atol=0), (got, ref)
    two = json.loads((tmp_path / "two" / "transfer.json").read_text())
    assert two["fingerprint"] == json.loads((tmp_path / "one" / "transfer.json").read_text())["fingerprint"]


def test_process_zero_decides_the_output_folder(tmp_path, monkeypatch):
    """Process 0 checks and claims the folder; another process writes nothing and raises when process 0 refused
    (the verdict comes from ``broadcast_one_to_all``, faked here)."""
    import jax
    import pytest
    from jax.experimental import multihost_utils

    from pktjax.errors import ConfigError
    from pktjax.transfer import read_config, stages

    config = tmp_path / "job.yaml"
    config.write_text(CONFIG)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run")
    with pytest.raises(ConfigError, match="not a pktjax transfer run"):
        stages._claim_output(read_config(config, foreign, []))
    verdicts = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(stages, "is_main_process", lambda: False)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: verdicts.append(int(x)) or 1)
    with pytest.raises(ConfigError, match="process 0 refused"):
        stages._claim_output(read_config(config, tmp_path / "other", []))
    assert verdicts == [0] and not (tmp_path / "other").exists()  # nothing written by a process other than 0
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: 0)
    stages._claim_output(read_config(config, tmp_path / "other", []))
    assert not (tmp_path / "other").exists()
