"""The main job end to end on a random tiny pair, its resumption, and its refusals of bad configs."""

import json

import pytest
import yaml

from pktjax.cli import main
from pktjax.errors import ConfigError
from pktjax.transfer import read_config, run_transfer

TEACHER = "tiny:hidden=48,layers=3,inter=64,heads=4,seed=1"
STUDENT = "tiny:hidden=32,layers=2,inter=48,heads=4,seed=2"


def _config(tmp_path, **over):
    raw = {"teacher": TEACHER, "student": STUDENT, "task": "mmlu", "eval": {"limit": 6, "batch_size": 6},
           "laten": {"seeds": [1], "steps": 1, "cutoff_len": 96, "examples_per_step": 2, "micro_batch": 2},
           "out": str(tmp_path / "run")}
    raw.update(over)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_transfer_runs_reports_and_resumes(tmp_path):
    path = _config(tmp_path)
    assert main(["transfer", str(path)]) == 0
    out = tmp_path / "run"
    scores = json.loads((out / "scores.json").read_text())
    methods = [r["method"] for r in scores["rows"]]
    assert methods == ["base student", "base teacher", "LaTen"]
    for row in scores["rows"]:  # every number traces to its per-example records
        report = json.loads(open(row["report"]).read())
        assert len(report["records"]) == 6
        assert row["score"] == pytest.approx(sum(r["correct"] for r in report["records"]) / 6)
    assert (out / "aligner_curves.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "| LaTen | 1 | 0 |" in text
    # a rerun resumes: nothing is recomputed and the numbers are identical
    stamp = (out / "eval" / "student.json").stat().st_mtime_ns
    run_transfer(read_config(path))
    assert (out / "eval" / "student.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "scores.json").read_text())["rows"] == scores["rows"]


def test_bad_configs_fail_before_heavy_work(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run_transfer(read_config(_config(tmp_path, teacher=str(tmp_path / "missing"))))
    with pytest.raises(ConfigError, match="no LaTen splits"):
        read_config(_config(tmp_path, task="super_ni"))
    with pytest.raises(ConfigError, match="smaller than the student"):
        run_transfer(read_config(_config(tmp_path, teacher=STUDENT, student=TEACHER, out=str(tmp_path / "r2"))))
    other = tmp_path / "r3"
    run_transfer_claim = read_config(_config(tmp_path, out=str(other)))
    other.mkdir()
    (other / "transfer.json").write_text(json.dumps({"fingerprint": "another"}))
    with pytest.raises(ConfigError, match="another config"):
        run_transfer(run_transfer_claim)
    assert not (other / "eval").exists()
