"""The CLI's persistent compilation cache: on by default under $PKTJAX_HOME, a folder or off by environment."""

import jax

from pktjax.cli import enable_compilation_cache


def test_compilation_cache_setting(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    try:
        monkeypatch.setenv("PKTJAX_HOME", str(tmp_path))
        monkeypatch.delenv("PKTJAX_COMPILE_CACHE", raising=False)
        assert enable_compilation_cache() == str(tmp_path / "jax-cache")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax-cache")
        monkeypatch.setenv("PKTJAX_COMPILE_CACHE", str(tmp_path / "elsewhere"))
        assert enable_compilation_cache() == str(tmp_path / "elsewhere")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "elsewhere")
        jax.config.update("jax_compilation_cache_dir", before)
        monkeypatch.setenv("PKTJAX_COMPILE_CACHE", "0")
        assert enable_compilation_cache() is None
        assert jax.config.jax_compilation_cache_dir == before
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
