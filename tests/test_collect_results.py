"""experiments/collect_results.py: a run folder's records, logs and figures, without its weights."""

import pytest

from experiments.collect_results import collect

RUN_FILES = {
    "transfer.json": "{}", "report.md": "# report", "scores.json": "{}", "timings.json": "{}",
    "eval/student.json": "student", "eval/teacher.json": "teacher",
    "laten/seed42/step0/eval.json": "s42t0", "laten/seed42/step1/eval.json": "s42t1",
    "laten/seed43/step0/eval.json": "s43t0", "laten/seed42/aligner/log.jsonl": "log42",
    "laten/seed42/aligner/run.json": "run", "laten/seed42/aligner/aligner/0/default/d/abc": "weights",
    "laten/seed42/step0/fused/model.safetensors": "weights",
    "seeking/extracted/extraction.json": "extraction", "seeking/extracted/adapter_model.safetensors": "weights",
    "seeking/seed1/eval.json": "seek_eval", "seeking/seed1/metrics.jsonl": "seek_metrics",
    "lora/seed2/train_config.json": "lora_cfg", "lora/seed2/adapter/adapter_model.safetensors": "weights",
    "pissa/seed1/eval.json": "pissa_eval", "analysis/analysis.json": "analysis", "analysis/cka.png": "png",
    "analysis/cka.pdf": "pdf",
}


def _run(root):
    for rel, text in RUN_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_collects_records_flattened_by_seed_and_leaves_weights_out(tmp_path):
    run = _run(tmp_path / "run")
    written = collect(run, tmp_path / "out")
    expected = {
        "transfer.json": "{}", "report.md": "# report", "scores.json": "{}", "timings.json": "{}",
        "eval/student.json": "student", "eval/teacher.json": "teacher",
        "laten/seed42_step0_eval.json": "s42t0", "laten/seed42_step1_eval.json": "s42t1",
        "laten/seed43_step0_eval.json": "s43t0", "laten/seed42_aligner_log.jsonl": "log42",
        "seeking/extraction.json": "extraction", "seeking/seed1_eval.json": "seek_eval",
        "seeking/seed1_metrics.jsonl": "seek_metrics", "lora/seed2_train_config.json": "lora_cfg",
        "pissa/seed1_eval.json": "pissa_eval", "analysis/analysis.json": "analysis", "analysis/cka.png": "png",
    }
    assert written == sorted(expected)
    on_disk = {p.relative_to(tmp_path / "out").as_posix(): p.read_text()
               for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert on_disk == expected


def test_refuses_a_folder_that_is_not_a_run(tmp_path):
    (tmp_path / "eval").mkdir()
    with pytest.raises(SystemExit, match="no transfer.json"):
        collect(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
