"""Command line: ``seeking extract``, ``lora train`` (Seeking init from a teacher or a folder, PiSSA in bfloat16,
resuming) and ``lora merge`` into a checkpoint that ``transformers`` loads."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch

import pktjax
from pktjax import lora as L
from pktjax.cli import main
from tests.tiny import VOCAB, torch_model

EXAMPLES = [{"messages": [{"role": "user", "content": f"Add {i} and {i + 1}."},
                          {"role": "assistant", "content": f"{2 * i + 1}"}]} for i in range(8)]
TEACHER = dict(seed=1, hidden=48, layers=3, inter=64)


def _same(x, y):
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), x, y)


def test_extract_train_resume_merge(tiny_dir, tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES))
    teacher, student = str(tiny_dir("qwen2", **TEACHER)), str(tiny_dir("qwen2"))
    cfg = pktjax.load_model(student).config
    ext = tmp_path / "extracted"
    extract = ["seeking", "extract", "--teacher", teacher, "--student", student, "--task", str(data),
               "--out", str(ext), "--rank", "4", "--samples", "3"]
    assert main(extract) == 0
    info = json.loads((ext / "extraction.json").read_text())
    assert len(info["teacher_layers"]) == 2 and info["samples"] == 3
    assert main(extract) == 2  # refuses to overwrite the folder

    common = ["--student", student, "--task", str(data), "--epochs", "1", "--batch-size", "4", "--micro-batch", "4",
              "--alpha", "8", "--no-progress"]
    run = tmp_path / "run"
    train = ["lora", "train", "--init", "seeking", "--teacher", teacher, "--seed-samples", "3", "--rank", "4",
             "--out", str(run), *common]
    assert main(train) == 0
    _same(L.import_peft(run / "extracted", cfg), L.import_peft(ext, cfg))
    adapter, scale = L.import_peft(run / "adapter", cfg)
    assert L.rank_of(adapter) == 8 and scale == 2.0  # [b | -b0], alpha doubled: applies to the original student
    assert main(train) == 0  # a finished run resumes at its end and exports the same adapter again
    _same(L.import_peft(run / "adapter", cfg)[0], adapter)
    assert main(["lora", "train", "--init", f"seeking:{ext}", "--out", str(tmp_path / "run2"), *common]) == 0
    _same(L.import_peft(tmp_path / "run2" / "adapter", cfg)[0], adapter)

    assert main(["lora", "merge", "--student", student, "--adapter", str(run / "adapter"),
                 "--out", str(tmp_path / "merged")]) == 0
    ids = np.random.RandomState(0).randint(3, VOCAB, size=(2, 7))
    with torch.no_grad():
        got = torch_model(tmp_path / "merged")(input_ids=torch.tensor(ids)).logits.numpy()
    want = L.apply(pktjax.load_model(student).params, cfg, adapter, ids, scale=scale)
    assert np.abs(got - np.asarray(want)).max() <= 1e-4


def test_train_pissa_bfloat16(tiny_dir, tmp_path):
    out = tmp_path / "pissa"
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES))
    assert main(["lora", "train", "--student", str(tiny_dir("qwen2")), "--init", "pissa", "--task", str(data),
                 "--out", str(out), "--epochs", "1", "--batch-size", "8", "--micro-batch", "8", "--rank", "2",
                 "--targets", "q_proj", "v_proj", "--dtype", "bfloat16", "--no-progress"]) == 0
    log = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 1 and np.isfinite(log[0]["loss"]) and log[0]["tokens"] > 0
    conf = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert conf["target_modules"] == ["q_proj", "v_proj"] and conf["r"] == 4
    assert main(["lora", "train", "--student", str(tiny_dir("qwen2")), "--init", "pissa:x", "--task", str(data),
                 "--out", str(tmp_path / "bad")]) == 2  # a clear error, not a traceback


def test_train_checks_flags_and_data_before_loading(tiny_dir, tmp_path, monkeypatch, capsys):
    """Bad flags and bad data lines are refused with exit 2 before the student is loaded or --out is created."""
    student = str(tiny_dir("qwen2"))
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES))
    bad = tmp_path / "bad.jsonl"  # a malformed sixth line: every line is checked, not only the first
    bad.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES[:5]) + '{"messages": []}\n')
    loaded = []
    monkeypatch.setattr(pktjax.checkpoint, "load_model", lambda *a, **k: loaded.append(a))
    out = tmp_path / "run"
    cases = [(["--task", str(data), "--rank", "0"], "rank"),
             (["--task", str(data), "--micro-batch", "0"], "micro_batch"),
             (["--task", str(data), "--batch-size", "6", "--micro-batch", "4"], "multiple of micro_batch"),
             (["--task", str(data), "--limit", "0"], "flag.limit = 0: must be >= 1"),
             (["--task", str(data), "--seed-samples", "0"], "--seed-samples = 0: must be >= 1"),
             (["--task", str(data), "--targets", "q_proj", "nope"], "nope"),
             (["--task", str(data), "--init", "seeking"], "needs --teacher"),
             (["--task", str(bad)], "bad.jsonl:6"),
             (["--task", str(tmp_path / "missing.jsonl")], "missing.jsonl: no such data file"),
             (["--task", str(data), "--student", str(tmp_path / "no-student")], "no-student")]
    for flags, message in cases:
        capsys.readouterr()
        assert main(["lora", "train", "--student", student, "--out", str(out), "--no-progress", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert "pktjax: error:" in err and message in err and "Traceback" not in err, (flags, err)
        assert not out.exists() and loaded == [], flags


class _Loaded(Exception):
    """Raised by a patched model loader: the command got past its checks."""


def _no_load(*a, **k):
    raise _Loaded


def test_train_refuses_an_out_with_other_settings_before_loading(tiny_dir, tmp_path, monkeypatch, capsys):
    """An --out whose train_config.json records other settings is refused with exit 2 (the folder, each differing
    setting, the fix) before any model loads; the recorded settings (the rank taken from a seeking:PATH adapter
    when --rank is left out; a setting that cannot change the results may differ) get past the check to the
    loader."""
    from pktjax.lora_train import CONFIG_FILE
    from pktjax.runfolder import write_json
    from pktjax.settings import LoraTrainConfig

    student = str(tiny_dir("qwen2"))
    model = pktjax.load_model(student)
    _, lora = L.init(model.params, model.config, 4, 4.0, ("q_proj", "v_proj"), "default", key=jax.random.key(0))
    adapter = L.export_peft(lora, model.config, tmp_path / "adapter", alpha=4.0)
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps(ex) + "\n" for ex in EXAMPLES))
    out = tmp_path / "run"
    out.mkdir()
    write_json(out / CONFIG_FILE, {**dataclasses.asdict(LoraTrainConfig(rank=4, epochs=1)), "examples": 8},
               checksum=True)
    monkeypatch.setattr(pktjax.checkpoint, "load_model", _no_load)
    common = ["lora", "train", "--student", student, "--task", str(data), "--out", str(out), "--no-progress"]
    cases = [(["--rank", "8", "--epochs", "1"], ["rank 4 there, 8 now"]),
             (["--rank", "4", "--epochs", "1", "--limit", "5"], ["examples 8 there, 5 now"]),
             (["--init", f"seeking:{adapter}"], ["epochs 1 there, 3 now"]),
             ([], ["epochs 1 there, 3 now", "rank 4 there, 16 now"])]
    for flags, messages in cases:
        capsys.readouterr()
        assert main([*common, *flags]) == 2, flags
        err = capsys.readouterr().err
        assert f"pktjax: error: {out} holds a run with different settings" in err and "new --out" in err, err
        assert all(m in err for m in messages) and "Traceback" not in err, (flags, err)
    for flags in (["--rank", "4", "--epochs", "1"], ["--init", f"seeking:{adapter}", "--epochs", "1"],
                  ["--rank", "4", "--epochs", "1", "--save-every", "1"]):  # extra checkpoints: results unchanged
        with pytest.raises(_Loaded):
            main([*common, *flags])
