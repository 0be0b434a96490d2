"""The write discipline of a run folder: every file and folder written atomically, checksums recorded when a
result is written and verified when it is read, one ``read_jsonl``, a lock held for the run, and orbax
checkpoints that fall back to the previous good step when the latest is damaged.

- :func:`atomic_write` / :func:`write_json` / :func:`atomic_folder`: a temporary sibling (``.NAME.tmp-XXXX``)
  written, fsynced and renamed into place, so a kill at any moment leaves the old file or the new one, never a
  half-written one. ``checksum=True`` also records the file's sha256 in ``.NAME.sha256`` (written first: a kill
  between the two leaves a checksum that does not match, and the file counts as damaged, never as good).
- :func:`read_json` / :func:`read_text` verify that checksum and the JSON / the UTF-8 text; :func:`read_result`
  turns a damaged result into "not computed yet" (removed, said on stderr) so that the stage runs again.
- :func:`read_jsonl`: the one JSONL reader: UTF-8 JSON lines, each checked; a bad line is a :class:`DataError`
  naming file and line, or (``on_bad="trim"``) a half-cut last line (a kill during an append) is dropped with a
  note and trimmed from the file, or (``on_bad="drop"``) every bad line is dropped with a note and the file
  rewritten. :func:`append_jsonl` appends whole lines and fsyncs them.
- :func:`clean_temps` removes the temporary paths an earlier, killed run left behind.
- :func:`lock`: an exclusive lock on the output folder for the run (``.pktjax.lock``, ``flock``: the kernel
  releases it when the holder dies); a second job is refused with the holder's pid and start time.
- :class:`Checkpoints`: the one orbax code path of both trainers, with a ``pktjax.json`` manifest (sha256 of
  every file, plus the step's metadata) in each step folder.
- :func:`is_disk_full`: whether an exception (``ENOSPC``, tensorstore's ``RESOURCE_EXHAUSTED``) means a full disk.
- :func:`fault_point`: a test-only hook; ``PKTJAX_FAULT=NAME[@N][=kill|enospc|raise]`` kills the process
  (SIGKILL, as ``kill -9``), raises ``ENOSPC`` or raises :class:`FaultInjected` (a ``BaseException``, so that
  nothing handles it: an in-process stand-in for a kill) at the ``N``-th pass (default 1st) through the point.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from pktjax.errors import CheckpointError, ConfigError, DamagedFileError, DataError, LockedError

FAULT_ENV = "PKTJAX_FAULT"
LOCK_FILE = ".pktjax.lock"
MANIFEST = "pktjax.json"
# what a killed writer leaves: our temporaries (.NAME.tmp-XXXX, older .NAME.tmp), orbax's unfinished step folders
_TEMP = re.compile(r"^\..+\.tmp(-[^/]*)?$|\.orbax-checkpoint-tmp")
_fault_hits: dict[str, int] = {}


class FaultInjected(BaseException):
    """Raised at a fault point by ``PKTJAX_FAULT=NAME=raise`` (tests only)."""


# ------------------------------------------------------------------------------------------------ fault hook

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def check_local(path: str | os.PathLike, what: str = "--out") -> None:
    """Refuse an output path that is a URL (``gs://…``, ``s3://…``, ``file://…``) for a command that writes its
    outputs in place: the run folder's atomic writes are renames within a local file system and its lock is
    ``fcntl``, neither of which an object store offers. (``pktjax transfer`` takes a URL: it stages the run
    folder locally and mirrors it, :mod:`pktjax.remote`.)"""
    text = os.fspath(path)
    if _URL.match(text):
        raise ConfigError(f"{what} {text!r} is a URL; this command writes to a local or mounted file system (the "
                          "run folder writes by renaming and locks with fcntl). Mount the bucket, e.g. `gcsfuse "
                          "BUCKET /mnt/BUCKET`, and pass the mounted path (--out /mnt/BUCKET/run); for file:// give "
                          "the plain path. Only `pktjax transfer` writes to a URL (--out gs://BUCKET/run), through a "
                          "local staging folder.")


def fault_point(name: str) -> None:
    """Die (SIGKILL) or raise ``ENOSPC`` here when ``$PKTJAX_FAULT`` names this point (tests only)."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, action = spec.partition("=")
    target, _, nth = target.partition("@")
    if target != name:
        return
    _fault_hits[spec] = _fault_hits.get(spec, 0) + 1  # counted per setting: a new one starts again at 1
    if _fault_hits[spec] != int(nth or 1):
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    if action == "raise":
        raise FaultInjected(name)
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------------- atomic writes

def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    return Path(name)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def checksum_path(path: Path) -> Path:
    """Where ``path``'s sha256 is recorded: ``.NAME.sha256`` beside it."""
    return path.with_name(f".{path.name}.sha256")


def atomic_write(path: str | os.PathLike, data: str | bytes, *, checksum: bool = False) -> Path:
    """Write ``data`` to ``path`` through a fsynced temporary sibling and a rename (parents created).
    ``checksum``: record its sha256 in :func:`checksum_path` first."""
    path = Path(path)
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    if checksum:
        atomic_write(checksum_path(path), sha256_bytes(raw) + "\n")
    tmp = _temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        fault_point(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def write_json(path: str | os.PathLike, obj: Any, *, checksum: bool = False, indent: int | None = 1) -> Path:
    """``obj`` as JSON (UTF-8, non-ASCII kept), written by :func:`atomic_write`."""
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str), checksum=checksum)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_folder(path: Path, what: str = "output", overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder that replaces ``path`` only when the block finishes without error.

    A non-empty ``path`` is refused unless ``overwrite``; on any error the temporary folder is removed, so a
    crash never leaves a half-written ``path`` (and a kill leaves only a ``.NAME.tmp-*`` that
    :func:`clean_temps` removes).
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{path}: folder exists and is not empty; choose a new {what} folder.")
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        fault_point(f"folder:{path.name}")
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def clean_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed writers left anywhere under ``folder``; returns them.
    Call it while holding the folder's :func:`lock` (another job's temporaries are live)."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for root, dirs, files in os.walk(folder):
        for name in [d for d in dirs if _TEMP.search(d)]:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            dirs.remove(name)
            removed.append(Path(root, name))
        for name in files:
            if _TEMP.search(name):
                Path(root, name).unlink(missing_ok=True)
                removed.append(Path(root, name))
    return removed


# ------------------------------------------------------------------------------------------- reading back

def verify(path: Path) -> bool | None:
    """``True``/``False``: whether ``path`` matches its recorded sha256; ``None`` when none was recorded."""
    side = checksum_path(path)
    if not side.is_file():
        return None
    return path.is_file() and side.read_text().strip() == sha256_file(path)


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """A text file written by :func:`atomic_write`: checksum (when recorded) and UTF-8 verified. A damaged file
    is a :class:`DamagedFileError` naming it."""
    path = Path(path)
    if verify(path) is False:
        raise DamagedFileError(f"{path}: the {what} does not match the checksum recorded when it was written "
                               "(damaged or edited).")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFileError(f"{path}: the {what} is not UTF-8 text ({e.reason} at byte {e.start}).") from None


def read_json(path: str | os.PathLike, what: str = "file", expect: type = dict) -> Any:
    """A JSON file written by :func:`write_json`: checksum (when recorded), UTF-8 and JSON verified, top level of
    type ``expect``. A damaged file is a :class:`DamagedFileError` naming it."""
    path = Path(path)
    try:
        obj = json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise DamagedFileError(f"{path}: the {what} is not valid JSON ({e}); it is damaged or cut short.") from None
    if not isinstance(obj, expect):
        raise DamagedFileError(f"{path}: the {what} holds a JSON {type(obj).__name__}, not a {expect.__name__}.")
    return obj


def read_result(path: str | os.PathLike, what: str = "result", check: Callable[[Any], None] | None = None
                ) -> dict | None:
    """A finished stage's result file, or ``None`` when it is missing or damaged: a damaged one (checksum, JSON,
    or ``check`` raising ``KeyError``/``TypeError``/``ValueError``) is removed with a note on stderr, so the
    stage that writes it runs again."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        obj = read_json(path, what)
        if check is not None:
            check(obj)
        return obj
    except (DamagedFileError, KeyError, TypeError, ValueError) as e:
        print(f"pktjax: {path} is damaged ({str(e).removeprefix(str(path) + ': ')}); recomputing it.",
              file=sys.stderr)
        path.unlink(missing_ok=True)
        checksum_path(path).unlink(missing_ok=True)
        return None


def read_jsonl(path: str | os.PathLike, limit: int | None = None, *, check: Callable[[Any, str], None] | None = None,
               on_bad: str = "error", what: str = "data file") -> list[Any]:
    """JSON lines of ``path`` (a ``.gz`` file decompressed; blank lines skipped; at most ``limit`` rows), the one
    JSONL reader of the package. ``check(row, "file:line")`` raises a :class:`DataError` for a row of the wrong
    shape. A bad line (not UTF-8, not JSON, refused by ``check``) is handled by ``on_bad``:

    - ``"error"`` (input data): a :class:`DataError` naming file and line;
    - ``"trim"`` (a log that is appended to): a last line without its newline that does not decode was cut short
      by a kill, and is dropped with a note and cut from the file; any other bad line is an error;
    - ``"drop"`` (records that are computed again when missing): every bad line is dropped with a note naming
      file and line, and the file rewritten without them.

    A missing file is a :class:`DataError` ("no such ``what``")."""
    if on_bad not in ("error", "trim", "drop"):
        raise ValueError(f"on_bad={on_bad!r}: choose 'error', 'trim' or 'drop'.")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such {what}.")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    rows, dropped, start, n = [], 0, 0, 0
    while start < len(raw) and (limit is None or len(rows) < limit):
        end = raw.find(b"\n", start)
        last = end < 0
        line = raw[start:] if last else raw[start:end]
        n += 1
        where, row, problem = f"{path}:{n}", None, None
        try:
            text = line.decode("utf-8")
            row = json.loads(text) if text.strip() else None
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 text ({e.reason} at byte {e.start} of the line)"
        except json.JSONDecodeError as e:
            problem = f"not valid JSON ({e})"
        if problem and last and on_bad == "trim":
            print(f"pktjax: {where}: dropping a last line cut short ({len(line)} bytes).", file=sys.stderr)
            _truncate(path, start)
            break
        if row is not None and check is not None:
            try:
                check(row, where)
            except DataError as e:
                if on_bad != "drop":
                    raise
                problem = str(e).removeprefix(f"{where}: ").rstrip(".")
        if problem and on_bad != "drop":
            raise DataError(f"{where}: {problem}.")
        if problem:
            print(f"pktjax: {where}: damaged line dropped ({problem}); what it held is computed again.",
                  file=sys.stderr)
            dropped += 1
        elif row is not None:
            rows.append(row)
        if last:
            break
        start = end + 1
    if dropped and (limit is None or len(rows) < limit):  # the whole file was read: keep its good lines only
        write_jsonl(path, rows)
    return rows


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)
        fh.flush()
        os.fsync(fh.fileno())


def append_jsonl(path: str | os.PathLike, rows: list[Any]) -> None:
    """Append ``rows`` as JSON lines and fsync them (a kill leaves at most one half-cut last line, which
    :func:`read_jsonl` with ``on_bad="trim"`` drops)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    with open(path, "ab") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_jsonl(path: str | os.PathLike, rows: list[Any]) -> Path:
    """Replace ``path`` with ``rows`` as JSON lines, atomically."""
    return atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------------ the lock

_held: dict[Path, list] = {}  # folder -> [open lock file, depth]: a process may re-enter its own lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _is_main_process() -> bool:
    jax = sys.modules.get("jax")
    return jax is None or jax.process_index() == 0


@contextlib.contextmanager
def lock(folder: str | os.PathLike, what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created) for the block: ``folder/.pktjax.lock``, taken with
    ``flock`` (released by the kernel when the process ends, however it ends) and holding the pid, host and start
    time. Another live holder: :class:`LockedError` naming them. The same process may nest locks on a folder;
    only process 0 of a multi-process job takes it. Temporaries left by a killed holder are removed, and a folder
    the lock created that holds nothing else at the end (a run refused by its checks) is removed again."""
    folder = Path(folder).expanduser().absolute()
    if folder in _held or not _is_main_process():
        if folder in _held:
            _held[folder][1] += 1
        try:
            yield
        finally:
            if folder in _held:
                _held[folder][1] -= 1
        return
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    fh = open(path, "a+")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        h = _holder(path)
        fh.close()
        raise LockedError(f"{folder}: another {what} is using this folder (pid {h.get('pid', '?')} on "
                          f"{h.get('host', '?')}, started {h.get('started', '?')}); wait for it to finish or stop "
                          "it, then rerun (a finished or killed run releases the folder).") from None
    except OSError:  # no flock on this file system: fall back to the recorded pid
        h = _holder(path)
        if h.get("host") == socket.gethostname() and h.get("pid") not in (None, os.getpid()) and \
                _pid_alive(int(h["pid"])):
            fh.close()
            raise LockedError(f"{folder}: another {what} is using this folder (pid {h['pid']}, started "
                              f"{h.get('started', '?')}); wait for it to finish or stop it.") from None
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started":
                         datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "command": " ".join(sys.argv)}) + "\n")
    fh.flush()
    _held[folder] = [fh, 0]
    try:
        clean_temps(folder)
        yield
    finally:
        del _held[folder]
        fh.seek(0)
        fh.truncate()
        if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:  # a run refused by its checks
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        fh.close()  # closing releases the flock


# -------------------------------------------------------------------------------------------------- disk full

def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) reports a full disk or quota: ``ENOSPC``/``EDQUOT``, or the
    ``RESOURCE_EXHAUSTED`` / "No space left" that tensorstore puts in its messages."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if any(s in text for s in ("No space left on device", "OS error 28", "ENOSPC", "Disk quota exceeded")) or \
                ("RESOURCE_EXHAUSTED" in text and "writ" in text.lower()):  # not XLA's out-of-memory
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# ------------------------------------------------------------------------------------------- checkpoints

def _tree_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


class Checkpoints:
    """Orbax checkpoints of pytrees under ``folder/<step>/`` (synchronous saves, every process writes its shards),
    each step with a ``pktjax.json`` manifest written by process 0 after orbax finishes it: the sha256 of every
    file of the step and the caller's ``meta``. ``keep``: how many steps orbax keeps (``None``: all).

    A step whose files do not match its manifest, or that orbax cannot read, is *damaged*: :meth:`restore`
    refuses it, :meth:`latest_good` deletes it and falls back to the previous step (saying so on stderr). A step
    without a manifest (a kill between orbax's finish and the manifest) is read unverified."""

    def __init__(self, folder: str | os.PathLike, keep: int | None = None, create: bool = True):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.folder = Path(folder).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False, create=create)
        self.manager = ocp.CheckpointManager(self.folder, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _dir(self, step: int) -> Path:
        return self.folder / str(step)

    def save(self, step: int, tree: Any, meta: Any = None) -> None:
        """Save ``tree`` as ``step`` (replacing a step of that number), then its manifest."""
        if step in self.manager.all_steps():
            self.delete(step)
        self.manager.save(step, args=self._ocp.args.StandardSave(tree), force=True)
        self.manager.wait_until_finished()
        fault_point("checkpoint:before-manifest")
        if _is_main_process():
            write_json(self._dir(step) / MANIFEST, {"sha256": _tree_hashes(self._dir(step)), "meta": meta})

    def meta(self, step: int) -> Any:
        path = self._dir(step) / MANIFEST
        return read_json(path, "checkpoint manifest").get("meta") if path.is_file() else None

    def problem(self, step: int) -> str | None:
        """Why ``step`` is damaged (a missing, changed or unexpected file), or ``None`` when it verifies."""
        folder, path = self._dir(step), self._dir(step) / MANIFEST
        if not folder.is_dir():
            return f"{folder} is missing"
        if not path.is_file():
            return None
        try:
            want = read_json(path, "checkpoint manifest")["sha256"]
        except (DamagedFileError, KeyError) as e:
            return str(e)
        got = _tree_hashes(folder)
        for name in sorted(set(want) | set(got)):
            if want.get(name) != got.get(name):
                state = "missing" if name not in got else "unexpected" if name not in want else "changed"
                return f"{folder / name} is {state} since the step was saved"
        return None

    def restore(self, step: int, template: Any = None) -> Any:
        """Step ``step`` (into ``template``'s shapes, dtypes and shardings when given); a damaged step is a
        :class:`DamagedFileError` naming the file."""
        problem = self.problem(step)
        if problem:
            raise DamagedFileError(f"checkpoint {self._dir(step)} is damaged: {problem}.")
        args = self._ocp.args.StandardRestore(template) if template is not None else self._ocp.args.StandardRestore()
        try:
            return self.manager.restore(step, args=args)
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except Exception as e:  # tensorstore/orbax raise many kinds for unreadable files
            if is_disk_full(e):
                raise
            raise DamagedFileError(f"checkpoint {self._dir(step)} cannot be read ({type(e).__name__}: "
                                   f"{str(e)[:300]}).") from None

    def latest_good(self, template: Any = None, at_most: int | None = None) -> tuple[int | None, Any]:
        """``(step, tree)`` of the newest step (``<= at_most``) that verifies and restores, deleting the damaged
        ones newer than it (each named on stderr); ``(None, None)`` when there is none."""
        for step in reversed(self.steps()):
            if at_most is not None and step > at_most:
                continue
            try:
                return step, self.restore(step, template)
            except DamagedFileError as e:
                print(f"pktjax: {e} Falling back to the previous checkpoint.", file=sys.stderr)
                self.delete(step)
        return None, None

    def delete(self, step: int) -> None:
        if step in self.manager.all_steps():
            self.manager.delete(step)
        shutil.rmtree(self._dir(step), ignore_errors=True)
        self.manager.reload()

    def close(self) -> None:
        self.manager.close()
