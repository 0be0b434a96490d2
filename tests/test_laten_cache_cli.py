"""``--cache DIR`` on ``pktjax laten train`` and ``pktjax laten fuse``: separate calls share located attribution
scores, say how many they read back, and refuse scores written by other weights."""

from __future__ import annotations

import importlib
import json

import pytest

from pktjax.cli import main

attribution_module = importlib.import_module("pktjax.attribution")


def _example(i: int) -> dict:
    a, b = 3 + i, 11 + 2 * i
    return {"messages": [{"role": "user", "content": f"Q{i}: what is {a}+{b}?"},
                         {"role": "assistant", "content": f"The sum is {a + b}."}]}


def _fail(*args, **kwargs):
    raise AssertionError("located again: the scores should have come from the cache")


def test_cli_calls_share_the_attribution_cache(tiny_dir, tmp_path, monkeypatch, capsys):
    teacher, student = tiny_dir("llama2", seed=1, hidden=48, layers=3, inter=64), tiny_dir("llama2")
    other_teacher = tiny_dir("llama2", seed=2, hidden=48, layers=3, inter=64)  # same shapes, other weights
    for name, rows in (("extract", [_example(i) for i in range(2)]),
                       ("align", [_example(i) for i in range(10, 16)])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"

    def train(out: str, t=teacher) -> list[str]:
        return ["laten", "train", "--teacher", str(t), "--student", str(student), "--task", "mmlu",
                "--extract", str(tmp_path / "extract.jsonl"), "--align", str(tmp_path / "align.jsonl"),
                "--out", str(tmp_path / out), "--cache", str(cache), "--lr", "1e-2", "--cutoff-len", "48",
                "--examples-per-step", "4", "--micro-batch", "2", "--bucket", "16", "--no-progress"]

    def fuse(out: str, t=teacher) -> list[str]:
        return ["laten", "fuse", "--teacher", str(t), "--student", str(student), "--task", "mmlu",
                "--aligner", str(tmp_path / "run1"), "--step", "1", "--train", str(tmp_path / "align.jsonl"),
                "--out", str(tmp_path / out), "--cache", str(cache)]

    def cache_line() -> str:
        lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("attribution scores read")]
        assert len(lines) == 1, lines
        return lines[0]

    assert main(train("run1")) == 0
    assert "0 of 2 for the teacher, 0 of 2 for the student" in cache_line()
    assert main(fuse("fused1")) == 0
    assert "0 of 1 for the teacher, 0 of 1 for the student" in cache_line()
    stored = {role: sorted(p.name for p in (cache / role).iterdir()) for role in ("teacher", "student")}
    assert all(len(names) == 3 and all(n.endswith(".npz") for n in names) for names in stored.values())
    assert not (tmp_path / "run1" / "attribution_cache").exists()  # kept where --cache says, not in the run

    # later calls read every score back: locating anything now fails
    monkeypatch.setattr(attribution_module, "attribution_batch", _fail)
    monkeypatch.setattr(attribution_module, "_layer_scores_batch_jit", _fail)
    assert main(train("run2")) == 0
    assert "2 of 2 for the teacher, 2 of 2 for the student" in cache_line()
    assert main(fuse("fused2")) == 0
    assert "1 of 1 for the teacher, 1 of 1 for the student" in cache_line()
    # the same located neurons, so the same injection
    record = [json.loads((tmp_path / f / "injection.json").read_text()) for f in ("fused1", "fused2")]
    assert record[0]["delta"] == record[1]["delta"] and record[0]["example"] == record[1]["example"]
    logs = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}  # all but the step's wall time
             for line in (tmp_path / run / "log.jsonl").read_text().splitlines()] for run in ("run1", "run2")]
    assert len(logs[0]) == 2 and logs[0] == logs[1]

    # another teacher (same shapes, other weights) meets the first teacher's scores: refused, nothing written
    for argv, out in ((fuse("fused3", other_teacher), "fused3"), (train("run3", other_teacher), "run3")):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "another model" in err and str(cache / "teacher") in err
        assert not (tmp_path / out).exists()  # refused before the run or the fused checkpoint writes anything
    assert {role: sorted(p.name for p in (cache / role).iterdir()) for role in stored} == stored


@pytest.mark.parametrize("command", ["train", "fuse"])
def test_cache_option_in_help(command, capsys):
    with pytest.raises(SystemExit):
        main(["laten", command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    help_text = text.rsplit("--cache DIR", 1)[1].split(" --", 1)[0]  # the option's entry, after the usage line
    assert "default:" in help_text and "attribution scores" in help_text
