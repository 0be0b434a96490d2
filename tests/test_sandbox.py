"""Hostile programs through pktjax.sandbox.run: every one is contained and reported, and the host is untouched."""

import ast
import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from pktjax import sandbox


def _survivors(tag: str) -> list[int]:
    """Host pids whose environment carries ``tag`` (the tests pass it to the program as a variable)."""
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/environ", "rb") as f:
                    if tag.encode() in f.read():
                        found.append(int(p))
            except OSError:
                pass
    return found


def _run(code: str, **kw) -> tuple[sandbox.Result, str]:
    tag = f"SANDBOX_TEST_{uuid.uuid4().hex}"
    res = sandbox.run(code, env={"SANDBOX_TEST_TAG": tag}, **kw)
    assert _survivors(tag) == [], "a process of the sandbox outlived the run"
    return res, tag


def test_plain_program_and_clean_environment(monkeypatch):
    monkeypatch.setenv("PKTJAX_HOST_SECRET", "hunter2")
    code = ("import json, os, sys\n"
            "print(json.dumps({'cwd': os.getcwd(), 'home': os.path.expanduser('~'), 'env': dict(os.environ),"
            " 'isolated': sys.flags.isolated}))\n"
            "sys.stderr.write('to stderr')\n")
    res, _ = _run(code)
    assert res.ok and res.returncode == 0 and res.stderr == "to stderr"
    info = json.loads(res.stdout)
    assert info["home"] == info["cwd"] != os.path.expanduser("~")
    assert "PKTJAX_HOST_SECRET" not in info["env"] and info["isolated"] == 1
    assert not Path(info["cwd"]).exists()  # the work dir is deleted afterwards
    assert "ns:net" in res.isolation or "socket-guard" in res.isolation


def test_exit_codes_and_exceptions_are_reported():
    assert _run("import sys; sys.exit(3)")[0].returncode == 3
    res, _ = _run("raise ValueError('boom')")
    assert res.returncode == 1 and not res.ok and "ValueError: boom" in res.stderr and res.killed is None


def test_infinite_loop_hits_the_wall_clock():
    t = time.monotonic()
    res, _ = _run("while True:\n    pass\n", timeout=1.5)
    assert res.timed_out and res.killed == "timeout" and res.returncode is None
    assert time.monotonic() - t < 6


def test_cpu_limit():
    res, _ = _run("while True:\n    pass\n", timeout=30, cpu_seconds=1)
    assert res.killed == "cpu" and not res.timed_out and res.duration < 20


def test_memory_bomb():
    res, _ = _run("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))\n", memory_mb=256, timeout=20)
    assert res.killed == "memory" and res.returncode == 1 and "MemoryError" in res.stderr


def test_fork_bomb_is_bounded_and_cleaned_up():
    code = ("import os\n"
            "while True:\n"
            "    try:\n        os.fork()\n"
            "    except OSError:\n        pass\n")
    res, _ = _run(code, timeout=3, max_processes=16)
    assert res.timed_out and res.killed == "timeout"
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes


def test_files_outside_the_work_dir_survive(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    os.chmod(tmp_path, 0o777)  # even a world-writable host folder is out of reach
    os.chmod(canary, 0o666)
    host_tmp = Path("/tmp") / f"sandbox-escape-{uuid.uuid4().hex}"
    code = f"""
import json, os, shutil
attempts = {{}}
def attempt(name, fn):
    try:
        fn()
        attempts[name] = "ok"
    except Exception as e:
        attempts[name] = type(e).__name__
attempt("remove", lambda: os.remove({str(canary)!r}))
attempt("overwrite", lambda: open({str(canary)!r}, "w").write("dead"))
attempt("new file beside", lambda: open({str(tmp_path / 'evil.txt')!r}, "w").write("x"))
attempt("rmtree", lambda: shutil.rmtree({str(tmp_path)!r}))
attempt("repo", lambda: open({str(Path(__file__).parent / 'evil.txt')!r}, "w").write("x"))
attempt("etc", lambda: open("/etc/evil.txt", "w").write("x"))
attempt("tmp", lambda: open({str(host_tmp)!r}, "w").write("x"))
print(json.dumps(attempts))
"""
    res, _ = _run(code)
    attempts = json.loads(res.stdout)
    assert canary.read_text() == "alive"
    assert not (tmp_path / "evil.txt").exists() and not (Path(__file__).parent / "evil.txt").exists()
    assert not Path("/etc/evil.txt").exists() and not host_tmp.exists()
    for name in ("remove", "overwrite", "new file beside", "rmtree", "repo", "etc"):
        assert attempts[name] != "ok", name
    if "private-tmp" not in res.isolation:  # without a mount namespace /tmp itself is shared
        host_tmp.unlink(missing_ok=True)


def test_host_home_is_out_of_reach():
    home = Path(os.path.expanduser("~"))
    canary = home / f".pktjax-sandbox-canary-{uuid.uuid4().hex}"
    canary.write_text("secret")
    os.chmod(canary, 0o644)
    try:
        code = (f"import os\ntry:\n    print(open({str(canary)!r}).read())\nexcept OSError as e:\n"
                f"    print('denied', type(e).__name__)\nprint(os.path.expanduser('~') == {str(home)!r})\n")
        res, _ = _run(code)
        assert res.ok and "secret" not in res.stdout
        assert res.stdout.split() == ["denied", res.stdout.split()[1], "False"]
    finally:
        canary.unlink()


def test_no_network():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).send(b'leak')\n"
            f"    print('connected')\nexcept OSError as e:\n    print('refused', e)\n")
    try:
        res, _ = _run(code)
        with pytest.raises(socket.timeout):
            server.accept()
    finally:
        server.close()
    assert res.ok and res.stdout.startswith("refused")


def test_socket_guard_without_namespaces():
    res, _ = _run("import socket\nsocket.socket()\n", namespaces=False)
    assert "socket-guard" in res.isolation and "network access is disabled" in res.stderr


def test_cannot_kill_parent_or_host():
    code = (f"import os, signal\nout = []\n"
            f"for pid in (os.getppid(), 1, {os.getpid()}):\n"
            f"    try:\n        os.kill(pid, signal.SIGKILL)\n        out.append('sent')\n"
            f"    except OSError as e:\n        out.append(type(e).__name__)\n"
            f"print(out)\n")
    res, _ = _run(code)
    assert res.ok, res  # the program goes on: its parent (init of its pid namespace) did not die
    outcome = ast.literal_eval(res.stdout.strip())
    assert outcome[2] != "sent"  # the host's pid is out of reach
    res, _ = _run("import os, signal\nos.killpg(0, signal.SIGKILL)\n")
    assert res.killed == "signal SIGKILL" and res.returncode == -9


def test_daemon_that_escapes_is_killed():
    code = """
import os, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.closerange(0, 1024)
        for _ in range(100):
            time.sleep(0.05)
        open(os.path.join(os.environ["HOME"], "still-alive"), "w").write("x")
        os._exit(0)
    os._exit(0)
print("parent exits")
"""
    res, tag = _run(code)
    assert res.ok and res.stdout.strip() == "parent exits"
    time.sleep(1.0)
    assert _survivors(tag) == []


def test_huge_output_is_capped():
    res, _ = _run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", timeout=20, max_output=1 << 20)
    assert res.killed == "output" and res.truncated and len(res.stdout) == 1 << 20 and res.duration < 15
    res, _ = _run("import sys\nsys.stderr.write('e' * 5000)\n", max_output=1000)
    assert len(res.stderr) == 1000 and res.killed == "output"


def test_file_size_limit():
    res, _ = _run("open('big', 'wb').write(b'x' * (8 * 2**20))\n", file_size_mb=1)
    assert res.returncode == 1 and "File too large" in res.stderr


def test_run_many_keeps_order():
    results = sandbox.run_many([f"print({i})" for i in range(6)], workers=3)
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(6)]
