"""The CLI's persistent compilation cache: on by default under $PKTJAX_HOME, a folder or off by environment."""

import os
import subprocess
import sys

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


CHILD = """
import sys
import jax, jax.numpy as jnp
from pktjax.cli import enable_compilation_cache
print(enable_compilation_cache())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
x = jnp.arange(64.0).reshape(8, 8) / 64
print(repr(float(jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(x))))
"""


def test_compilation_cache_keeps_programs_for_the_next_process(tmp_path):
    """The cache runs in child processes (tests turn it off in their own): the first writes entries into
    ``$PKTJAX_HOME/jax-cache``, the second, with them there, computes the same value."""
    env = {**os.environ, "PKTJAX_HOME": str(tmp_path), "JAX_PLATFORMS": "cpu"}
    env.pop("PKTJAX_COMPILE_CACHE", None)
    runs = [subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    folder = tmp_path / "jax-cache"
    assert runs[0].stdout.split()[0] == str(folder)
    assert any(folder.iterdir()), "no compiled program was written"
    assert runs[0].stdout.split()[1] == runs[1].stdout.split()[1]
