"""The main job end to end on a random tiny pair, its resumption, and its refusals of bad configs."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from matplotlib.image import imread

from experiments.collect_results import collect, restore
from pktjax.checkpoint import load_model
from pktjax.cli import main
from pktjax.errors import CheckpointError, ConfigError, PairError
from pktjax.settings import SEMALIGN_TARGETS, AlignerTrainConfig, LatenSettings
from pktjax.transfer import read_config, run_transfer, vs_student
from pktjax.transfer.models import resolve_model
from pktjax.transfer.stages import _evaluate

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
    assert "Interim report" not in text and "left" not in scores  # the finished run's report
    # the injected deltas' size: recorded by the fuse, next to the score, in its own section and in a figure
    delta = scores["rows"][2]["delta"]
    assert delta == json.loads((out / "laten" / "seed1" / "step0" / "injection.json").read_text())["delta"]
    assert f"| {delta['all']['relative']:.2e} |" in text and "## Size of the injected deltas" in text
    # two panels (6.4 inches tall at 110 dpi): the score, and the share of outputs unlike the base student's
    assert imread(out / "delta_vs_score.png").shape[0] == round(6.4 * 110)
    base, laten = scores["rows"][0], scores["rows"][2]  # the paired comparison agrees with the scores
    v = laten["vs_student"]
    assert v["n"] == 6 and v["gained"] - v["lost"] == round(6 * (laten["score"] - base["score"]))
    assert "vs_student" not in base and "## Against the base student, example by example" in text
    # a rerun resumes: nothing is recomputed and the numbers are identical
    stamp = (out / "eval" / "student.json").stat().st_mtime_ns
    run_transfer(read_config(path))
    assert (out / "eval" / "student.json").stat().st_mtime_ns == stamp
    again = json.loads((out / "scores.json").read_text())
    assert again["rows"] == scores["rows"]
    # the stages' seconds are kept across runs: the rerun adds its (short) checks to them
    first, second = scores["timings"], again["timings"]
    assert first["eval teacher"] > 0 and second["eval teacher"] >= first["eval teacher"]
    assert second["total"] == pytest.approx(sum(v for k, v in second.items() if k != "total"))
    assert json.loads((out / "timings.json").read_text())["eval teacher"] == second["eval teacher"]
    assert not list(out.rglob("*.partial.jsonl"))  # finished evaluations leave no partial file
    # a run folder kept without its aligner checkpoints (the small files only) still reports the fused step
    shutil.rmtree(out / "laten" / "seed1" / "aligner")
    stamp = (out / "laten" / "seed1" / "step0" / "eval.json").stat().st_mtime_ns
    run_transfer(read_config(path))
    assert json.loads((out / "scores.json").read_text())["rows"] == scores["rows"]
    assert (out / "laten" / "seed1" / "step0" / "eval.json").stat().st_mtime_ns == stamp
    # a results folder restored on a machine that never held the run resumes it: nothing is evaluated again ...
    collect(out, tmp_path / "results")
    shutil.rmtree(out)
    restore(tmp_path / "results", out)
    stamps = {p: p.stat().st_mtime_ns for p in [*out.rglob("eval.json"), *(out / "eval").glob("*.json")]}
    run_transfer(read_config(path))
    assert json.loads((out / "scores.json").read_text())["rows"] == scores["rows"]
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # (no seed has a step left, so neither model was located again)
    assert not (out / "attribution_cache").exists() and not (out / "laten" / "located.json").exists()
    # ... and a fused step still to do, whose aligner checkpoint did not come back, trains the aligner again
    shutil.rmtree(out / "laten" / "seed1" / "step0")
    run_transfer(read_config(path))
    rows = json.loads((out / "scores.json").read_text())["rows"]
    assert rows[2]["score"] == scores["rows"][2]["score"]
    assert rows[2]["delta"]["all"]["rms"] == pytest.approx(scores["rows"][2]["delta"]["all"]["rms"], rel=1e-5)
    assert (out / "laten" / "seed1" / "aligner" / "log.jsonl").is_file()
    assert (out / "laten" / "located.json").is_file()


def test_vs_student_counts_each_example_against_the_base_student(tmp_path):
    def report(name, rows):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"records": [{"id": i, "output": o, "correct": c} for i, o, c in rows]}))
        return path

    base = report("base", [("a", "x", True), ("b", "y", False), ("c", "z", False), ("d", "w", True)])
    new = report("new", [("b", "y2", True), ("a", "x", True), ("d", "w2", False), ("c", "z2", True)])
    assert vs_student(base, new) == {"gained": 2, "lost": 1, "changed": 3, "n": 4, "p": 1.0}
    assert vs_student(base, report("fewer", [("a", "x", True)])) is None  # other examples: no pairing


def test_sigterm_ends_a_stage_with_its_seconds_recorded(tmp_path):
    """``timeout`` or a scheduler's SIGTERM stops the run like Ctrl-C: the interrupted stage keeps its time."""
    import os
    import signal
    import time

    from pktjax.commands.transfer import exit_on_sigterm
    from pktjax.transfer import _timed

    cfg = read_config(_config(tmp_path))
    cfg.out.mkdir(parents=True)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, exit_on_sigterm():
        _timed(cfg, {}, "eval student", lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert json.loads((cfg.out / "timings.json").read_text())["eval student"] > 0
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is gone after the block


def test_bad_configs_fail_before_heavy_work(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        run_transfer(read_config(_config(tmp_path, teacher=str(tmp_path / "missing"))))
    with pytest.raises(ConfigError, match="no LaTen splits"):
        read_config(_config(tmp_path, task="super_ni"))
    with pytest.raises(PairError, match="is not larger than the student"):
        run_transfer(read_config(_config(tmp_path, teacher=STUDENT, student=TEACHER, out=str(tmp_path / "r2"))))
    assert not (tmp_path / "r2").exists()  # the pair is checked from configs, before the output folder
    other = tmp_path / "r3"
    run_transfer_claim = read_config(_config(tmp_path, out=str(other)))
    other.mkdir()
    (other / "transfer.json").write_text(json.dumps({"fingerprint": "another"}))
    with pytest.raises(ConfigError, match="another config"):
        run_transfer(run_transfer_claim)
    assert not (other / "eval").exists()
    for laten, match in (({"steps": 2, "fuse_steps": [0, 2]}, "stops before"), ({"fuse_steps": "first"}, "fuse_steps"),
                         ({"lr": [1e-3, 1e-3]}, "distinct"), ({"lr": []}, "lr")):
        with pytest.raises(ConfigError, match=match):
            read_config(_config(tmp_path, laten=laten))


def test_several_learning_rates_share_one_report(tmp_path):
    """``lr: [a, b]``: one aligner run per rate and seed under ``laten/lr<rate>/``, one base evaluation, rows
    named by their rate; a ten times larger rate injects larger deltas (the output of ``W2 relu(W1 x)`` moves
    with both matrices)."""
    laten = {"seeds": [1], "steps": 1, "cutoff_len": 96, "examples_per_step": 2, "micro_batch": 2, "lr": [1e-3, 1e-4]}
    path = _config(tmp_path, laten=laten, eval={"limit": 2, "batch_size": 2})
    out = run_transfer(read_config(path)).parent
    rows = json.loads((out / "scores.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["base student", "base teacher", "LaTen lr 0.001", "LaTen lr 0.0001"]
    assert [r["lr"] for r in rows[2:]] == [1e-3, 1e-4]
    for sub in ("lr0.001", "lr0.0001"):
        assert (out / "laten" / sub / "seed1" / "step0" / "eval.json").is_file()
    assert not (out / "laten" / "seed1").exists()
    big, small = (r["delta"]["all"]["relative"] for r in rows[2:])
    assert big > 10 * small > 0
    timings = json.loads((out / "timings.json").read_text())
    assert {"laten lr 0.001 seed 1", "laten lr 0.0001 seed 1"} <= set(timings)


LORA = {"seeds": [1], "rank": 2, "epochs": 1, "batch_size": 2, "micro_batch": 2, "cutoff_len": 64, "limit": 4}
ALL_METHODS = {"laten": {"seeds": []}, "seeking": {**LORA, "samples": 2}, "lora": LORA, "pissa": LORA,
               "analysis": {"n_examples": 2, "rank": 2, "batch_size": 2, "cutoff_len": 64, "max_tokens": 128}}


def _without_paths(rows):
    return [{k: v for k, v in r.items() if k != "report"} for r in rows]


def test_seeking_lora_pissa_analysis_reproduce_and_resume(tmp_path, monkeypatch):
    path = _config(tmp_path, **ALL_METHODS)
    assert main(["transfer", str(path)]) == 0
    out = tmp_path / "run"
    rows = json.loads((out / "scores.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["base student", "base teacher", "Seeking", "LoRA", "PiSSA"]
    for row in rows[2:]:  # each trained student traces to its records and its PEFT adapter
        report = json.loads(open(row["report"]).read())
        assert len(report["records"]) == 6 and row["seed"] == 1 and row["step"] is None
        assert Path(row["report"]).parent == out / row["method"].lower() / "seed1"
        assert (Path(row["report"]).parent / "adapter" / "adapter_model.safetensors").is_file()
        assert report["settings"]["model"] == str(Path(row["report"]).parent / "adapter")
    assert (out / "seeking" / "extracted" / "extraction.json").is_file()
    analysis = json.loads((out / "analysis" / "analysis.json").read_text())
    assert set(analysis["parametric"]) == {"PiSSA", "Seeking"}  # Seeking's extraction reused
    text = (out / "report.md").read_text()
    for needle in ("| Seeking | 1 | — |", "| LoRA | 1 | — |", "| PiSSA | 1 | — |", "## Spread over seeds",
                   "![representation cka](analysis/representation_cka.png)",
                   "![parametric similarity](analysis/parametric_similarity.png)", "### Parametric similarity"):
        assert needle in text
    assert (out / "analysis" / "representation_cka.png").stat().st_size > 0

    # the same config and seeds into another folder: identical scores
    run_transfer(read_config(path, out=str(tmp_path / "again")))
    again = json.loads((tmp_path / "again" / "scores.json").read_text())["rows"]
    assert _without_paths(again) == _without_paths(rows)

    # resume with one stage marker deleted: only that stage runs again, with the same result
    evals = {p: p.stat().st_mtime_ns for p in out.glob("*/**/eval.json")} | {
        p: p.stat().st_mtime_ns for p in (out / "eval").glob("*.json")}
    (out / "pissa" / "seed1" / "eval.json").unlink()
    stamp = (out / "analysis" / "analysis.json").stat().st_mtime_ns
    run_transfer(read_config(path))
    assert json.loads((out / "scores.json").read_text())["rows"] == rows
    assert (out / "analysis" / "analysis.json").stat().st_mtime_ns == stamp
    changed = {p for p, t in evals.items() if not p.is_file() or p.stat().st_mtime_ns != t}
    assert changed == {out / "pissa" / "seed1" / "eval.json"}

    # a run stopped between stages (here in the analysis) leaves a report of the stages it finished, marked interim
    from pktjax.transfer import stages

    (out / "pissa" / "seed1" / "eval.json").unlink()
    (out / "report.md").unlink()

    def stop(*args):
        raise SystemExit(143)

    monkeypatch.setattr(stages, "_analysis", stop)
    with pytest.raises(SystemExit):
        run_transfer(read_config(path))
    interim = json.loads((out / "scores.json").read_text())
    assert interim["rows"] == rows and interim["left"] == ["analysis"]
    text = (out / "report.md").read_text()
    assert "**Interim report**: the run has stages left (analysis)" in text and "| PiSSA | 1 | — |" in text
    assert "### Parametric similarity" not in text
    monkeypatch.undo()
    run_transfer(read_config(path))  # the rerun finishes it: the full report, no stage left
    final = json.loads((out / "scores.json").read_text())
    assert final["rows"] == rows and "left" not in final
    assert "Interim report" not in (out / "report.md").read_text()


def test_bad_sections_and_models_fail_early(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown `lora` key\(s\) 'epoch'; allowed: seeds, rank"):
        read_config(_config(tmp_path, lora={"epoch": 3}))
    with pytest.raises(ConfigError, match=r"unknown `analysis` key.*allowed: metric"):
        read_config(_config(tmp_path, analysis={"metrics": "cka"}))
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) 'lora_baseline'"):
        read_config(_config(tmp_path, lora_baseline={}))
    with pytest.raises(ConfigError, match="bad `pissa` section: bad LoRA training config"):
        read_config(_config(tmp_path, pissa={"batch_size": 3, "micro_batch": 2}))
    with pytest.raises(ConfigError, match="unknown LoRA target"):
        read_config(_config(tmp_path, seeking={"targets": ["qkv"]}))
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("PKTJAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set"):  # a hub id, offline: never the network
        run_transfer(read_config(_config(tmp_path, teacher="meta-llama/Llama-2-13b-chat-hf", out=str(tmp_path / "h"))))
    with pytest.raises(CheckpointError, match="pktjax models install qwen2.5-coder"):
        run_transfer(read_config(_config(tmp_path, student="registry:qwen2.5-coder/student", out=str(tmp_path / "r"))))
    with pytest.raises(CheckpointError, match="unknown packaged model"):
        run_transfer(read_config(_config(tmp_path, student="registry:qwen2.5-coder/tiny", out=str(tmp_path / "r2"))))


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[1] / "experiments" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(config, tmp_path):
    cfg = read_config(config, out=str(tmp_path / "run"))
    assert cfg.teacher and cfg.student and cfg.task
    assert cfg.laten.seeds or any(getattr(cfg, name) for name in ("seeking", "lora", "pissa", "semalign"))


def test_semalign_section_runs_beside_lora_and_resumes(tmp_path):
    sem = {**LORA, "samples": 2, "seeds": [1, 2], "cutoff_len": 1024}  # MMLU prompts: ~1000 byte tokens
    path = _config(tmp_path, laten={"seeds": []}, lora=LORA, semalign=sem,
                   analysis={"n_examples": 2, "rank": 2, "batch_size": 2, "cutoff_len": 64, "max_tokens": 128,
                             "seeking": False})
    sem = read_config(path).semalign
    assert sem.lr is None  # null: the paper's rate for the task, 3e-4 for tasks other than HumanEval
    assert sem.trainer(1, "mmlu").lr == 3e-4
    assert main(["transfer", str(path)]) == 0
    out = tmp_path / "run"
    rows = json.loads((out / "scores.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["base student", "base teacher", "LoRA", "SemAlign", "SemAlign"]
    for row in rows[3:]:
        folder = Path(row["report"]).parent
        assert folder == out / "semalign" / f"seed{row['seed']}" and row["vs_student"]["n"] == 6
        assert (folder / "adapter" / "adapter_model.safetensors").is_file()
        assert (folder / "alignment_cka.png").is_file()
        assert all(json.loads(x)["tokens"] > 0 for x in (folder / "metrics.jsonl").read_text().splitlines())
        assert json.loads(open(row["report"]).read())["settings"]["model"] == str(folder / "adapter")
    plan = json.loads((out / "semalign" / "plan.json").read_text())  # one attribution for both seeds
    assert plan["samples"] == 2 and len(plan["scores"]) == 3
    assert (out / "semalign" / "alignment_map_paper.npy").is_file()
    text = (out / "report.md").read_text()
    for needle in ("| SemAlign | 1 | — |", "| SemAlign | 2 | — |", "## SemAlign: CKA",
                   "![seed1](semalign/seed1/alignment_cka.png)"):
        assert needle in text
    (out / "semalign" / "seed2" / "eval.json").unlink()  # resumed: the same score again
    run_transfer(read_config(path))
    assert json.loads((out / "scores.json").read_text())["rows"] == rows


def test_semalign_cka_probes_the_first_training_examples(tmp_path, monkeypatch):
    """``semalign.cka: N`` views the trained layer on the first N training examples; without it the analysis
    section's probe examples are used, and with neither there is no view."""
    from pktjax.transfer import stages

    class Called(Exception):
        pass

    def fake(teacher, student, seeds, examples, folder, tc, sc, *, probe, **kw):
        raise Called(examples, probe)

    monkeypatch.setattr(stages, "train_semalign", fake)
    monkeypatch.setattr(stages, "_semalign_seeds", lambda cfg: [])
    analysis = {"n_examples": 2, "seeking": False}
    for over, want in (({"semalign": {"cka": 3}, "analysis": analysis}, "train3"),
                       ({"semalign": {}, "analysis": analysis}, "probe2"), ({"semalign": {}}, None)):
        cfg = read_config(_config(tmp_path, **over))
        with pytest.raises(Called) as e:
            stages._semalign_seed(cfg, Path("t"), Path("s"), 1, stages.Tracker())
        examples, probe = e.value.args
        expected = {"train3": examples[:3], "probe2": stages.probe_examples("mmlu", 2), None: None}[want]
        assert probe == expected and (probe is None or len(probe) == int(want[-1]))


def test_bad_semalign_sections_fail_early(tmp_path):
    cfg = read_config(_config(tmp_path, task="humaneval", semalign={}))
    assert cfg.semalign.trainer(1, cfg.task).lr == 3e-5 and cfg.semalign.trainer(1, cfg.task).epochs == 5
    assert cfg.semalign.targets == SEMALIGN_TARGETS
    assert read_config(_config(tmp_path, semalign={"lr": 1e-3})).semalign.trainer(1, "humaneval").lr == 1e-3
    for bad, match in (({"mode": "full"}, "semalign.mode = 'full': choose one of lora, weights"),
                       ({"compare": "attn"}, "semalign.compare = 'attn': choose one of ffn, update, residual"),
                       ({"frame": "tight"}, "semalign.frame = 'tight': choose one of paper, dual"),
                       ({"layer": 0}, "semalign.layer = 0: must be >= 1"),
                       ({"lr": 0}, "semalign.lr = 0.0: must be > 0"),
                       ({"targets": []}, "semalign.targets: name at least one matrix"),
                       ({"targets": ["lm_head"]}, "targets \\['lm_head'\\]: name one or more of"),
                       ({"targets": ["qkv"]}, "unknown LoRA target"), ({"batch_size": 3}, "multiple of micro")):
        with pytest.raises(ConfigError, match=rf"bad `semalign` section: .*{match}"):
            read_config(_config(tmp_path, semalign=bad))


    assert cfg.laten.seeds or any(getattr(cfg, name) for name in ("seeking", "lora", "pissa"))


@pytest.mark.parametrize("override, message", [
    ("eval.batch_size=eight", "eval.batch_size = 'eight': must be an integer"),
    ("eval.batch_size=0", "eval.batch_size = 0: must be >= 1"),
    ("eval.limit=-5", "eval.limit = -5: must be >= 1"),
    ("eval.limit=0", "eval.limit = 0: must be >= 1"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens = 0: must be >= 1"),
    ("eval.few_shot=-1", "eval.few_shot = -1: must be >= 0"),
    ("eval.task=foo", "eval.task = 'foo': choose one of gsm8k"),
    ("task=foo", "task 'foo' has no LaTen splits"),
    ("laten.rate=2.0", "laten.rate = 2.0: must be > 0 and <= 1"),
    ("laten.steps=-1", "laten.steps = -1: must be >= 1"),
    ("laten.steps=100000", "laten.steps = 100000: must be <= "),
    ("laten.micro_batch=0", "laten.micro_batch = 0: must be >= 1"),
    ("laten.layers=99", "layers=99: K must be between 1 and 2"),
    ("laten.cutoff_len=0", "laten.cutoff_len = 0: must be >= 1"),
    ("laten.examples_per_step=0", "laten.examples_per_step = 0: must be >= 1"),
    ("laten.fuse_steps=[1]", "fuse_steps = \\[1\\] names a step the run stops before"),
    ("laten.lr=[1e-3, 1e-3]", "laten.lr = \\[0.001, 0.001\\]: give one rate or a list of distinct rates"),
    ("eval.prompt_format=html", "eval.prompt_format = 'html': choose one of paper, chat_template"),
    ("laten.fuse_steps=first", "fuse_steps = 'first': choose all, last"),
    ("laten.seeds=[true]", "laten.seeds\\[0\\] = True: must be an integer"),
    ("laten.seeds=5", "laten.seeds = 5: must be a list of integers"),
    ("laten.lr=fast", "laten.lr = 'fast': must be a number"),
    ("lora.rank=0", "lora.rank = 0: must be >= 1"),
    ("semalign.cka=-1", "semalign.cka = -1: must be >= 0"),
    ("seeking.teacher_dtype=float16", "teacher_dtype = 'float16': choose one of float32, bfloat16"),
    ("analysis.metric=l2", "analysis.metric = 'l2': choose one of cka"),
    ("teacher=tiny:hidden=abc", "tiny:hidden=abc: invalid literal"),
    ("laten.nope=1", "unknown `laten` key\\(s\\) 'nope'"),
    ("laten", "write key=value or section.key=value"),
])
def test_bad_values_exit_2_before_any_work(tmp_path, capsys, override, message):
    """Every bad setting is refused by the command line with exit code 2 and a message naming the key and the
    allowed values, before a model is built and before the output folder exists."""
    path = _config(tmp_path)
    assert main(["transfer", str(path), override]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "run").exists()


def test_unreadable_configs_exit_2(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("teacher: [unclosed\n")
    assert main(["transfer", str(bad_yaml)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("teacher: caf\xe9\n".encode("latin-1"))
    assert main(["transfer", str(latin1)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_overrides_and_print_config(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["transfer", str(path), "laten.lr=3e-4", "eval.limit=3", "laten.seeds=[4, 5]",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["laten"]["lr"] == 3e-4 and printed["laten"]["seeds"] == [4, 5]
    assert printed["eval"] == {"task": None, "limit": 3, "max_new_tokens": None, "batch_size": 6, "few_shot": 0,
                               "prompt_format": "paper", "matmul_dtype": None}
    assert printed["laten"]["rate"] == LatenSettings.rate == AlignerTrainConfig.rate  # one default, filled in
    assert not (tmp_path / "run").exists()
    cfg = read_config(path, overrides=["laten.lr=3e-4"])
    assert cfg.laten.lr == 3e-4 and cfg.raw["laten"]["lr"] == "3e-4"  # YAML 1.1 reads 3e-4 as text
    assert cfg.fingerprint() != read_config(path).fingerprint()


def test_result_neutral_settings_do_not_change_the_fingerprint(tmp_path):
    path = _config(tmp_path)
    base = read_config(path)
    assert read_config(path, overrides=["eval.batch_size=2"]).fingerprint() == base.fingerprint()
    assert read_config(path, overrides=["eval.limit=2"]).fingerprint() != base.fingerprint()
    # which seeds and checkpoints a run makes does not change any one of them: a run may grow or shrink them
    for change in ("laten.seeds=[42,7]", "laten.fuse_steps=[0]", "laten.steps=1"):
        assert read_config(path, overrides=[change]).fingerprint() == base.fingerprint(), change
    assert read_config(path, overrides=["laten.rate=0.2"]).fingerprint() != base.fingerprint()
    # a run recorded with the fingerprint of the whole config as written is still resumed
    assert base.legacy_fingerprint() != base.fingerprint()
    assert base.resumes({"fingerprint": base.legacy_fingerprint()})
    # LaTen's micro-batch is a memory knob; a run recorded while it still counted (its marker holds a fingerprint
    # of other rules) is fingerprinted again from the config it recorded
    small = read_config(path, overrides=["laten.micro_batch=1"])
    assert small.fingerprint() == base.fingerprint()
    assert small.resumes({"fingerprint": "recorded under other rules", "config": base.raw})
    assert not small.resumes({"fingerprint": "recorded under other rules",
                              "config": read_config(path, overrides=["laten.rate=0.2"]).raw})
    assert not small.resumes({"fingerprint": "recorded under other rules"})


def test_settings_build_and_flags_share_one_definition():
    import argparse

    from pktjax.settings import LoraTrainConfig, add_arguments, build, from_args

    p = argparse.ArgumentParser()
    add_arguments(p, AlignerTrainConfig)
    args = p.parse_args(["--lr", "1e-3", "--modules", "up_proj,down_proj", "--no-train-on-inputs"])
    tc = from_args(AlignerTrainConfig, args)
    assert tc == AlignerTrainConfig(lr=1e-3, modules=("up_proj", "down_proj"))
    assert "(default: 3e-05)" in p.format_help().replace("\n", " ").replace("  ", " ") or "3e-05" in p.format_help()
    with pytest.raises(ConfigError, match="flag.lr = -1.0: must be > 0"):
        from_args(AlignerTrainConfig, p.parse_args(["--lr", "-1"]))
    with pytest.raises(ConfigError, match="batch_size=10 must be a multiple of micro_batch=4"):
        build(LoraTrainConfig, {"batch_size": 10, "micro_batch": 4})
    assert build(LoraTrainConfig, {"lr": "3e-5"}).lr == 3e-5


def test_made_students_decode_with_the_base_students_completions_as_drafts(tmp_path):
    """On a generation task, a student the job makes is evaluated with the base student's report as drafts; the
    base models are not."""
    cfg = read_config(_config(tmp_path, task="gsm", eval={"limit": 2, "batch_size": 2, "max_new_tokens": 16}))
    student = resolve_model(cfg.student, tmp_path / "student")
    _evaluate(student, cfg, cfg.out / "eval" / "student.json", drafts=False)
    base = json.loads((cfg.out / "eval" / "student.json").read_text())
    assert "drafts" not in base["settings"]
    made = cfg.out / "laten" / "seed1" / "step0" / "eval.json"
    _evaluate(load_model(student), cfg, made)
    report = json.loads(made.read_text())
    assert report["settings"]["drafts"] == str(cfg.out / "eval" / "student.json")
    assert [r["output"] for r in report["records"]] == [r["output"] for r in base["records"]]  # the same model
