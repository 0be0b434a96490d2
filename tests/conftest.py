"""Shared fixtures: tiny random checkpoints of each family, built once per test session."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The CLI keeps compiled programs on disk by default; tests compile small programs that gain nothing from it and
# should not depend on what an earlier run left there, so they turn it off unless told otherwise (test_compile_cache
# checks the setting, and the cache itself in child processes).
os.environ.setdefault("PKTJAX_COMPILE_CACHE", "0")

import pytest  # noqa: E402

from tests import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(family, **kw) -> Path``: a cached tiny checkpoint folder (float32 safetensors)."""
    cache: dict = {}

    def make(family: str, seed: int = 0, **kw):
        key = (family, seed, tuple(sorted(kw.items())))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"{family}-{seed}")
            cache[key] = tiny.build(family, folder, seed=seed, **kw)
        return cache[key]

    return make


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. An XLA:CPU executable holds a few memory maps and jit
    caches keep them alive; the whole suite in one process compiles enough of them to pass the kernel's limit of
    65,530 maps per process (vm.max_map_count), after which allocations fail and XLA aborts the process."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True, scope="session")
def _private_pktjax_home(tmp_path_factory):
    """Caches the tests write (tokenizers built from GGUF files) go to a temporary folder, not the user's."""
    if "PKTJAX_HOME" not in os.environ:
        os.environ["PKTJAX_HOME"] = str(tmp_path_factory.mktemp("pktjax-home"))
    yield
