"""Hub ids wherever a model is named: read from Hugging Face's standard cache (offline here), pinned to a
revision, and recorded as hub id + commit in exported adapters."""

import shutil

import jax
import numpy as np
import pytest

from pktjax import lora
from pktjax.checkpoint import load_model, read_model_config
from pktjax.errors import CheckpointError
from pktjax.evaluate import evaluate
from pktjax.registry import hub_origin, parse_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tiny_dir, tmp_path, monkeypatch):
    """A standard-layout cache holding ``acme/tiny`` at one commit, with ``main`` pointing at it."""
    import huggingface_hub.constants as hf

    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_dir("llama2"), snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the cache only: nothing may download in tests
    return snapshot


def test_hub_ids_load_from_the_standard_cache_at_a_revision(hub_cache, tiny_dir):
    assert parse_hub_id("acme/tiny") == ("acme/tiny", None)
    assert parse_hub_id(f"acme/tiny@{COMMIT}") == ("acme/tiny", COMMIT) and parse_hub_id("tiny:hidden=8") is None
    local = load_model(tiny_dir("llama2"))
    for spec in ("acme/tiny", "acme/tiny@main", f"acme/tiny@{COMMIT}"):
        model = load_model(spec)
        assert model.source == str(hub_cache)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(local.params)))
    assert read_model_config("acme/tiny") == read_model_config(tiny_dir("llama2"))
    assert hub_origin(hub_cache) == {"repo_id": "acme/tiny", "revision": COMMIT}
    assert hub_origin(tiny_dir("llama2")) is None
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        load_model("acme/absent")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        load_model("acme/tiny@v9")  # a revision the cache does not hold


def test_eval_takes_a_hub_id_and_adapters_record_it(hub_cache):
    rep = evaluate("acme/tiny", "mmlu", limit=2, batch_size=2)
    assert rep["n"] == 2 and rep["settings"]["model"] == "acme/tiny"
    model = load_model("acme/tiny")
    _, adapter = lora.init(model.params, model.config, 2, 2.0, targets=("q_proj",), key=jax.random.key(0))
    cfg = lora.peft_config(adapter, 2.0, base_model=model.source)
    assert cfg["base_model_name_or_path"] == "acme/tiny" and cfg["revision"] == COMMIT
    plain = lora.peft_config(adapter, 2.0, base_model="/some/folder")
    assert plain["base_model_name_or_path"] == "/some/folder" and plain["revision"] is None
