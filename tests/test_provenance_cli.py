"""Provenance in reports and transfer.json (against independent hashes and git), the CLI's --version,
``python -m pktjax``, defaults in every --help, one task naming scheme and list syntax, and plain progress lines."""

import argparse
import hashlib
import io
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import jax
import pytest

import pktjax

from pktjax.cli import build_parser, main
from pktjax.commands import list_argument
from pktjax.evaluate import evaluate
from pktjax.progress import PlainProgress, progress_bar
from pktjax.provenance import config_hash, provenance
from pktjax.tasks import benchmark_name, data_name, get_task, humaneval

ROOT = Path(__file__).resolve().parent.parent


def test_provenance_records_versions_commit_devices_and_hashes(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"a": 1}\n')
    rec = provenance({"b": 2, "a": [1, 2]}, [data, tmp_path / "missing.jsonl"])
    assert rec["packages"]["jax"] == metadata.version("jax") == jax.__version__
    assert rec["packages"]["flax"] == metadata.version("flax") and rec["packages"]["optax"] == metadata.version("optax")
    assert rec["packages"]["jaxlib"] == metadata.version("jaxlib")
    assert rec["data_sha256"] == {str(data): hashlib.sha256(b'{"a": 1}\n').hexdigest(),
                                  str(tmp_path / "missing.jsonl"): None}
    assert rec["config_sha256"] == hashlib.sha256(b'{"a": [1, 2], "b": 2}').hexdigest()
    assert config_hash({"a": [1, 2], "b": 2}) == rec["config_sha256"] != config_hash({"a": [1, 2], "b": 3})
    assert sum(rec["devices"]["kinds"].values()) == len(jax.devices())
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert rec["git"]["commit"] == head.stdout.strip() and isinstance(rec["git"]["dirty"], bool)
    data.write_bytes(b"changed\n")  # a changed file is hashed again
    assert provenance(None, [data])["data_sha256"][str(data)] == hashlib.sha256(b"changed\n").hexdigest()


def test_evaluation_reports_and_transfer_json_carry_provenance(tmp_path):
    problems = humaneval.load(limit=2)
    rep = evaluate(None, "humaneval", limit=2, generator=lambda ps, n, s: [p["canonical_solution"] for p in problems])
    (path, digest), = rep["provenance"]["data_sha256"].items()
    assert path.endswith("HumanEval.jsonl.gz") and digest == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    assert rep["provenance"]["config_sha256"] == config_hash(rep["settings"])

    import yaml

    from pktjax.transfer import read_config
    from pktjax.transfer.stages import _claim_output

    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump({"teacher": "tiny:hidden=48", "student": "tiny:hidden=32", "task": "gsm8k",
                                        "out": str(tmp_path / "run")}))
    cfg = read_config(cfg_path)
    assert cfg.task == "gsm" and cfg.eval_task == "gsm8k"  # one naming scheme: gsm8k is gsm
    _claim_output(cfg)
    rec = json.loads((tmp_path / "run" / "transfer.json").read_text())["provenance"]
    assert rec["config_sha256"] == config_hash(cfg.raw) and rec["pktjax"]
    assert sorted(Path(p).name for p in rec["data_sha256"]) == [*(f"gsm_{s}_split.jsonl"
                                                                  for s in ("align", "extract", "train")),
                                                                "test.jsonl"]  # the LaTen splits, the test set


def _sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _check_software(rec):
    assert rec["pktjax"] == pktjax.__version__
    assert {k: rec["packages"][k] for k in ("jax", "jaxlib", "flax", "optax")} == {
        k: metadata.version(k) for k in ("jax", "jaxlib", "flax", "optax")}
    assert sum(rec["devices"]["kinds"].values()) == len(jax.devices())


def test_lora_metrics_scores_and_analysis_carry_provenance(tiny_dir, tmp_path, monkeypatch):
    """The first metrics line of each start of a LoRA run, scores.json and analysis.json record the software, the
    devices, the config's hash and the data files' hashes (against hashlib and metadata, independently)."""
    import yaml

    from pktjax.cli import main as cli
    from pktjax.runfolder import FaultInjected, read_jsonl

    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Add {i} and 1."},
                                                     {"role": "assistant", "content": str(i + 1)}]}) + "\n"
                            for i in range(8)))
    student = str(tiny_dir("qwen2"))
    out = tmp_path / "lora"
    train = ["lora", "train", "--student", student, "--task", str(data), "--out", str(out), "--epochs", "2",
             "--batch-size", "4", "--micro-batch", "4", "--rank", "2", "--no-progress"]
    monkeypatch.setenv("PKTJAX_FAULT", "lora:after-metrics@3=raise")  # dies after step 3 (checkpoint: step 2)
    with pytest.raises(FaultInjected):
        cli(train)
    monkeypatch.delenv("PKTJAX_FAULT")
    assert cli(train) == 0
    lines = read_jsonl(out / "metrics.jsonl")
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    # once per start: on the first line of the first run and on the first step the resumed run redid
    assert ["provenance" in m for m in lines] == [True, False, True, False]
    rec = lines[0]["provenance"]
    _check_software(rec)
    assert rec["data_sha256"] == {str(data): _sha(data)}
    record = json.loads((out / "train_config.json").read_text())
    assert rec["config_sha256"] == config_hash(record)

    transfer_cfg = tmp_path / "cfg.yaml"
    transfer_cfg.write_text(yaml.safe_dump({"teacher": "tiny:hidden=48,layers=2,inter=64,heads=4,seed=1",
                                            "student": "tiny:hidden=32,layers=2,inter=48,heads=4,seed=2",
                                            "task": "mmlu", "eval": {"limit": 2, "batch_size": 2},
                                            "laten": {"seeds": []}, "out": str(tmp_path / "run"),
                                            "analysis": {"n_examples": 2, "rank": 2, "batch_size": 2,
                                                         "cutoff_len": 64, "max_tokens": 64, "seeking": False}}))
    assert cli(["transfer", str(transfer_cfg)]) == 0
    scores = json.loads((tmp_path / "run" / "scores.json").read_text())["provenance"]
    marker = json.loads((tmp_path / "run" / "transfer.json").read_text())
    _check_software(scores)
    assert scores["config_sha256"] == config_hash(marker["config"]) == marker["provenance"]["config_sha256"]
    files = {Path(p).name: d for p, d in scores["data_sha256"].items()}
    assert set(files) == {"mmlu_extract_split.jsonl", "mmlu_align_split.jsonl", "mmlu_train_split.jsonl",
                          "test.jsonl"}  # the LaTen splits (the train split is the probe set too), the test set
    assert all(d == _sha(p) for p, d in scores["data_sha256"].items())
    analysis = json.loads((tmp_path / "run" / "analysis" / "analysis.json").read_text())["provenance"]
    _check_software(analysis)
    (probe, digest), = analysis["data_sha256"].items()
    assert Path(probe).name == "mmlu_train_split.jsonl" and digest == _sha(probe)
    assert analysis["config_sha256"] != config_hash(None)


def test_version_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("pktjax 0.1.0")
    run = subprocess.run([sys.executable, "-m", "pktjax", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.startswith("pktjax ")


def _options(parser, name="pktjax"):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _options(p, f"{name} {sub}")
        elif action.option_strings:
            yield name, parser, action


def test_every_help_shows_every_default():
    missing = []
    for name, parser, action in _options(build_parser()):
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            continue
        text = parser.formatter_class("x")._get_help_string(action) if action.help else ""
        if "default" not in text:
            missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []
    eval_parser = next(p for n, p, a in _options(build_parser()) if n == "pktjax eval")
    assert "(default: 0.8)" in " ".join(eval_parser.format_help().split())


def test_flags_from_settings_keep_their_names_and_ranges(tmp_path, monkeypatch, capsys):
    """Flags generated from the typed settings keep their names (--seed-samples for a section's ``samples``,
    plan's --p-examples for ``examples_per_step``), defaults and switches, and each range is checked before any
    model is read: a flag spelled otherwise than its setting is named as typed."""
    import pktjax.checkpoint
    from pktjax.settings import AlignerTrainConfig, AnalysisSettings, SeekingSettings, SemalignSettings

    parser = build_parser()
    lora = ["lora", "train", "--student", "s", "--task", "gsm", "--out", str(tmp_path / "o")]
    semalign = ["semalign", "train", "--teacher", "t", "--student", "s", "--task", "gsm", "--out", str(tmp_path / "o")]
    analyze = ["analyze", "--teacher", "t", "--student", "s", "--task", "gsm", "--out", str(tmp_path / "o")]
    extract = ["seeking", "extract", "--teacher", "t", "--student", "s", "--task", "gsm", "--out", str(tmp_path / "o")]
    assert parser.parse_args(lora).samples == SeekingSettings.samples == 32
    assert parser.parse_args([*lora, "--seed-samples", "5", "--limit", "7"]).samples == 5
    sem = parser.parse_args(semalign)
    assert (sem.samples, sem.cka) == (SemalignSettings.samples, 0) == (32, 0)
    assert (parser.parse_args([*semalign, "--seed-samples", "3", "--cka", "2"]).cka) == 2
    plan = parser.parse_args(["plan", "--teacher", "a", "--student", "b", "--p-examples", "8"])
    assert plan.examples_per_step == 8 and parser.parse_args(["plan", "c.yaml"]).examples_per_step is None
    an = parser.parse_args(analyze)
    assert (an.seeking, an.full_heatmap, an.n_examples) == (True, False, AnalysisSettings.n_examples)
    assert parser.parse_args([*analyze, "--no-seeking", "--full-heatmap"]).seeking is False
    assert AlignerTrainConfig.examples_per_step == 16

    def no_model(*a, **k):
        raise AssertionError("a model was read")

    monkeypatch.setattr(pktjax.checkpoint, "read_model_config", no_model)
    monkeypatch.setattr(pktjax.checkpoint, "load_model", no_model)
    for argv, message in (([*lora, "--seed-samples", "0"], "--seed-samples = 0: must be >= 1"),
                          ([*semalign, "--seed-samples", "0"], "--seed-samples = 0: must be >= 1"),
                          ([*semalign, "--cka", "-1"], "flag.cka = -1: must be >= 0"),
                          ([*extract, "--rank", "0"], "flag.rank = 0: must be >= 1"),
                          ([*extract, "--samples", "0"], "flag.samples = 0: must be >= 1"),
                          ([*analyze, "--n-examples", "0"], "flag.n_examples = 0: must be >= 1"),
                          ([*analyze, "--modules", ","], "modules: name at least one module")):
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
        assert not (tmp_path / "o").exists()


def test_task_names_and_list_options_are_spelled_alike():
    assert benchmark_name("gsm") == benchmark_name("gsm8k") == "gsm8k" and get_task("gsm").__name__.endswith("gsm8k")
    assert data_name("gsm8k") == data_name("gsm") == "gsm" and data_name("runs/x.jsonl") == "runs/x.jsonl"
    parser = build_parser()
    for spelled in ("gsm", "gsm8k"):
        assert parser.parse_args(["eval", "--model", "m", "--task", spelled]).task == "gsm8k"
        args = parser.parse_args(["laten", "train", "--teacher", "t", "--student", "s", "--task", spelled,
                                  "--out", "o", "--modules", "up_proj,down_proj", "v_proj"])
        assert args.task == "gsm" and args.modules == ("up_proj", "down_proj", "v_proj")
    targets = parser.parse_args(["seeking", "extract", "--teacher", "t", "--student", "s", "--task", "gsm",
                                 "--out", "o", "--targets", "q_proj", "k_proj,v_proj"]).targets
    assert targets == ("q_proj", "k_proj", "v_proj")
    p = argparse.ArgumentParser()
    list_argument(p, "--k", item=int)
    assert p.parse_args(["--k", "1,10", "100"]).k == (1, 10, 100)
    with pytest.raises(SystemExit):
        p.parse_args(["--k", "one"])


def test_progress_in_a_log_file_is_plain_lines_with_total_and_eta(monkeypatch):
    stream = io.StringIO()  # not a terminal
    bar = progress_bar(20, "eval student", "ex", stream=stream)
    assert isinstance(bar, PlainProgress)
    with bar:
        for _ in range(20):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 10  # one line per 10% of the total
    assert lines[0].startswith("eval student: 2/20 ex (10%)") and "ETA" in lines[0]
    assert lines[-1].startswith("eval student: 20/20 ex (100%)")
    quiet = io.StringIO()
    with progress_bar(5, "x", stream=quiet, enabled=False) as off:
        off.update(5)
    assert quiet.getvalue() == ""
    resumed = io.StringIO()
    with progress_bar(4, "lora", "step", initial=3, stream=resumed) as bar:
        bar.set_postfix(loss="0.5")
        bar.update(1)
    assert resumed.getvalue().strip().startswith("lora: 4/4 step (100%)") and "loss=0.5" in resumed.getvalue()
