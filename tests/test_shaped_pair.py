"""experiments/shaped_pair.py: random-weight stand-ins with a checkpoint's exact config and tokenizer."""

import dataclasses

import numpy as np
import pytest

import pktjax
from experiments.shaped_pair import write_shapes
from pktjax.checkpoint import read_model_config
from pktjax.errors import ConfigError
from pktjax.transfer import parse_tiny

TEXT = "def is_prime(n):\n    return n > 1"


def _same_config(a, b):
    return dataclasses.replace(a, torch_dtype=None) == dataclasses.replace(b, torch_dtype=None)


def test_shapes_then_weights_keep_config_and_tokenizer(tiny_dir, tmp_path):
    src = tiny_dir("qwen2", seed=4, hidden=64, layers=2, inter=96)
    shapes = write_shapes(str(src), str(tmp_path / "shapes"))  # config + tokenizer only
    assert not list(shapes.glob("*.safetensors"))
    assert _same_config(read_model_config(shapes), read_model_config(src))
    first = write_shapes(str(shapes), str(tmp_path / "a"), weights=True, seed=3, std=0.05)
    again = write_shapes(str(shapes), str(tmp_path / "b"), weights=True, seed=3, std=0.05)
    model, twin = pktjax.load_model(first), pktjax.load_model(again)
    assert _same_config(model.config, read_model_config(src))
    want = pktjax.load_tokenizer(src)(TEXT)["input_ids"]
    assert pktjax.load_tokenizer(first)(TEXT)["input_ids"] == want
    up = np.asarray(model.params["layers"]["up_proj"])
    assert abs(up.std() / 0.05 - 1) < 0.05  # N(0, std^2) matrices
    np.testing.assert_array_equal(up, np.asarray(twin.params["layers"]["up_proj"]))  # the seed fixes the weights
    with pytest.raises(Exception, match="not empty|exists"):
        write_shapes(str(shapes), str(first), weights=True)  # never over a written checkpoint


def test_tiny_spec_takes_vocab_and_std():
    cfg, seed, std = parse_tiny("tiny:hidden=32,layers=2,inter=48,heads=4,vocab=300,seed=3,std=0.05,model_type=qwen2")
    assert (cfg.vocab_size, cfg.hidden_size, cfg.model_type, seed, std) == (300, 32, "qwen2", 3, 0.05)
    assert parse_tiny("tiny:hidden=32,layers=2,inter=48,heads=4")[1:] == (0, 0.2)
    with pytest.raises(ConfigError, match="vocab, seed, std"):
        parse_tiny("tiny:hidden=32,width=3")
