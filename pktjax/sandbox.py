"""Run untrusted Python (generated code and its tests) in a contained child process.

Layout of one run::

    host (this process)
      └─ launcher  python -I -S, new session; unshares net/pid/mount/ipc namespaces (a user namespace too when
         │         not root); dies with the host (PR_SET_PDEATHSIG)
         └─ init   pid 1 of the new pid namespace: private /tmp, /var/tmp, /dev/shm, /run/lock (tmpfs), own /proc;
            │      reaps orphans; reports the program's exit status on a pipe; when it exits the kernel kills
            │      everything left in the namespace (daemons included)
            └─ program  python -I main.py in a fresh temp dir, as an unprivileged uid (when the host is root),
                        with RLIMIT_CPU/AS/FSIZE/NPROC/NOFILE/CORE, no new privileges, a clean environment

Containment actually active is reported in :attr:`Result.isolation` (and by :func:`isolation`). Where the machine
allows no network namespace, the socket layer is blocked inside the program instead (a prelude replaces
``socket.socket`` and friends; best effort, not a security boundary). Where it allows no pid namespace, init is a
child subreaper that kills every descendant once the program ends, and the host kills leftovers it can identify
by the run's marker variable or uid. The host reads output through pipes with a byte cap and kills the whole
process group on the wall-clock timeout or on too much output.
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

_MIB = 1 << 20
_UID_SLOTS = 1000  # uids per host process; a run's uid needs no passwd entry
_uid_lock = threading.Lock()
_uid_counter = itertools.count()
_uids_in_use: set[int] = set()
_python_cache: dict[int, str] = {}


@dataclass
class Result:
    """Outcome of :func:`run`.

    ``returncode``: the program's exit code (negative signal number if a signal ended it; None if it never
    reported). ``killed``: why it was stopped or failed for a limit — ``"timeout"``, ``"cpu"``, ``"memory"``,
    ``"output"``, ``"signal SIGxxx"``, ``"sandbox error: ..."`` — or None. ``stdout``/``stderr`` are capped at
    ``max_output`` bytes each (``truncated`` tells). ``duration`` is wall seconds. ``isolation`` names the
    containment that was active.
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    killed: str | None
    duration: float
    truncated: bool = False
    isolation: str = ""
    cpu_seconds: float | None = None

    @property
    def ok(self) -> bool:
        """The program exited with status 0 within every limit."""
        return self.returncode == 0 and not self.timed_out and self.killed is None


@dataclass(frozen=True)
class _Spec:
    """The limits and inputs of one run (see :func:`run`)."""

    timeout: float = 10.0
    memory_mb: int = 1024
    cpu_seconds: float | None = None
    max_output: int = _MIB
    file_size_mb: int = 16
    max_processes: int = 32
    max_open_files: int = 64
    tmpfs_mb: int = 64
    stdin: str | None = None
    files: dict[str, str] | None = None
    env: dict[str, str] | None = None
    python: str | None = None
    namespaces: bool = True

    @property
    def cpu_limit(self) -> int:
        return max(1, int(self.cpu_seconds if self.cpu_seconds is not None else self.timeout + 1))


@dataclass
class _Streams:
    cap: int
    out: bytearray = field(default_factory=bytearray)
    err: bytearray = field(default_factory=bytearray)
    status: bytearray = field(default_factory=bytearray)
    overflow: bool = False


# The launcher (pktjax/sandbox_launcher.py) runs as ``python -I -S <its path> <json>``.
_LAUNCHER = str(Path(__file__).with_name("sandbox_launcher.py"))

# Installed before the program when it runs without a network namespace: the socket layer refuses sockets.
_SOCKET_GUARD = r'''
import os as _os
if _os.environ.get("PKTJAX_SANDBOX_NET") != "namespace":
    _guard()
'''

_GUARD_FUNC = r'''
def _guard():
    import socket as _s, _socket

    def _refuse(*a, **k):
        raise OSError(101, "network access is disabled in this sandbox")

    class _Sock:
        def __new__(cls, *a, **k):
            _refuse()

    for _mod in (_s, _socket):
        _mod.socket = _Sock
        for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo",
                      "gethostbyname"):
            if hasattr(_mod, _name):
                setattr(_mod, _name, _refuse)
'''

_PRELUDE = r'''
import runpy, sys
sys.path.insert(0, {workdir!r})
{guard_func}
{guard}
del _guard
sys.argv = ["main.py"]
runpy.run_path("main.py", run_name="__main__")
'''


# --------------------------------------------------------------------------------------------------- host side

def run(code: str, timeout: float = 10.0, memory_mb: int = 1024, *, cpu_seconds: float | None = None,
        max_output: int = _MIB, file_size_mb: int = 16, max_processes: int = 32, max_open_files: int = 64,
        tmpfs_mb: int = 64, stdin: str | None = None, files: dict[str, str] | None = None,
        env: dict[str, str] | None = None, python: str | None = None, namespaces: bool = True) -> Result:
    """Run ``code`` as ``main.py`` in a contained child process and return its :class:`Result`.

    ``timeout``: wall seconds for the whole run (the process group and anything left in its namespace is
    killed). ``memory_mb``: address-space limit. ``cpu_seconds``: CPU limit (default ``timeout + 1``).
    ``max_output``: bytes kept per stream; more output stops the program (``killed="output"``).
    ``file_size_mb``, ``max_processes``, ``max_open_files``: the other rlimits (``max_processes`` counts the
    run's own uid when the host is root). ``files``: extra files written beside ``main.py``. ``env``: extra
    environment variables (the environment is otherwise empty but for PATH, HOME, TMPDIR and LANG).
    ``python``: interpreter for the program (default: this one, or a system one when the sandbox uid cannot
    read this one). ``namespaces=False`` skips the namespaces (for comparison; not recommended).
    """
    if timeout <= 0 or memory_mb <= 0:
        raise ValueError(f"sandbox.run: timeout and memory_mb must be positive (got {timeout}, {memory_mb}).")
    spec = _Spec(timeout, memory_mb, cpu_seconds, max_output, file_size_mb, max_processes, max_open_files, tmpfs_mb,
                 stdin, files, env, python, namespaces)
    uid = _acquire_uid()
    workdir = Path(tempfile.mkdtemp(prefix="pktjax-sbx-"))
    try:
        return _run_in(workdir, uid, code, spec)
    finally:
        _remove_tree(workdir)
        _release_uid(uid)


def run_many(codes: Sequence[str], workers: int | None = None, **kw) -> list[Result]:
    """:func:`run` over many programs on a thread pool (each run is its own process tree); results in order."""
    workers = workers or max(2, min(8, (os.cpu_count() or 2) * 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: run(c, **kw), codes))


def isolation() -> str:
    """What containment :func:`run` gets on this machine, e.g. ``"uid=300001, ns:net,ns:pid,..."``."""
    return run("pass", timeout=10).isolation


def _run_in(workdir: Path, uid: int | None, code: str, spec: _Spec) -> Result:
    """Write the files, start the launcher, pump its output until it is done or out of time, then clean up."""
    marker = uuid.uuid4().hex
    _write_files(workdir, code, spec.files, spec.stdin, uid)
    program_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
                   "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "PKTJAX_SANDBOX": marker, **(spec.env or {})}
    python = spec.python or _program_python(uid)
    status_r, status_w = os.pipe()
    conf = {"status_fd": status_w, "host_pid": os.getpid(), "workdir": str(workdir), "tmpfs_mb": spec.tmpfs_mb,
            "limits": _limits(spec, uid), "uid": uid, "gid": uid, "env": program_env, "namespaces": spec.namespaces,
            "argv": [python, "-I", "-B", "_run.py"], "stdin": str(workdir / "_stdin.txt") if spec.stdin else None}
    start = time.monotonic()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", _LAUNCHER, json.dumps(conf)], cwd=str(workdir),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(status_w,), start_new_session=True, env={"PATH": "/usr/bin:/bin"})
    finally:
        os.close(status_w)
    streams = _Streams(cap=spec.max_output)
    try:
        timed_out = _pump(proc, status_r, streams, start + spec.timeout)
    finally:
        _kill_group(proc)
        os.close(status_r)
    _kill_leftovers(marker, uid)
    return _result(streams, timed_out, time.monotonic() - start, uid, spec.cpu_limit)


def _limits(spec: _Spec, uid: int | None) -> list[tuple[str, int, int]]:
    """``(RLIMIT name, soft, hard)`` for the program. The CPU hard limit is one second above the soft one
    (SIGXCPU first, then SIGKILL)."""
    mib = _MIB
    limits = [("RLIMIT_CPU", spec.cpu_limit, spec.cpu_limit + 1),
              ("RLIMIT_AS", spec.memory_mb * mib, spec.memory_mb * mib),
              ("RLIMIT_FSIZE", spec.file_size_mb * mib, spec.file_size_mb * mib),
              ("RLIMIT_NOFILE", spec.max_open_files, spec.max_open_files),
              ("RLIMIT_CORE", 0, 0)]
    if uid is not None:
        limits.append(("RLIMIT_NPROC", spec.max_processes, spec.max_processes))
    elif os.geteuid() != 0:  # the count may include the user's other processes (kernels before 5.14)
        n = spec.max_processes + sum(1 for pid in _pids() if _uid_of(pid) == os.getuid())
        limits.append(("RLIMIT_NPROC", n, n))
    return limits


def _uid_base() -> int:
    """First uid of this host process's block: above 300000 when the uid map allows, else below 65000."""
    try:
        extents = [tuple(int(x) for x in line.split()) for line in open("/proc/self/uid_map")]
    except OSError:
        extents = [(0, 0, 65536)]
    top = max(inside + count for inside, _, count in extents)
    if top >= 300_000 + 4000 * _UID_SLOTS:
        return 300_000 + (os.getpid() % 4000) * _UID_SLOTS
    return 50_000 + (os.getpid() % 14) * _UID_SLOTS


def _acquire_uid() -> int | None:
    """A uid that no other live run of this process uses, when the host is root (so that the NPROC limit,
    file permissions and the final kill-by-uid apply to this run alone); None otherwise."""
    if os.geteuid() != 0:
        return None
    base = _uid_base()
    with _uid_lock:
        for _ in range(_UID_SLOTS):
            uid = base + next(_uid_counter) % _UID_SLOTS
            if uid not in _uids_in_use:
                _uids_in_use.add(uid)
                return uid
    raise RuntimeError(f"sandbox: more than {_UID_SLOTS} concurrent runs in one process.")


def _release_uid(uid: int | None) -> None:
    with _uid_lock:
        _uids_in_use.discard(uid)


def _write_files(workdir: Path, code: str, files, stdin, uid) -> None:
    (workdir / "main.py").write_text(code)
    prelude = _PRELUDE.format(workdir=str(workdir), guard_func=_GUARD_FUNC, guard=_SOCKET_GUARD)
    (workdir / "_run.py").write_text(prelude)
    for name, text in (files or {}).items():
        path = (workdir / name).resolve()
        if workdir.resolve() not in path.parents:
            raise ValueError(f"sandbox.run: file name {name!r} leaves the work directory.")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    if stdin:
        (workdir / "_stdin.txt").write_text(stdin)
    if uid is not None:
        for p in [workdir, *workdir.rglob("*")]:
            os.chown(p, uid, uid, follow_symlinks=False)
    os.chmod(workdir, 0o700)


def _pump(proc: subprocess.Popen, status_r: int, streams: _Streams, deadline: float) -> bool:
    """Read stdout/stderr/status until the launcher is gone and the pipes are closed, the deadline passes
    (returns True) or output overflows. Never holds more than ``cap`` bytes per stream."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    sel.register(status_r, selectors.EVENT_READ, "status")
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                return True
            if exited_at is None and _has_exited(proc.pid):
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break  # something still holds a pipe open; the launcher is done
            for key, _ in sel.select(min(deadline - now, 0.05)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if _take(streams, key.data, data):
                    return False
    finally:
        sel.close()
    return False


def _take(streams: _Streams, which: str, data: bytes) -> bool:
    """Append ``data`` up to the cap; True when a stream overflowed (the program is then stopped)."""
    buf = {"out": streams.out, "err": streams.err, "status": streams.status}[which]
    room = streams.cap - len(buf) if which != "status" else 4096 - len(buf)
    buf += data[:max(0, room)]
    if which != "status" and len(data) > room:
        streams.overflow = True
        return True
    return False


def _has_exited(pid: int) -> bool:
    """Whether ``pid`` (our child) has exited, without reaping it (its pid and group stay reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group (before reaping, so the group id cannot be reused), then reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for f in (proc.stdout, proc.stderr):
        f.close()


def _kill_leftovers(marker: str, uid: int | None) -> None:
    """Kill processes that escaped the group: those of the run's uid, or carrying its marker variable."""
    needle = f"PKTJAX_SANDBOX={marker}".encode()
    for _ in range(3):
        if uid is not None:  # the uid marks every process of the run; it cannot be changed without privileges
            found = [pid for pid in _pids() if _uid_of(pid) == uid]
        else:
            found = [pid for pid in _pids() if needle in _environ(pid)]
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        if not found:
            return
        time.sleep(0.01)


def _pids() -> Iterable[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
    except OSError:
        return []


def _uid_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read(1 << 16)
    except OSError:
        return b""


def _result(streams: _Streams, timed_out: bool, duration: float, uid, cpu_limit: int) -> Result:
    status = streams.status.decode(errors="replace").splitlines()
    isolation = next((s.split(" ", 1)[1] if " " in s else "" for s in status if s.startswith("isolation")), "")
    if uid is not None:
        isolation = f"uid={uid}" + (f",{isolation}" if isolation else "")
    if "ns:net" not in isolation:
        isolation += ",socket-guard"
    error = next((s[6:] for s in status if s.startswith("error ")), None)
    returncode, cpu = None, None
    for s in status:
        kind, _, rest = s.partition(" ")
        if kind in ("exit", "signal"):
            code, cpu_s = rest.split()
            returncode, cpu = (int(code) if kind == "exit" else -int(code)), float(cpu_s)
    stderr = streams.err.decode(errors="replace")
    killed = _why_killed(timed_out, streams.overflow, error, returncode, cpu, cpu_limit, stderr)
    return Result(returncode=returncode, stdout=streams.out.decode(errors="replace"), stderr=stderr,
                  timed_out=timed_out, killed=killed, duration=duration,
                  truncated=streams.overflow, isolation=isolation, cpu_seconds=cpu)


def _why_killed(timed_out, overflow, error, returncode, cpu, cpu_limit, stderr) -> str | None:
    if timed_out:
        return "timeout"
    if overflow:
        return "output"
    if error:
        return f"sandbox error: {error}"
    if returncode is None:
        return "sandbox error: no exit status reported"
    if returncode < 0:
        sig = -returncode
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu is not None and cpu >= cpu_limit - 0.05):
            return "cpu"
        return f"signal {signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig}"
    if returncode != 0 and "MemoryError" in stderr[-2000:]:
        return "memory"
    return None


def _remove_tree(path: Path) -> None:
    def fix(func, p, _exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


# --------------------------------------------------------------------------------------------------- probes

_probe_lock = threading.Lock()


def _world_readable(path: str) -> bool:
    """Every directory above ``path`` is searchable by others, and ``path`` itself readable by others."""
    p = Path(path)
    try:
        for d in p.parents:
            if not os.stat(d).st_mode & 0o001:
                return False
        return bool(os.stat(p).st_mode & 0o004)
    except OSError:
        return False


def _program_python(uid: int | None) -> str:
    """An interpreter the program's uid can run with its standard library readable."""
    if uid is None:
        return sys.executable
    with _probe_lock:
        if 0 not in _python_cache:
            _python_cache[0] = _find_python(uid)
        return _python_cache[0]


def _find_python(uid: int) -> str:
    exe = os.path.realpath(sys.executable)
    lib = os.path.dirname(os.__file__)
    candidates = ([sys.executable] if _world_readable(exe) and _world_readable(os.path.join(lib, "os.py")) else [])
    candidates += [c for c in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3") or "")
                   if c and os.path.exists(c)]
    for cand in dict.fromkeys(candidates):
        if _probe_python(cand, uid):
            return cand
    raise RuntimeError("sandbox: no Python interpreter that an unprivileged user can run was found; pass "
                       "python=... (an interpreter outside any private home directory).")


def _probe_python(python: str, uid: int) -> bool:
    workdir = Path(tempfile.mkdtemp(prefix="pktjax-sbx-probe-"))
    try:
        code = "import collections, json, math, re, itertools, heapq, string\nprint('ok')"
        res = _run_in(workdir, uid, code, _Spec(timeout=20.0, max_output=4096, python=python))
        return res.ok and res.stdout.strip() == "ok"
    finally:
        _remove_tree(workdir)
