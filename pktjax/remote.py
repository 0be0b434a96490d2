"""A run folder at a URL (``gs://bucket/run``, ``s3://…``, ``file:///…``, ``memory://…``): the job runs in a local
*staging* folder, which keeps every guarantee of :mod:`pktjax.runfolder` (atomic renames, the ``fcntl`` lock,
checksums, logs trimmed on resume), and that folder is mirrored to and from the URL through fsspec.

- :func:`check_url`: the URL's file system is known and its package installed (``gs://`` needs ``gcsfs``), checked
  before any work; a :class:`ConfigError` naming the package to install otherwise.
- :func:`staging_folder`: where a URL's run is staged: ``$PKTJAX_HOME/staging/<sha256 of the URL>`` unless given.
- :func:`pull`: download what the URL holds that the staging folder has not synced or that changed at the URL
  since (a run resumes on a fresh machine from the bucket); each file lands by a rename, as
  :func:`runfolder.atomic_write` does. Work of this folder not pushed yet (a run killed before its push) is kept.
- :func:`push`: upload the files that changed since the last pull or push, each to a temporary name beside its
  own (``.NAME.tmp-XXXXXXXX``) then moved onto it, so a reader never sees a half-written file at a file's name;
  remote files that the staging folder dropped since they were synced (a finished evaluation's partial log, an
  old checkpoint step) are removed. Temporaries, locks and the sync record are never uploaded.
- :func:`mark_staging` / :func:`staging_token`: whether the processes of one job share a staging folder.

A file system's error (the network, permissions) is a :class:`RemoteError` (exit 2: rerun to resume).

Change detection is cheap: ``.pktjax.sync.json`` in the staging folder records, for each file synced, its local
size and mtime and the remote object's size and version stamp (GCS generation, S3 ETag, or a modification
time). A file whose local stat matches is not uploaded again; a remote file whose stamp matches is not downloaded
again. Only one job may write to a URL at a time: an object store has no lock (the staging folder's lock covers
one machine).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import posixpath
import random
import re
import uuid
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations

from pktjax.errors import ConfigError, DamagedFileError, PktjaxError, RemoteError
from pktjax.registry import home
from pktjax.runfolder import (_TEMP, LOCK_FILE, _temp_path, atomic_write, fault_point, is_disk_full, read_json,
                              write_json)

SYNC_FILE = ".pktjax.sync.json"
STAGING_FILE = ".pktjax.staging"  # a token process 0 leaves for the others: is this folder theirs too?
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# the fields, in order of preference, that change when an object is rewritten (GCS, S3, local and memory)
_STAMPS = ("generation", "ETag", "etag", "md5Hash", "mtime", "LastModified", "updated", "created")


def is_url(text: str | os.PathLike) -> bool:
    return isinstance(text, str) and _URL.match(text) is not None


def check_url(url: str, what: str = "--out") -> None:
    """Refuse a URL whose file system fsspec does not know or whose package is missing (no network, no object
    made: only the file system's class is imported)."""
    protocol = _URL.match(url).group(1).lower()
    try:
        fsspec.get_filesystem_class(protocol)
    except ValueError:
        raise ConfigError(f"{what} {url!r}: no file system is known for {protocol}://; give a local folder or a URL "
                          "fsspec reads (gs://, s3://, file://, memory://, ...).") from None
    except ImportError as e:
        package = known_implementations.get(protocol, {}).get("class", protocol).split(".")[0]
        raise ConfigError(f"{what} {url!r}: {protocol}:// needs the {package} package ({e}); install it with "
                          f"`pip install {package}`, or write to a local folder.") from None


def staging_folder(url: str, staging: str | os.PathLike | None = None) -> Path:
    """The local folder a URL's run is staged in: ``staging`` when given, else
    ``$PKTJAX_HOME/staging/<first 16 hex digits of the URL's sha256>``."""
    if staging is not None:
        return Path(staging).expanduser()
    return home() / "staging" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def mark_staging(local: str | os.PathLike) -> int:
    """Leave a fresh random token in the staging folder ``local`` and return it (process 0 of a multi-process
    job: a process that reads the same token back shares the folder)."""
    token = random.randrange(1, 2**31)
    atomic_write(Path(local) / STAGING_FILE, f"{token}\n")
    return token


def staging_token(local: str | os.PathLike) -> int | None:
    """The token :func:`mark_staging` left in ``local`` (``None``: none, or not one)."""
    try:
        return int((Path(local) / STAGING_FILE).read_text())
    except (OSError, ValueError):
        return None


def _open(url: str):
    fs, root = fsspec.core.url_to_fs(url)
    return fs, root.rstrip("/")


def _skipped(rel: str) -> bool:
    """Never synced: our temporaries (any part of the path), the lock, the sync record, the staging token."""
    parts = rel.split("/")
    return parts[-1] in (LOCK_FILE, SYNC_FILE, STAGING_FILE) or any(_TEMP.search(p) for p in parts)


def _stamp(info: dict[str, Any]) -> str:
    """A remote file's version: its size and the first stamp field it has (a datetime as its timestamp, so that
    listings and ``info`` agree)."""
    value = next((info[k] for k in _STAMPS if info.get(k) is not None), None)
    if isinstance(value, datetime.datetime):
        value = value.timestamp()
    if isinstance(value, float):
        value = f"{value:.6f}"
    return f"{info.get('size')}:{value}"


def _local_stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _local_files(local: Path) -> dict[str, list[int]]:
    out = {}
    for root, dirs, files in os.walk(local):
        dirs[:] = [d for d in dirs if not _TEMP.search(d)]
        for name in files:
            path = Path(root, name)
            rel = path.relative_to(local).as_posix()
            if not _skipped(rel) and path.is_file():
                out[rel] = _local_stat(path)
    return out


def _read_record(local: Path, url: str) -> dict[str, list]:
    """``{relative path: [local size, local mtime_ns, remote stamp]}`` of the files last synced with ``url``
    (empty for another URL, or when the record is missing or damaged: every file is then compared again)."""
    path = local / SYNC_FILE
    try:
        rec = read_json(path, "sync record") if path.is_file() else {}
    except DamagedFileError:  # a damaged record costs one full comparison, nothing else
        return {}
    return dict(rec.get("files", {})) if rec.get("url") == url else {}


def _write_record(local: Path, url: str, files: dict[str, list]) -> None:
    write_json(local / SYNC_FILE, {"url": url, "files": files}, indent=None)


@contextlib.contextmanager
def _failures(action: str, url: str, local: Path):
    """A file system's error (the network, permissions) as a :class:`RemoteError` that says what to do; a full
    local disk and pktjax's own errors pass as they are."""
    try:
        yield
    except Exception as e:
        if isinstance(e, PktjaxError) or is_disk_full(e):
            raise
        raise RemoteError(f"{action} {url} failed ({type(e).__name__}: {e}). The staging folder {local} holds what "
                          "the run has done; rerun the same command to resume (and upload it).") from e


def pull(url: str, local: str | os.PathLike) -> list[str]:
    """Mirror ``url`` into the folder ``local`` (created): download each remote file that this folder has not
    synced, or that changed at the URL since it was last synced, and remove the local files that were synced but
    are gone from the URL (unless changed here since). A file changed or removed here but not at the URL since the
    last sync is this folder's newer work (a run killed before its push): it is kept as it is, for the next push.
    Temporaries that a killed push left at the URL are removed. Returns the relative paths downloaded."""
    url = url.rstrip("/")
    local = Path(local)
    local.mkdir(parents=True, exist_ok=True)
    with _failures("downloading", url, local):
        return _pull(url, local)


def _pull(url: str, local: Path) -> list[str]:
    fs, root = _open(url)
    record = _read_record(local, url)
    remote, leftovers = {}, []
    if fs.exists(root):
        for name, info in fs.find(root, detail=True).items():
            rel = posixpath.relpath(name, root)
            if info.get("type", "file") == "file":
                if not _skipped(rel):
                    remote[rel] = _stamp(info)
                elif _TEMP.search(posixpath.basename(rel)):
                    leftovers.append(name)
    for name in leftovers:  # uploads a killed push left (one job per URL: none is in progress)
        fs.rm_file(name)
    fetched = []
    try:
        for rel, stamp in sorted(remote.items()):
            path, known = local / rel, record.get(rel)
            if known and known[2] == stamp:  # the URL's copy is the one last synced: this folder's is as new
                continue                     # (changed or removed here since: the next push sends that)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = _temp_path(path)
            try:
                fs.get_file(f"{root}/{rel}", str(tmp))
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            record[rel] = [*_local_stat(path), stamp]
            fetched.append(rel)
        for rel in [r for r in record if r not in remote]:
            path = local / rel
            if path.is_file() and _local_stat(path) == record[rel][:2]:
                path.unlink()
            del record[rel]
    finally:
        _write_record(local, url, record)
    return fetched


def _move(fs, src: str, dst: str) -> None:
    """Move the file ``src`` onto ``dst`` without expanding either as a glob (a run folder's names may hold
    ``[``): a rename on a local file system, else a copy inside the store (an object appears whole, as GCS and S3
    write it) and the source removed."""
    if isinstance(fs, LocalFileSystem):
        os.replace(fs._strip_protocol(src), fs._strip_protocol(dst))
    else:
        fs.cp_file(src, dst)
        fs.rm_file(src)


def push(local: str | os.PathLike, url: str) -> list[str]:
    """Mirror the folder ``local`` to ``url``: upload each file changed since it was last synced (to a temporary
    name beside it, then moved onto its name), and remove the remote files that were synced but are gone here.
    A failed upload leaves the remote file as it was and is retried by the next push. Returns the relative paths
    uploaded."""
    url = url.rstrip("/")
    local = Path(local)
    with _failures("uploading to", url, local):
        return _push(local, url)


def _push(local: Path, url: str) -> list[str]:
    fs, root = _open(url)
    record = _read_record(local, url)
    current = _local_files(local)
    made: set[str] = set()
    sent = []
    try:
        for rel, stat in sorted(current.items()):
            known = record.get(rel)
            if known and known[:2] == stat:
                continue
            target = f"{root}/{rel}"
            parent = posixpath.dirname(target)
            if parent not in made:
                fs.makedirs(parent, exist_ok=True)
                made.add(parent)
            tmp = f"{parent}/.{posixpath.basename(rel)}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                fs.put_file(str(local / rel), tmp)
                fault_point(f"push:{posixpath.basename(rel)}")
                _move(fs, tmp, target)
            except BaseException:
                try:
                    if fs.exists(tmp):
                        fs.rm_file(tmp)
                except Exception:  # a leftover temporary is ignored by pull; the first error is the one to see
                    pass
                raise
            record[rel] = [*stat, _stamp(fs.info(target))]  # the stat taken before the upload: a later change
            sent.append(rel)                                # of the file is uploaded by the next push
        for rel in [r for r in record if r not in current]:
            if fs.exists(f"{root}/{rel}"):
                fs.rm_file(f"{root}/{rel}")
            del record[rel]
    finally:
        _write_record(local, url, record)
    return sent
