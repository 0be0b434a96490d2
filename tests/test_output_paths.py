"""Output paths: `pktjax transfer` writes its run folder to a URL through a local staging folder mirrored with
fsspec (:mod:`pktjax.remote`), tested against fsspec's in-memory file system and ``file://`` (no bucket is
reachable here); the other commands refuse a URL ``--out`` before anything starts, with the fix (mount the bucket).
A URL whose file system is unknown or whose package is missing stops a transfer before any work."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import fsspec
import pytest
import yaml

from pktjax.cli import main
from pktjax.errors import ConfigError, RemoteError
from pktjax.remote import SYNC_FILE, check_url, pull, push, staging_folder
from pktjax.runfolder import FaultInjected, check_local
from pktjax.transfer import read_config, run_transfer
from tests.test_sharding_transfer import results

CONFIG = """\
teacher: tiny:hidden=64,layers=4,inter=128,heads=4,seed=1
student: tiny:hidden=32,layers=2,inter=64,heads=4,seed=2
task: mmlu
"""
# the tiny job of tests/test_transfer.py: both base evaluations, one LaTen seed of one step, 6 MMLU questions
JOB = {"teacher": "tiny:hidden=48,layers=3,inter=64,heads=4,seed=1",
       "student": "tiny:hidden=32,layers=2,inter=48,heads=4,seed=2", "task": "mmlu",
       "eval": {"limit": 6, "batch_size": 6},
       "laten": {"seeds": [1], "steps": 1, "cutoff_len": 96, "examples_per_step": 2, "micro_batch": 2}}


@pytest.fixture
def memory_url(request):
    """A fresh ``memory://`` folder, removed afterwards (fsspec's memory store lives as long as the process)."""
    url = "memory://pktjax-test/" + re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)  # no glob characters
    fs, root = fsspec.core.url_to_fs(url)
    yield url
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path, memory_url):
    return memory_url if request.param == "memory" else f"file://{tmp_path / 'bucket' / 'run'}"


def _remote(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {os.path.relpath(p, root): fs.cat_file(p) for p in fs.find(root)} if fs.exists(root) else {}


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != SYNC_FILE}


# --------------------------------------------------------------------------------------------- the refusals

@pytest.mark.parametrize("url_", ["gs://bucket/run", "s3://bucket/run", "file:///tmp/run", "memory://run"])
def test_a_url_is_refused_where_outputs_are_written_in_place(url_):
    with pytest.raises(ConfigError, match="gcsfuse.*Only `pktjax transfer` writes to a URL"):
        check_local(url_)


@pytest.mark.parametrize("path", ["runs/demo", "/mnt/bucket/run", "C:/runs", "gs:/not-a-url"])
def test_a_local_path_passes(path):
    check_local(path)


def _no_gcsfs(monkeypatch):
    """As on a machine without gcsfs (whether or not this one has it)."""
    import sys

    registry = sys.modules["fsspec.registry"]  # the module (`fsspec.registry` names its read-only view)
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` raises ImportError
    monkeypatch.delitem(registry._registry, "gs", raising=False)


def test_unknown_schemes_and_missing_packages_are_config_errors(monkeypatch):
    _no_gcsfs(monkeypatch)
    with pytest.raises(ConfigError, match=r"no file system is known for xyz://"):
        check_url("xyz://bucket/run")
    with pytest.raises(ConfigError, match=r"gs:// needs the gcsfs package.*`pip install gcsfs`"):
        check_url("gs://bucket/run")
    check_url("memory://run")
    check_url("file:///tmp/run")


@pytest.mark.parametrize("argv, message", [
    (["transfer", "{config}", "--out", "xyz://bucket/run"], "no file system is known for xyz://"),
    (["transfer", "{config_gs}"], "`pip install gcsfs`"),
    (["transfer", "{config}", "--out", "gs://bucket/run"], "`pip install gcsfs`"),
    (["transfer", "{config}", "--out", "runs/local", "--staging", "stage"], "a staging folder is for an output URL"),
    (["laten", "train", "--teacher", "t", "--student", "s", "--task", "gsm", "--out", "gs://bucket/aligner"],
     "is a URL"),
    (["eval", "--model", "m", "--task", "mmlu", "--out", "s3://bucket/report.json"], "is a URL"),
])
def test_cli_refuses_a_bad_out_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    import jax

    _no_gcsfs(monkeypatch)
    config, config_gs = tmp_path / "job.yaml", tmp_path / "gs.yaml"
    config.write_text(CONFIG)
    config_gs.write_text(CONFIG + "out: gs://bucket/run\n")
    started = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: started.append(kw))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")  # would start a process group if reached
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("PKTJAX_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([a.format(config=config, config_gs=config_gs) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err, err
    if message == "is a URL":
        assert "gcsfuse" in err and "Only `pktjax transfer`" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no lock, no staging folder
    # an --out URL is refused before a process group forms; a config's out once the command reads its config
    assert not started or not any(a.startswith(("xyz:", "gs:", "s3:")) for a in argv)


# ------------------------------------------------------------------------------------------ push and pull

def test_push_and_pull_mirror_a_folder_and_send_only_changes(url, tmp_path):
    local = tmp_path / "stage"
    (local / "eval").mkdir(parents=True)
    (local / "eval" / "student.json").write_text('{"score": 0.5}')
    (local / "eval" / ".student.json.sha256").write_text("abc\n")
    (local / "timings.json").write_text("{}")
    (local / ".pktjax.lock").write_text("{}")
    (local / ".timings.json.tmp-1234").write_text("half")  # a killed writer's temporary
    (local / "laten" / ".aligner.tmp-99").mkdir(parents=True)  # a killed atomic_folder
    (local / "laten" / ".aligner.tmp-99" / "w.bin").write_bytes(b"\0" * 10)
    assert sorted(push(local, url)) == ["eval/.student.json.sha256", "eval/student.json", "timings.json"]
    assert _remote(url) == {"eval/student.json": b'{"score": 0.5}', "eval/.student.json.sha256": b"abc\n",
                            "timings.json": b"{}"}
    assert push(local, url) == []  # nothing changed: nothing sent
    (local / "timings.json").write_text('{"eval": 1.0}')
    (local / "eval" / ".student.json.sha256").unlink()
    assert push(local, url) == ["timings.json"]
    assert set(_remote(url)) == {"eval/student.json", "timings.json"}  # the dropped file is dropped there too

    fresh = tmp_path / "fresh"  # another machine: everything comes down, byte for byte
    assert sorted(pull(url, fresh)) == ["eval/student.json", "timings.json"]
    assert _tree(fresh) == {k: v for k, v in _remote(url).items()}
    assert pull(url, fresh) == []  # unchanged on both sides: nothing fetched
    # newer work here that a killed run did not push yet: kept for the next push, neither overwritten nor dropped
    (fresh / "timings.json").write_text('{"eval": 2.0}')
    (fresh / "notes.txt").write_text("not pushed yet")
    assert pull(url, fresh) == []
    assert (fresh / "timings.json").read_text() == '{"eval": 2.0}' and (fresh / "notes.txt").is_file()
    (local / "eval" / "student.json").write_text('{"score": 0.75}')  # changed at the URL since: downloaded
    push(local, url)
    assert pull(url, fresh) == ["eval/student.json"]
    assert (fresh / "eval" / "student.json").read_text() == '{"score": 0.75}'

    (local / "eval" / "student.json").unlink()  # removed at the URL: removed here on pull
    push(local, url)
    assert pull(url, fresh) == [] and not (fresh / "eval" / "student.json").exists()
    (fresh / "timings.json").unlink()  # removed here (an old checkpoint step): not brought back; the push drops it
    assert pull(url, fresh) == [] and not (fresh / "timings.json").exists()
    assert push(fresh, url) == ["notes.txt"]
    assert _remote(url) == {"notes.txt": b"not pushed yet"}


def test_a_failed_upload_never_leaves_a_partial_file_at_the_final_name(memory_url, tmp_path, monkeypatch):
    local = tmp_path / "stage"
    local.mkdir()
    (local / "scores.json").write_text('{"rows": [1]}')
    push(local, memory_url)
    fs, root = fsspec.core.url_to_fs(memory_url)
    (local / "scores.json").write_text('{"rows": [1, 2, 3, 4, 5, 6]}')
    real = type(fs).put_file

    def half_then_fail(self, lpath, rpath, **kw):  # the connection drops halfway through the upload
        data = Path(lpath).read_bytes()
        self.pipe_file(rpath, data[: len(data) // 2])
        raise OSError("connection reset")

    monkeypatch.setattr(type(fs), "put_file", half_then_fail)
    with pytest.raises(RemoteError, match=r"uploading to .* failed \(OSError: connection reset\).*rerun the same"):
        push(local, memory_url)
    assert _remote(memory_url) == {"scores.json": b'{"rows": [1]}'}  # the old file, whole; no temporary left
    monkeypatch.setattr(type(fs), "put_file", real)
    # a kill between the upload and the move (PKTJAX_FAULT stands in for it): the final name is untouched
    monkeypatch.setenv("PKTJAX_FAULT", "push:scores.json=raise")
    with pytest.raises(FaultInjected):
        push(local, memory_url)
    assert _remote(memory_url) == {"scores.json": b'{"rows": [1]}'}
    monkeypatch.delenv("PKTJAX_FAULT")
    assert push(local, memory_url) == ["scores.json"]  # the next push sends it
    assert _remote(memory_url) == {"scores.json": b'{"rows": [1, 2, 3, 4, 5, 6]}'}


def test_an_upload_failing_after_a_stage_is_an_error_and_after_a_failed_stage_a_note(tmp_path, monkeypatch,
                                                                                     capsys):
    import types

    import pktjax.transfer.stages as stages

    cfg = types.SimpleNamespace(out=tmp_path / "stage", remote="memory://pktjax-test/unreachable")
    cfg.out.mkdir()

    def unreachable(local, url):
        raise RemoteError(f"uploading to {url} failed (OSError: no route to host)")

    def broken():
        raise ValueError("the stage broke")

    monkeypatch.setattr(stages, "push", unreachable)
    with pytest.raises(RemoteError, match="no route to host"):
        stages._timed(cfg, {}, "eval student", lambda: 1)
    with pytest.raises(ValueError, match="the stage broke"):  # the stage's error, not the upload's
        stages._timed(cfg, {}, "eval teacher", broken)
    assert "no route to host" in capsys.readouterr().err
    assert set(json.loads((cfg.out / "timings.json").read_text())) == {"eval student", "eval teacher"}


def test_processes_that_do_not_share_the_staging_folder_are_refused(tmp_path, monkeypatch):
    """Two processes of one job, played one after the other: process 0 leaves its token, process 1 looks for it
    in its own staging folder (jax's collectives stand in for: the broadcast returns process 0's token, the
    gather the two verdicts)."""
    import types

    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    import pktjax.transfer.stages as stages
    from pktjax.remote import STAGING_FILE

    shared, own = tmp_path / "shared", tmp_path / "own"
    shared.mkdir(), own.mkdir()
    token, verdicts = [], []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                        lambda x: (token.append(int(x)) if not token else None, token[0])[1])
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x: (verdicts.append(int(x)), np.array([1, verdicts[-1]]))[1])

    def play(process: int, folder: Path) -> None:
        monkeypatch.setattr(stages, "is_main_process", lambda: process == 0)
        stages._check_shared_staging(types.SimpleNamespace(out=folder, remote="gs://b/run"))

    play(0, shared)
    assert int((shared / STAGING_FILE).read_text()) == token[0]
    play(1, shared)  # the same folder: the token is there
    with pytest.raises(ConfigError, match=r"own of the output gs://b/run is not one folder that all 2 processes.*"
                                          r"--staging"):
        play(1, own)
    assert verdicts == [1, 1, 0]


def test_pull_ignores_and_removes_temporaries_a_killed_upload_left(memory_url, tmp_path):
    fs, root = fsspec.core.url_to_fs(memory_url)
    fs.pipe_file(f"{root}/eval/student.json", b"{}")
    fs.pipe_file(f"{root}/eval/.student.json.tmp-1a2b3c4d", b"{")
    assert pull(memory_url, tmp_path / "stage") == ["eval/student.json"]
    assert sorted(_tree(tmp_path / "stage")) == ["eval/student.json"]
    assert _remote(memory_url) == {"eval/student.json": b"{}"}


def test_a_push_killed_between_upload_and_move_leaves_the_old_file(tmp_path):
    """A real kill (SIGKILL) of a pushing process, right after the upload of a file to its temporary name."""
    import signal
    import subprocess
    import sys

    url, local = f"file://{tmp_path / 'bucket' / 'run'}", tmp_path / "stage"
    local.mkdir()
    (local / "scores.json").write_text('{"rows": [1]}')
    push(local, url)
    (local / "scores.json").write_text('{"rows": [1, 2]}')
    env = {**os.environ, "PKTJAX_FAULT": "push:scores.json=kill"}
    child = subprocess.run([sys.executable, "-c", f"from pktjax.remote import push; push({str(local)!r}, {url!r})"],
                           env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr
    left = _remote(url)
    assert left.pop("scores.json") == b'{"rows": [1]}'  # the old file, whole, at its name
    assert list(left.values()) == [b'{"rows": [1, 2]}'] and ".scores.json.tmp-" in next(iter(left))
    assert pull(url, local) == [] and (local / "scores.json").read_text() == '{"rows": [1, 2]}'  # not pushed: kept
    assert push(local, url) == ["scores.json"]
    assert _remote(url) == {"scores.json": b'{"rows": [1, 2]}'}  # the temporary removed by the pull


def test_the_staging_folder_is_under_pktjax_home_unless_given(tmp_path, monkeypatch):
    monkeypatch.setenv("PKTJAX_HOME", str(tmp_path / "home"))
    a, b = staging_folder("gs://b/run"), staging_folder("gs://b/run/")
    assert a == b and a.parent == tmp_path / "home" / "staging" and a != staging_folder("gs://b/other")
    assert staging_folder("gs://b/run", tmp_path / "s") == tmp_path / "s"


# ------------------------------------------------------------------------------------ the transfer job

def _job(tmp_path: Path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    return path


def _remote_results(url: str, copy: Path):
    """:func:`results` of a run at ``url``, read from a fresh download of it (the rows' report paths name files
    at the URL)."""
    pull(url, copy)
    scores = json.loads((copy / "scores.json").read_text())
    for r in scores["rows"]:
        assert r["report"].startswith(url + "/"), r["report"]
        r["report"] = str(copy / r["report"][len(url) + 1:])
    (copy / "scores.json").write_text(json.dumps(scores))
    return results(copy)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The job run into a local folder: the reference."""
    tmp = tmp_path_factory.mktemp("local")
    assert main(["transfer", str(_job(tmp)), "--out", str(tmp / "run")]) == 0
    return results(tmp / "run")


def _stage_file(rel: str) -> bool:
    """A file a stage writes (not the report's: scores, report, plots, timings, written again by every run)."""
    return rel.startswith(("eval/", "laten/", "models/")) or rel in ("transfer.json", ".transfer.json.sha256")


def _count(monkeypatch, module, name: str) -> list:
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: (calls.append(a), real(*a, **kw))[1])
    return calls


def test_a_transfer_to_a_url_writes_the_local_runs_scores_and_resumes_from_it(local_run, memory_url, tmp_path,
                                                                                monkeypatch):
    import pktjax.transfer.stages as stages

    monkeypatch.setenv("PKTJAX_HOME", str(tmp_path / "home"))
    job = _job(tmp_path)
    assert main(["transfer", str(job), "--out", memory_url]) == 0
    staging = staging_folder(memory_url)
    remote = _remote(memory_url)
    assert {"transfer.json", "scores.json", "report.md", "timings.json", "eval/student.json",
            "laten/seed1/step0/eval.json"} <= set(remote)
    assert not [k for k in remote if ".tmp" in k or k.endswith(".pktjax.lock")]
    # the staging folder, mirrored (its locks, the trainers' in their folders too, stay local)
    assert {k: v for k, v in _tree(staging).items() if not k.endswith(".pktjax.lock")} == remote
    assert _remote_results(memory_url, tmp_path / "copy") == local_run

    # a fresh machine: an empty staging folder; every stage's result comes from the URL, none is computed again
    evaluations = _count(monkeypatch, stages, "evaluate")
    trainings = _count(monkeypatch, stages, "train_aligner")
    cfg = read_config(job, memory_url, staging=tmp_path / "fresh")
    assert cfg.out == tmp_path / "fresh" and cfg.remote == memory_url
    run_transfer(cfg)
    assert evaluations == [] and trainings == []
    after = _remote(memory_url)
    # every stage's files are the first run's, byte for byte (the report, its plots and the timings are rewritten)
    assert set(after) == set(remote)
    assert {k: v for k, v in after.items() if _stage_file(k)} == {k: v for k, v in remote.items() if _stage_file(k)}
    assert len([k for k in remote if _stage_file(k)]) > 10
    assert json.loads(after["scores.json"])["rows"] == json.loads(remote["scores.json"])["rows"]


def test_a_transfer_killed_midway_resumes_on_a_fresh_staging_folder(local_run, tmp_path, monkeypatch):
    import pktjax.transfer.stages as stages

    url = f"file://{tmp_path / 'bucket' / 'run'}"
    job = _job(tmp_path)
    monkeypatch.setenv("PKTJAX_FAULT", "write:trained.json=raise")  # the LaTen stage dies after its training
    with pytest.raises(FaultInjected):
        run_transfer(read_config(job, url, staging=tmp_path / "first"))
    remote = _remote(url)
    assert {"eval/student.json", "eval/teacher.json", "timings.json"} <= set(remote)  # pushed as stages ended
    assert any(k.startswith("laten/seed1/aligner/") for k in remote)  # the interrupted stage's checkpoints too
    assert "laten/seed1/trained.json" not in remote and "scores.json" not in remote
    monkeypatch.delenv("PKTJAX_FAULT")
    evaluations = _count(monkeypatch, stages, "evaluate")
    run_transfer(read_config(job, url, staging=tmp_path / "second"))  # another machine
    assert len(evaluations) == 1  # the fused student's; both base models' reports came from the URL
    assert (tmp_path / "second" / "eval" / "teacher.json").read_bytes() == remote["eval/teacher.json"]
    assert _remote_results(url, tmp_path / "copy") == local_run
    assert _remote(url)["eval/student.json"] == remote["eval/student.json"]
