"""Outputs go to a local or mounted file system: a URL as ``--out`` (or as a transfer config's ``out``) is refused
before anything starts, with the fix (mount the bucket, e.g. with gcsfuse)."""

from __future__ import annotations

import pytest

from pktjax.cli import main
from pktjax.errors import ConfigError
from pktjax.runfolder import check_local

CONFIG = """\
teacher: tiny:hidden=64,layers=4,inter=128,heads=4,seed=1
student: tiny:hidden=32,layers=2,inter=64,heads=4,seed=2
task: mmlu
"""


@pytest.mark.parametrize("url", ["gs://bucket/run", "s3://bucket/run", "file:///tmp/run", "memory://run"])
def test_a_url_is_refused(url):
    with pytest.raises(ConfigError, match="gcsfuse"):
        check_local(url)


@pytest.mark.parametrize("path", ["runs/demo", "/mnt/bucket/run", "C:/runs", "gs:/not-a-url"])
def test_a_local_path_passes(path):
    check_local(path)


@pytest.mark.parametrize("argv", [
    ["transfer", "{config}", "--out", "gs://bucket/run"],
    ["transfer", "{config_gs}"],
    ["laten", "train", "--teacher", "t", "--student", "s", "--task", "gsm", "--out", "gs://bucket/aligner"],
    ["eval", "--model", "m", "--task", "mmlu", "--out", "s3://bucket/report.json"],
])
def test_cli_refuses_a_url_out_before_any_work(argv, tmp_path, monkeypatch, capsys):
    import jax

    config, config_gs = tmp_path / "job.yaml", tmp_path / "gs.yaml"
    config.write_text(CONFIG)
    config_gs.write_text(CONFIG + "out: gs://bucket/run\n")
    started = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: started.append(kw))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")  # would start a process group if reached
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([a.format(config=config, config_gs=config_gs) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "is a URL" in err and "gcsfuse" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no folder, no lock
    # a --out flag is refused before a process group forms; a config's out once the command reads its config
    assert not started or "--out" not in argv
