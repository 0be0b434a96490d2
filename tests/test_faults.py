"""Fault injection: kills at named write points (``PKTJAX_FAULT``, in child processes), damaged files, two jobs on
one folder and a full disk. Every case ends in a result identical to an uninterrupted run after a rerun, or in a
refusal (exit 2) naming the file; never a traceback, silently used damaged data or a temporary path left behind.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from pktjax import runfolder as R
from pktjax.errors import DamagedFileError, DataError, LockedError

ROOT = Path(__file__).resolve().parents[1]


def _child(code: str, *args: str, fault: str | None = None, wait: bool = True):
    """Run ``code`` in a fresh Python (this checkout on the path) with ``PKTJAX_FAULT=fault``."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop(R.FAULT_ENV, None)
    if fault:
        env[R.FAULT_ENV] = fault
    cmd = [sys.executable, "-c", code, *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if R._TEMP.search(p.name)]


def _flip(folder: Path) -> Path:
    """Flip one byte in the middle of the largest file of an orbax step (not its manifest)."""
    path = max((p for p in folder.rglob("*") if p.is_file() and p.name != R.MANIFEST), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ----------------------------------------------------------------------------------------- the write primitives


def test_atomic_write_checksum_and_damaged_json(tmp_path):
    path = R.write_json(tmp_path / "a" / "eval.json", {"score": 0.5, "records": []}, checksum=True)
    assert R.read_json(path) == {"score": 0.5, "records": []} and R.verify(path) is True
    assert not _temps(tmp_path)
    for damage in (b"", b'{"score": 0.5, "rec', b"{}", b'{"score": 0.9, "records": []}'):
        path.write_bytes(damage)  # truncated, cut, valid-but-wrong: all fail the recorded checksum
        with pytest.raises(DamagedFileError, match="eval.json.*checksum"):
            R.read_json(path, "evaluation report")
    path.write_bytes(b"\xff\xfe{")
    R.checksum_path(path).unlink()  # without a checksum the content is still checked
    with pytest.raises(DamagedFileError, match="not UTF-8"):
        R.read_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(DamagedFileError, match="JSON list, not a dict"):
        R.read_json(path)
    # a damaged result counts as not computed: removed (with its checksum), so the stage runs again
    R.write_json(path, {"x": 1}, checksum=True)
    path.write_text("{}")
    assert R.read_result(path) is None and not path.exists() and not R.checksum_path(path).exists()
    assert R.read_result(tmp_path / "missing.json") is None


def test_damaged_text_file_is_named(tmp_path):
    """A report written with its checksum reads back verified; an edited or non-UTF-8 one is named."""
    path = R.atomic_write(tmp_path / "report.md", "# scores\n| a | 0.5 |\n", checksum=True)
    assert R.read_text(path, "report") == "# scores\n| a | 0.5 |\n"
    path.write_text("# scores\n| a | 0.9 |\n")
    with pytest.raises(DamagedFileError, match="report.md: the report does not match the checksum"):
        R.read_text(path, "report")
    path.write_bytes(b"# \xff scores\n")
    R.checksum_path(path).unlink()  # without a checksum the text is still checked
    with pytest.raises(DamagedFileError, match="report.md: the report is not UTF-8"):
        R.read_text(path, "report")


def test_a_failing_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = R.write_json(tmp_path / "scores.json", {"v": 1})
    monkeypatch.setenv(R.FAULT_ENV, "write:scores.json=enospc")
    with pytest.raises(OSError) as err:
        R.write_json(path, {"v": 2})
    assert err.value.errno == errno.ENOSPC and R.is_disk_full(err.value)
    assert json.loads(path.read_text()) == {"v": 1} and not _temps(tmp_path)
    monkeypatch.setenv(R.FAULT_ENV, "folder:model=enospc")
    with pytest.raises(OSError), R.atomic_folder(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    assert not (tmp_path / "model").exists() and not _temps(tmp_path)


def test_disk_full_is_recognised_through_causes():
    inner = ValueError("RESOURCE_EXHAUSTED: Error writing local file \"/x/d/1\": [OS error 28: No space left]")
    try:
        try:
            raise inner
        except ValueError as e:
            raise RuntimeError("save failed") from e
    except RuntimeError as outer:
        assert R.is_disk_full(outer)
    assert not R.is_disk_full(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 8GB"))
    assert not R.is_disk_full(OSError(errno.EACCES, "denied"))


def test_read_jsonl_half_cut_tail_and_bad_lines(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 0}\n{"step": 1}\n{"step": 2, "lo')
    with pytest.raises(DataError, match="log.jsonl:3: not valid JSON"):
        R.read_jsonl(path)  # input data: a cut line is an error
    assert R.read_jsonl(path, on_bad="trim") == [{"step": 0}, {"step": 1}]
    assert "log.jsonl:3: dropping a last line cut short" in capsys.readouterr().err
    assert path.read_bytes() == b'{"step": 0}\n{"step": 1}\n'  # trimmed from the file
    path.write_bytes(b'{"step": 0}\n{"step": 1\n{"step": 2}\n')
    with pytest.raises(DataError, match="log.jsonl:2: not valid JSON"):
        R.read_jsonl(path, on_bad="trim")  # a bad line before the last is never dropped silently
    path.write_bytes(b'{"step": 0}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="log.jsonl:2: not UTF-8"):
        R.read_jsonl(path)
    path.write_bytes(b'{"a": 1}\n\n{"a": 2}')  # blank lines skipped, a whole last line without newline kept
    assert R.read_jsonl(path) == [{"a": 1}, {"a": 2}] and R.read_jsonl(path, limit=1) == [{"a": 1}]
    path.write_bytes(b'{"a": 1}\n{"t": "caf\xc3')  # a kill inside a multi-byte character
    assert R.read_jsonl(path, on_bad="trim") == [{"a": 1}] and path.read_bytes() == b'{"a": 1}\n'


def test_read_jsonl_drops_bad_records_and_reads_gzip(tmp_path, capsys):
    def check(row, where):
        if "a" not in row:
            raise DataError(f"{where}: no key 'a'.")

    path = tmp_path / "rec.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": \n{"b": 2}\n\xff\n{"a": 3}\n{"a": 4')
    with pytest.raises(DataError, match="rec.jsonl:2: not valid JSON"):
        R.read_jsonl(path, check=check)
    with pytest.raises(DataError, match="rec.jsonl:2: not valid JSON"):
        R.read_jsonl(path, check=check, on_bad="trim")  # not the last line: never dropped in trim mode
    assert R.read_jsonl(path, check=check, on_bad="drop") == [{"a": 1}, {"a": 3}]
    err = capsys.readouterr().err
    assert all(f"rec.jsonl:{n}: damaged line dropped" in err for n in (2, 3, 4, 6)) and "no key 'a'" in err
    assert path.read_bytes() == b'{"a": 1}\n{"a": 3}\n'  # rewritten with the good lines only
    gz = tmp_path / "bench.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"a": 1}\n\n{"a": 2}\n'))
    assert R.read_jsonl(gz) == [{"a": 1}, {"a": 2}]
    with pytest.raises(DataError, match="nowhere.jsonl: no such samples file"):
        R.read_jsonl(tmp_path / "nowhere.jsonl", what="samples file")


def test_chat_data_checked_on_every_line(tmp_path):
    from pktjax.data import read_jsonl

    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in [good, good, {"messages": [{"role": "bot"}]}, good]) + "\n")
    with pytest.raises(DataError, match="train.jsonl:3: expected {.messages.: \[...\]} with a prompt"):
        read_jsonl(path)


def test_clean_temps_removes_what_killed_writers_leave(tmp_path):
    keep = [tmp_path / "eval" / "student.json", tmp_path / "laten" / "seed1" / "aligner" / "log.jsonl"]
    for p in keep:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}")
    left = [tmp_path / "models" / ".teacher.tmp-ab12", tmp_path / "laten" / "seed1" / "step0" / ".model.tmp-x",
            tmp_path / "lora" / "seed1" / ".adapter.tmp-q", tmp_path / "state" / "3.orbax-checkpoint-tmp-1700"]
    for p in left:
        (p / "sub").mkdir(parents=True)
        (p / "sub" / "w.safetensors").write_bytes(b"0" * 10)
    (tmp_path / "eval" / ".student.json.tmp-9z").write_text("{")
    (tmp_path / "laten" / "seed1" / "aligner" / ".run.json.tmp").write_text("{")
    removed = R.clean_temps(tmp_path)
    assert len(removed) == 6 and not _temps(tmp_path) and all(p.is_file() for p in keep)


# ------------------------------------------------------------------------------------------------- tiny models

TINY = """
import sys
from pktjax.tiny import save_random_model, tiny_config
save_random_model(sys.argv[1], tiny_config())
"""


def test_a_tiny_model_killed_before_its_tokenizer_is_rebuilt(tmp_path):
    from pktjax.transfer import resolve_model

    folder = tmp_path / "models" / "teacher"
    res = _child(TINY, str(folder), fault="tiny:before-tokenizer")
    assert res.returncode == -9, res.stderr  # killed as kill -9 would
    assert not folder.exists() and len(_temps(tmp_path)) == 1  # the model is all or nothing
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # what an older, non-atomic build left: config without tokenizer
    assert resolve_model("tiny:hidden=32,layers=2,inter=48,heads=4", folder) == folder
    assert (folder / "tokenizer.json").is_file() and (folder / "model.safetensors").is_file()
    assert R.clean_temps(tmp_path) and not _temps(tmp_path)


# ----------------------------------------------------------------------------------------------------- the lock

HOLD = """
import sys, time
from pktjax.runfolder import lock
with lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(300)
"""


def test_a_second_job_is_refused_and_a_dead_holder_releases(tmp_path, capsys):
    from pktjax.cli import main

    out = tmp_path / "run"
    holder = _child(HOLD, str(out), wait=False)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=f"pid {holder.pid} on .*started 20"):
            with R.lock(out):
                pass
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(yaml.safe_dump({"teacher": "tiny:hidden=48,layers=3,inter=64,heads=4,seed=1",
                                       "student": "tiny:hidden=32", "task": "gsm", "out": str(out)}))
        assert main(["transfer", str(cfg)]) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "Traceback" not in err
        assert sorted(p.name for p in out.iterdir()) == [R.LOCK_FILE]  # the refused job wrote nothing
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    with R.lock(out):  # the kernel released the dead holder's lock
        assert json.loads((out / R.LOCK_FILE).read_text())["pid"] == os.getpid()
        with R.lock(out):  # the same process may nest
            pass
    assert (out / R.LOCK_FILE).read_text() == ""


# ------------------------------------------------------------------------------------------- the aligner trainer


def _example(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Q{i}: what is {i}+{2 * i}?"},
                         {"role": "assistant", "content": f"The sum is {3 * i}."}]}


EXTRACT = [_example(i) for i in range(4)]
ALIGN = [_example(i) for i in range(10, 16)]
CFG = {"examples_per_step": 4, "cutoff_len": 48, "micro_batch": 2, "bucket": 16, "lr": 1e-2, "train_on_inputs": True}
ALIGNER = """
import json, sys
from pktjax.train_aligner import TrainConfig, train_aligner
teacher, student, out, ex, al, cfg = sys.argv[1:]
train_aligner(teacher, student, json.loads(ex), json.loads(al), out, TrainConfig(**json.loads(cfg)), progress=False)
"""


@pytest.fixture(scope="module")
def pair_dirs(tiny_dir):
    return str(tiny_dir("llama2", seed=1, hidden=48, layers=3, inter=64)), str(tiny_dir("llama2"))


@pytest.fixture(scope="module")
def reference(pair_dirs, tmp_path_factory):
    """An uninterrupted 4-step aligner run."""
    from pktjax.train_aligner import TrainConfig, train_aligner

    out = tmp_path_factory.mktemp("aligner-ref")
    final = train_aligner(*pair_dirs, EXTRACT, ALIGN, out, TrainConfig(**CFG), progress=False)
    return out, final


def _without_seconds(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in R.read_jsonl(out / "log.jsonl")]


def _log_steps(out: Path) -> list[int]:
    return [r["step"] for r in R.read_jsonl(out / "log.jsonl")]


def test_aligner_killed_at_each_write_point_resumes_bit_identical(pair_dirs, reference, tmp_path, monkeypatch):
    from pktjax.train_aligner import TrainConfig, aligner_steps, load_aligner, train_aligner

    out = tmp_path / "aligner"
    # killed (SIGKILL) after step 1's log line, before its checkpoints
    args = (*pair_dirs, str(out), json.dumps(EXTRACT), json.dumps(ALIGN), json.dumps(CFG))
    res = _child(ALIGNER, *args, fault="aligner:after-log@2")
    assert res.returncode == -9, res.stderr[-2000:]
    # stopped (in-process stand-ins for a kill) after step 1's aligner, before its state; then after step 2's
    # state, before its manifest
    for fault in ("aligner:after-aligner@1=raise", "checkpoint:before-manifest@4=raise"):
        monkeypatch.setenv(R.FAULT_ENV, fault)
        with pytest.raises(R.FaultInjected):
            train_aligner(*pair_dirs, EXTRACT, ALIGN, out, TrainConfig(**CFG), progress=False)
    monkeypatch.delenv(R.FAULT_ENV)
    final = train_aligner(*pair_dirs, EXTRACT, ALIGN, out, TrainConfig(**CFG), progress=False)
    assert aligner_steps(out) == [0, 1, 2, 3] and _log_steps(out) == [0, 1, 2, 3]
    assert _without_seconds(out) == _without_seconds(reference[0])
    assert _leaves_equal(final, reference[1]) and _leaves_equal(load_aligner(out, 3), reference[1])
    assert sorted(int(p.name) for p in (out / "state").iterdir() if p.name.isdigit()) == [2, 3]  # pruned to two
    assert not _temps(out)


def test_damaged_aligner_state_falls_back_and_damaged_logs_are_rebuilt(pair_dirs, reference, tmp_path, capsys):
    from pktjax.train_aligner import TrainConfig, load_aligner, train_aligner

    out = tmp_path / "aligner"
    shutil.copytree(reference[0], out)
    _flip(out / "state" / "3")  # the latest optimizer state: bit-flipped
    (out / "log.jsonl").unlink()  # and the log deleted
    final = train_aligner(*pair_dirs, EXTRACT, ALIGN, out, TrainConfig(**CFG), progress=False)
    err = capsys.readouterr().err
    assert "state/3 is damaged" in err and "Falling back" in err and "rebuilt from the aligner checkpoints" in err
    assert _leaves_equal(final, reference[1])  # step 3 redone from the step-2 state
    assert _without_seconds(out) == _without_seconds(reference[0])
    with open(out / "log.jsonl", "ab") as fh:
        fh.write(b'{"step": 4, "lo')  # a half-cut line
    train_aligner(*pair_dirs, EXTRACT, ALIGN, out, TrainConfig(**CFG), progress=False)
    assert _log_steps(out) == [0, 1, 2, 3] and "cut short" in capsys.readouterr().err
    flipped = _flip(out / "aligner" / "1")  # a bit-flipped aligner is never fused
    with pytest.raises(DamagedFileError, match=f"aligner/1 is damaged: {flipped} is changed"):
        load_aligner(out, 1)
    (out / "run.json").write_text('{"config": ')
    with pytest.raises(DamagedFileError, match="run.json.*delete run.json"):
        train_aligner(*pair_dirs, EXTRACT, ALIGN, out, TrainConfig(**CFG), progress=False)


# ----------------------------------------------------------------------------------------------- the LoRA trainer


def test_damaged_lora_checkpoint_falls_back_and_metrics_are_rebuilt(tiny_dir, tmp_path, capsys):
    import pktjax
    from pktjax import lora as L
    from pktjax.data import tokenize_seeking
    from pktjax.lora_train import TrainConfig, train

    folder = tiny_dir("qwen2")
    student, tok = pktjax.load_model(folder), pktjax.load_tokenizer(folder)
    items = [tokenize_seeking(tok, _example(i)) for i in range(12)]
    base, lora0 = L.init(student.params, student.config, 4, 8, key=jax.random.key(0))
    tc = TrainConfig(rank=4, alpha=8, lr=1e-2, epochs=2, batch_size=8, micro_batch=4, bucket=32, seed=0,
                     save_every=1)

    def run(out):
        return train(base, student.config, lora0, items, out, tc, pad_id=3, progress=False)

    ref = run(tmp_path / "ref")
    out = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", out)
    _flip(out / "checkpoints" / "4")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # lines lost
    capsys.readouterr()
    assert _leaves_equal(run(out), ref)
    err = capsys.readouterr().err
    assert "checkpoints/4 is damaged" in err and "rebuilt from checkpoint 3" in err
    got, want = (R.read_jsonl(p / "metrics.jsonl") for p in (out, tmp_path / "ref"))
    assert [m["step"] for m in got] == [1, 2, 3, 4] and [m["loss"] for m in got] == [m["loss"] for m in want]
    (out / "train_config.json").write_text('{"rank": 4}')
    with pytest.raises(DamagedFileError, match="train_config.json.*checksum"):
        run(out)


# ----------------------------------------------------------------------------------- partial evaluation records


def test_partial_records_are_validated_line_by_line(tmp_path, capsys):
    from pktjax.evaluate import evaluate

    asked: list[list[str]] = []

    def gen(prompts, max_new, stop):
        asked.append(list(prompts))
        return [f"The answer is {len(p) % 7}." for p in prompts]

    partial = tmp_path / "student.partial.jsonl"
    first = evaluate(None, "gsm8k", limit=5, generator=gen, resume=partial)
    lines = partial.read_bytes().split(b"\n")[:-1]
    assert len(lines) == 5
    edited = json.loads(lines[1])
    edited["output"] = "The answer is 12345."  # an edited output: its hash no longer matches
    wrong_keys = json.loads(lines[2])
    del wrong_keys["output"]
    lines[1], lines[2] = json.dumps(edited).encode(), json.dumps(wrong_keys).encode()
    lines[3] = lines[3][:10] + b"\xff" + lines[3][11:]  # not UTF-8
    partial.write_bytes(b"\n".join(lines) + b"\n" + b'{"prompt": "cut sho')  # and a half-cut last line
    asked.clear()
    again = evaluate(None, "gsm8k", limit=5, generator=gen, resume=partial)
    assert sorted(asked[0]) == sorted(first["records"][k]["prompt"] for k in (1, 2, 3))  # only the damaged lines
    assert [r["output"] for r in again["records"]] == [r["output"] for r in first["records"]]
    err = capsys.readouterr().err
    assert all(f"student.partial.jsonl:{n}: damaged" in err for n in (2, 3, 4, 6))
    assert len(R.read_jsonl(partial)) == 5  # rewritten with the good lines, then the recomputed ones


# ---------------------------------------------------------------------------------------------- the transfer job


@pytest.fixture(scope="module")
def transfer_run(tmp_path_factory):
    from pktjax.cli import main

    tmp = tmp_path_factory.mktemp("transfer")
    raw = {"teacher": "tiny:hidden=48,layers=3,inter=64,heads=4,seed=1",
           "student": "tiny:hidden=32,layers=2,inter=48,heads=4,seed=2", "task": "mmlu",
           "eval": {"limit": 3, "batch_size": 3},
           "laten": {"seeds": [1], "steps": 1, "cutoff_len": 96, "examples_per_step": 2, "micro_batch": 2},
           "out": str(tmp / "run")}
    cfg = tmp / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["transfer", str(cfg)]) == 0
    return cfg, tmp / "run"


def _scores(out: Path) -> list[tuple]:
    return [(r["method"], r["score"], r["n"]) for r in R.read_json(out / "scores.json")["rows"]]


def _rerun(cfg: Path, src: Path, dest: Path, damage, capsys, fault: str | None = None, monkeypatch=None) -> int:
    from pktjax.cli import main

    if not dest.exists():
        shutil.copytree(src, dest)
    damage(dest)
    capsys.readouterr()
    if fault:
        monkeypatch.setenv(R.FAULT_ENV, fault)
    try:
        return main(["transfer", str(cfg), "--out", str(dest)])
    finally:
        if fault:
            monkeypatch.delenv(R.FAULT_ENV)


def test_damaged_results_are_recomputed(transfer_run, tmp_path, capsys):
    cfg, src = transfer_run

    def damage(out):
        (out / "eval" / "student.json").write_bytes((out / "eval" / "student.json").read_bytes()[:100])
        (out / "laten" / "seed1" / "step0" / "eval.json").write_text("{}")
        (out / "timings.json").write_text("")
        for p in (out / "models" / ".teacher.tmp-k2", out / "laten" / "seed1" / "step0" / ".model.tmp-z"):
            p.mkdir()

    assert _rerun(cfg, src, tmp_path / "a", damage, capsys) == 0
    err = capsys.readouterr().err
    assert "student.json is damaged" in err and "step0/eval.json is damaged" in err and "timings.json" in err
    assert _scores(tmp_path / "a") == _scores(src) and not _temps(tmp_path / "a")


@pytest.mark.parametrize("what", ["transfer.json", "run.json", "aligner"])
def test_damaged_records_are_refused_by_name(transfer_run, tmp_path, capsys, what):
    cfg, src = transfer_run
    seed = Path("laten") / "seed1"

    def damage(out):
        if what == "transfer.json":
            (out / what).write_text('{"fingerprint": "0')
            return
        (out / seed / "step0" / "eval.json").unlink()  # the fuse must run again and read the damaged file
        if what == "run.json":
            (out / seed / "aligner" / "run.json").write_text("{}")
        else:
            _flip(out / seed / "aligner" / "aligner" / "0")

    assert _rerun(cfg, src, tmp_path / "a", damage, capsys) == 2
    err = capsys.readouterr().err
    name = {"transfer.json": "transfer.json", "run.json": "aligner/run.json", "aligner": "aligner/0 is damaged"}
    assert name[what] in err and "Traceback" not in err


def test_disk_full_is_a_message_and_the_run_resumes(transfer_run, tmp_path, capsys, monkeypatch):
    cfg, src = transfer_run

    def damage(out):
        (out / "scores.json").unlink()
        (out / "eval" / "teacher.json").unlink()

    dest = tmp_path / "a"
    assert _rerun(cfg, src, dest, damage, capsys, fault="write:teacher.json=enospc", monkeypatch=monkeypatch) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "rerun the same command" in err and "Traceback" not in err
    assert not (dest / "eval" / "teacher.json").exists() and not _temps(dest)
    assert _rerun(cfg, src, dest, lambda out: None, capsys) == 0
    assert _scores(dest) == _scores(src)


def test_every_data_line_is_checked_before_the_run(transfer_run, tmp_path):
    from pktjax.transfer import read_config, run_transfer

    cfg, _ = transfer_run
    data = tmp_path / "train.jsonl"
    good = json.dumps(_example(1))
    data.write_text("\n".join([good] * 5 + ['{"messages": "oops"}', good]) + "\n")
    raw = yaml.safe_load(cfg.read_text())
    raw.update(out=str(tmp_path / "run"), lora={"seeds": [1], "data": str(data)})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError, match="train.jsonl:6"):
        run_transfer(read_config(path))
    assert not (tmp_path / "run").exists()
