"""experiments/collect_results.py: a run folder's records, logs and figures, without its weights."""

import pytest

from experiments.collect_results import collect, restore

# a run folder's files and where each lands in the results folder (None: left out); each file holds its own path
LAYOUT = {
    "transfer.json": "transfer.json", "report.md": "report.md", "scores.json": "scores.json",
    "timings.json": "timings.json", "eval/student.json": "eval/student.json", "eval/teacher.json": "eval/teacher.json",
    "laten/seed42/step0/eval.json": "laten/seed42_step0_eval.json",
    "laten/seed42/step1/eval.json": "laten/seed42_step1_eval.json",
    "laten/seed43/step0/eval.json": "laten/seed43_step0_eval.json",
    "laten/seed42/aligner/log.jsonl": "laten/seed42_aligner_log.jsonl",
    "laten/seed42/step1/injection.json": "laten/seed42_step1_injection.json",
    "laten/lr3e-05/seed42/step0/eval.json": "laten/lr3e-05/seed42_step0_eval.json",
    "laten/lr3e-05/seed42/aligner/log.jsonl": "laten/lr3e-05/seed42_aligner_log.jsonl",
    "laten/lr3e-05/seed42/aligner/aligner/0/default/d/abc": None, "delta_vs_score.png": "delta_vs_score.png",
    "laten/seed42/aligner/run.json": None, "laten/seed42/aligner/aligner/0/default/d/abc": None,
    "laten/seed42/step0/fused/model.safetensors": None,
    "seeking/extracted/extraction.json": "seeking/extraction.json",
    "seeking/extracted/adapter_model.safetensors": None,
    "seeking/seed1/eval.json": "seeking/seed1_eval.json", "seeking/seed1/metrics.jsonl": "seeking/seed1_metrics.jsonl",
    "lora/seed2/train_config.json": "lora/seed2_train_config.json",
    "lora/seed2/adapter/adapter_model.safetensors": None,
    "pissa/seed1/eval.json": "pissa/seed1_eval.json", "analysis/analysis.json": "analysis/analysis.json",
    "analysis/cka.png": "analysis/cka.png", "analysis/cka.pdf": None,
}


def _run(root):
    for rel in LAYOUT:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(rel)
    return root


def test_collects_records_flattened_by_seed_and_leaves_weights_out(tmp_path):
    written = collect(_run(tmp_path / "run"), tmp_path / "out")
    expected = {dest: src for src, dest in LAYOUT.items() if dest is not None}
    assert written == sorted(expected)
    on_disk = {p.relative_to(tmp_path / "out").as_posix(): p.read_text()
               for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert on_disk == expected


def test_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "eval").mkdir()
    with pytest.raises(SystemExit, match="no transfer.json"):
        collect(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_restore_puts_resumable_files_back_and_refuses_another_run(tmp_path):
    collect(_run(tmp_path / "run"), tmp_path / "out")
    (tmp_path / "run" / "laten" / "seed42" / "trained.json").write_text("laten/seed42/trained.json")
    collect(tmp_path / "run", tmp_path / "out")
    written = restore(tmp_path / "out", tmp_path / "back")
    assert written == sorted(["transfer.json", "timings.json", "eval/student.json", "eval/teacher.json",
                              "laten/seed42/step0/eval.json", "laten/seed42/step1/eval.json",
                              "laten/seed43/step0/eval.json", "laten/seed42/step1/injection.json",
                              "laten/lr3e-05/seed42/step0/eval.json", "laten/seed42/trained.json"])
    for rel in written:  # each file is the run's own, back at its own path
        assert (tmp_path / "back" / rel).read_text() == rel
    assert restore(tmp_path / "out", tmp_path / "back") == []  # files already there are kept
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "transfer.json").write_text("another run")
    with pytest.raises(SystemExit, match="holds another run"):
        restore(tmp_path / "out", tmp_path / "other")
