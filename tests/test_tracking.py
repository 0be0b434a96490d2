"""The optional tracker: TensorBoard event files hold exactly the numbers the trainers write to their own logs
(read back with tensorboardX's event proto, not through pktjax), the transfer job's scores, and a tracker whose
package is missing is refused by name before any work."""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pktjax.cli import main
from pktjax.errors import ConfigError
from pktjax.runfolder import read_jsonl
from pktjax.tracking import open_tracker, require, scalars

pytest.importorskip("tensorboardX")

EXAMPLES = [{"messages": [{"role": "user", "content": f"Add {i} and {i + 1}."},
                          {"role": "assistant", "content": f"{2 * i + 1}"}]} for i in range(8)]


def read_events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value)]`` from every TFRecord event file in ``folder`` (record: u64 length, u32 crc,
    payload, u32 crc; payload: an ``Event`` proto)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, list[tuple[int, float]]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for f in files:
        data, i = f.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _f32(x) -> float:
    return float(np.float32(x))  # TensorBoard stores a scalar as a float32 (simple_value)


def test_lora_curves_in_tensorboard_equal_metrics_jsonl(tiny_dir, tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES))
    out = tmp_path / "run"
    assert main(["lora", "train", "--student", str(tiny_dir("qwen2")), "--task", str(data), "--out", str(out),
                 "--epochs", "2", "--batch-size", "4", "--micro-batch", "4", "--rank", "2", "--no-progress",
                 "--tracker", "tensorboard"]) == 0
    logged = read_jsonl(out / "metrics.jsonl")
    events = read_events(out / "tensorboard")
    keys = ("epoch", "loss", "grad_norm", "lr", "tokens", "tokens_per_s", "seconds")
    assert set(events) == set(keys)  # every number of a line, nothing of the provenance
    for key in keys:
        assert events[key] == [(m["step"], _f32(m[key])) for m in logged]
    assert len(logged) == 4 and logged[0]["lr"] == 0.0 and events["loss"][-1][1] == _f32(logged[-1]["loss"])


def test_transfer_job_tracks_the_aligner_curve_and_the_scores(tmp_path):
    raw = {"teacher": "tiny:hidden=48,layers=3,inter=64,heads=4,seed=1",
           "student": "tiny:hidden=32,layers=2,inter=48,heads=4,seed=2", "task": "mmlu",
           "eval": {"limit": 2, "batch_size": 2},
           "laten": {"seeds": [1], "steps": 2, "cutoff_len": 96, "examples_per_step": 2, "micro_batch": 2},
           "out": str(tmp_path / "run")}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["transfer", str(path), "--tracker", "tensorboard"]) == 0
    out = tmp_path / "run"
    events = read_events(out / "tensorboard")
    log = read_jsonl(out / "laten" / "seed1" / "aligner" / "log.jsonl")
    assert [m["step"] for m in log] == [0, 1]
    for key in ("loss", "ce", "mse", "lr"):
        assert events[f"laten/seed1/{key}"] == [(m["step"], _f32(m[key])) for m in log]
    rows = json.loads((out / "scores.json").read_text())["rows"]
    want = {"summary/score/base_student": rows[0]["score"], "summary/score/base_teacher": rows[1]["score"],
            **{f"summary/score/LaTen/seed1/step{r['step']}": r["score"] for r in rows[2:]}}
    assert len(rows) == 4 and {t: v[-1] for t, v in events.items() if t.startswith("summary/")} == {
        t: (0, _f32(s)) for t, s in want.items()}
    # the tracker cannot change results: the fingerprint ignores it, so a run resumes with another tracker
    from pktjax.transfer import read_config

    assert read_config(path, overrides=["tracker=tensorboard"]).fingerprint() == read_config(path).fingerprint()


def test_missing_tracker_packages_are_named_before_any_work(tiny_dir, tmp_path, monkeypatch, capsys):
    assert "wandb" not in sys.modules or sys.modules["wandb"] is None
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, whatever this environment holds
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    for kind, package in (("wandb", "wandb"), ("tensorboard", "tensorboardX")):
        with pytest.raises(ConfigError, match=f"pip install {package}"):
            require(kind)
        with pytest.raises(ConfigError, match=f"pip install {package}"):
            open_tracker(kind, tmp_path)
        out = tmp_path / kind
        assert main(["lora", "train", "--student", str(tiny_dir("qwen2")), "--task", "gsm", "--out", str(out),
                     "--tracker", kind]) == 2
        assert f"pip install {package}" in capsys.readouterr().err and not out.exists()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"teacher": "tiny:hidden=48", "student": "tiny:hidden=32", "task": "gsm",
                                   "tracker": "wandb", "out": str(tmp_path / "job")}))
    assert main(["transfer", str(cfg)]) == 2 and "pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "job").exists()
    with pytest.raises(ConfigError, match="choose one of none, tensorboard, wandb"):
        require("mlflow")


def test_scalars_flatten_numbers_only():
    assert scalars({"loss": 1.5, "n": 3, "ok": True, "name": "x", "xs": [1], "delta": {"up": {"rms": 0.25}}}) == {
        "loss": 1.5, "n": 3.0, "delta/up/rms": 0.25}
    with open_tracker("none", "/nonexistent") as t:  # does nothing, writes nothing
        t.scoped("a").log({"loss": 1.0}, 0)
        t.summary({"score": 1.0})
    assert not Path("/nonexistent").exists()
