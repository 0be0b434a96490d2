"""pktjax's forward equals transformers' PyTorch forward on tiny random models of every family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pktjax
from tests.tiny import FAMILIES, VOCAB, torch_model


def _batch(seed=0, t=9):
    ids = np.random.RandomState(seed).randint(3, VOCAB, size=(2, t))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # second row left-padded
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_dir, family):
    folder = tiny_dir(family)
    model = pktjax.load_model(folder)
    ids, mask = _batch()
    pos = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        ref = torch_model(folder)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                  position_ids=torch.tensor(pos)).logits.numpy()
    out = np.asarray(jax.jit(pktjax.forward, static_argnums=1)(model.params, model.config, jnp.asarray(ids),
                                                               jnp.asarray(mask)))
    assert out.shape == (2, 9, VOCAB)
    valid = mask.astype(bool)
    assert np.abs(out - ref)[valid].max() <= 1e-4


def test_family_features_are_parsed(tiny_dir):
    l3 = pktjax.load_model(tiny_dir("llama3")).config
    assert l3.is_gqa and l3.tie_word_embeddings and l3.rope["rope_type"] == "llama3"
    qw = pktjax.load_model(tiny_dir("qwen2"))
    assert qw.config.attention_bias and "q_bias" in qw.params["layers"] and "lm_head" not in qw.params
    assert pktjax.load_model(tiny_dir("mistral")).config.sliding_window == 5


def test_capture_matches_plain_forward(tiny_dir):
    model = pktjax.load_model(tiny_dir("qwen2"))
    ids, mask = _batch(1)
    plain = pktjax.forward(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask))
    logits, trace = pktjax.forward_trace(model.params, model.config, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(logits))
    cfg = model.config
    assert trace.coeff.shape == (cfg.num_layers, 2, cfg.intermediate_size)
    assert trace.head_last_key.shape == (cfg.num_layers, 2, cfg.q_dim)
    np.testing.assert_allclose(np.asarray(trace.r), np.asarray(trace.h + trace.a), rtol=1e-6)
    # the next layer's input is this layer's output
    np.testing.assert_allclose(np.asarray(trace.h[1]), np.asarray(trace.r[0] + trace.ffn_out[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(trace.output), np.asarray(trace.r[-1] + trace.ffn_out[-1]), rtol=1e-5,
                               atol=1e-6)


def test_entry_points_share_one_pass(tiny_dir):
    """Each entry point returns one type; all of them see the same pass as :func:`pktjax.forward`."""
    model = pktjax.load_model(tiny_dir("llama2"))
    cfg, ids, mask = model.config, *map(jnp.asarray, _batch(2))
    plain = np.asarray(pktjax.forward(model.params, cfg, ids, mask))
    hidden = pktjax.hidden_states(model.params, cfg, ids, mask)
    assert hidden.shape == (2, ids.shape[1], cfg.hidden_size)
    np.testing.assert_array_equal(np.asarray(pktjax.model.unembed(model.params, cfg, hidden)), plain)
    logits, outs = pktjax.forward_modules(model.params, cfg, ids, mask, modules=("up_proj", "output"))
    np.testing.assert_array_equal(np.asarray(logits), plain)
    assert outs["up_proj"].shape == (cfg.num_layers, 2, ids.shape[1], cfg.intermediate_size)
    np.testing.assert_array_equal(np.asarray(outs["output"][-1]), np.asarray(hidden))  # the last layer's output
    with pytest.raises(ValueError, match="at least one module"):
        pktjax.forward_modules(model.params, cfg, ids, mask, modules=())
    # an adapter whose factors are zero leaves the logits as they are
    zero = {"layers": {"q_proj": {"a": jnp.zeros((cfg.num_layers, 2, cfg.hidden_size)),
                                  "b": jnp.zeros((cfg.num_layers, cfg.q_dim, 2))}}}
    same = pktjax.forward(model.params, cfg, ids, mask, adapter=pktjax.Adapter(zero, pktjax.model.LoraSpec(2.0)))
    np.testing.assert_array_equal(np.asarray(same), plain)
