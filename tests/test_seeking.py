"""Seeking extraction: window search, layer choice, sensitivity against PyTorch autograd, SVD factors, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import pktjax
from pktjax import seeking
from pktjax.checkpoint import iter_hf_tensors
from pktjax.errors import ConfigError, PairError
from pktjax.lora import target_shape, weight
from pktjax.sensitivity import seed_batches
from tests.tiny import torch_model

TEACHER = dict(seed=1, hidden=48, layers=3, inter=64)
EXAMPLES = [  # each under 64 tokens: one compiled shape
    {"messages": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2+3 = 5."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"},
                  {"role": "assistant", "content": "Paris"}]},
    {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there, friend"}]},
]


def brute_force(m, rows, cols):
    best, where = -np.inf, None
    for i in range(m.shape[0] - rows + 1):
        for j in range(m.shape[1] - cols + 1):
            s = m[i:i + rows, j:j + cols].sum(dtype=np.float64)
            if s > best:
                best, where = s, (i, j)
    return where


@pytest.mark.parametrize("seed", range(6))
def test_max_submatrix_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    for _ in range(12):
        r, c = rng.integers(1, 13, size=2)
        rows, cols = rng.integers(1, r + 1), rng.integers(1, c + 1)
        real = rng.random((r, c)).astype(np.float32)
        ties = rng.integers(0, 2, size=(r, c)).astype(np.float32)  # many equal window sums
        for m in (real, ties):
            assert seeking.max_submatrix(m, rows, cols) == brute_force(m, rows, cols)
        assert seeking.max_submatrix(real, r, c) == (0, 0)  # full-size window
        assert seeking.max_submatrix(real, r, 1) == brute_force(real, r, 1)  # full height (reduced axis)
        assert seeking.max_submatrix(real, 1, c) == brute_force(real, 1, c)  # full width


def test_max_submatrix_precision():
    # equal sums that float rounding of a cumulative table would otherwise split: the first window wins
    assert seeking.max_submatrix(np.full((300, 200), 0.1, np.float32), 7, 9) == (0, 0)
    big = np.full((50, 60), 1e6, np.float32)
    big[30, 41] += 1.0  # a small difference on a large total is still found
    assert seeking.max_submatrix(big, 3, 3) == brute_force(big.astype(np.float64), 3, 3) == (28, 39)
    with pytest.raises(PairError, match="does not fit"):
        seeking.max_submatrix(np.ones((4, 5)), 5, 2)


def test_select_layers_ranks_by_total_and_sorts_by_index():
    sens = {"embed": jnp.full((10, 4), 1e6), "layers": {
        "q_proj": jnp.asarray([1.0, 5.0, 3.0, 5.0, 0.0])[:, None, None] * jnp.ones((5, 2, 2)),
        "input_norm": jnp.asarray([0.0, 0.0, 4.0, 0.0, 9.0])[:, None] * jnp.ones((5, 3))}}
    # totals: [4, 20, 24, 20, 27]; top 3 = 4, 2, then layer 1 (tied with 3, lower index first)
    assert seeking.select_layers(sens, 3) == [1, 2, 4]
    with pytest.raises(PairError, match="layers"):
        seeking.select_layers(sens, 6)


@pytest.fixture(scope="module")
def pair(tiny_dir):
    teacher = pktjax.load_model(tiny_dir("qwen2", **TEACHER))  # GQA, q/k/v biases, tied embeddings
    student = pktjax.load_model(tiny_dir("qwen2"))
    return teacher, student


def _random_sens(params, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.random(x.shape, np.float32)), params)


def test_extracted_submatrices_and_full_rank_svd(pair):
    teacher, student = pair
    sens = _random_sens(teacher.params)
    cut = seeking.plan(sens, teacher.config, student.config)
    assert cut["layers"] == seeking.select_layers(sens, 2)
    mats = seeking.extract_matrices(teacher.params, student.config, cut)
    for t, m in mats.items():
        rows, cols = target_shape(student.config, t)
        w, s = weight(teacher.params, t), weight(sens, t)
        pairs = [(w[l], s[l]) for l in cut["layers"]] if m.ndim == 3 else [(w, s)]
        for k, ((wl, sl), (top, left)) in enumerate(zip(pairs, cut["windows"][t])):
            assert (top, left) == seeking.max_submatrix(sl, rows, cols)
            sub = m[k] if m.ndim == 3 else m
            np.testing.assert_array_equal(np.asarray(sub), np.asarray(wl[top:top + rows, left:left + cols]))
        b, a = pktjax.lora.svd_factors(m, min(rows, cols))  # full rank reconstructs exactly
        np.testing.assert_allclose(np.asarray(b @ a), np.asarray(m), atol=2e-5 * float(jnp.abs(m).max()))
    # GQA: k/v keep the student's narrower kv width; the embedding keeps all V rows
    assert mats["k_proj"].shape == (2, student.config.kv_dim, 32) and mats["embed_tokens"].shape == (32, 260)


def test_extract_lora_factors(pair):
    teacher, student = pair
    sens = _random_sens(teacher.params, 1)
    lora = seeking.extract_lora(teacher, student.config, sens, 4)
    mats = seeking.extract_matrices(teacher.params, student.config, seeking.plan(sens, teacher.config, student.config))
    q = lora["layers"]["q_proj"]
    assert q["a"].shape == (2, 4, 32) and q["b"].shape == (2, 32, 4)
    gram = np.asarray(jnp.einsum("lri,lsi->lrs", q["a"], q["a"]))
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(4), (2, 4, 4)), atol=1e-5)  # a = V_rᵀ: orthonormal rows
    s = np.linalg.svd(np.asarray(mats["q_proj"]), compute_uv=False)[:, :4]
    np.testing.assert_allclose(np.linalg.norm(np.asarray(q["b"]), axis=1), s, rtol=1e-4)
    # tied student: the head's factors give the same [V, d] update as the embedding's
    e, h = lora["embed"], lora["lm_head"]
    np.testing.assert_array_equal(np.asarray(h["a"]), np.asarray(e["b"].T))


def test_sensitivity_matches_torch_autograd(tiny_dir):
    folder = tiny_dir("qwen2", **TEACHER)  # GQA, q/k/v biases, tied embeddings
    model = pktjax.load_model(folder)
    tok = pktjax.load_tokenizer(folder)
    batches = seed_batches(tok, EXAMPLES)  # each left-padded to 64 tokens
    sens = pktjax.sensitivity(model.params, model.config, batches)
    ref_model = torch_model(folder)
    ref = {n: torch.zeros_like(p) for n, p in ref_model.named_parameters()}
    for b in batches:
        keep = b.mask[0].astype(bool)
        assert b.ids.shape == (1, 64) and 0 < keep.sum() < 64
        ids, labels = torch.tensor(b.ids[:, keep], dtype=torch.long), torch.tensor(b.labels[:, keep], dtype=torch.long)
        ref_model.zero_grad()
        ref_model(input_ids=ids, labels=labels).loss.backward()  # mean CE over response tokens
        for n, p in ref_model.named_parameters():
            ref[n] += (p * p.grad).abs().detach()
    names = 0
    for name, got in iter_hf_tensors(sens, model.config):
        want = ref[name].numpy()
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4 * np.abs(want).max(), err_msg=name)
        names += 1
    assert names == len(ref)

    # scoring fewer top-level entries leaves the layers' sensitivities as they were and drops those entries
    top = seeking.top_keys(model.params, ["o_proj"])
    layers_only = pktjax.sensitivity(model.params, model.config, batches, top=top)
    assert set(layers_only) == {"layers"}
    for key, full in sens["layers"].items():
        # the same gradients through another compiled graph: equal up to reordered float32 sums, a few sqrt(n) eps
        # of the magnitude (n: the longest reduction, the vocabulary's log-softmax)
        tol = 8 * np.sqrt(model.config.vocab_size) * np.finfo(np.float32).eps
        np.testing.assert_allclose(layers_only["layers"][key], full, rtol=tol, atol=tol * np.abs(full).max(),
                                   err_msg=key)
    assert seeking.top_keys(model.params, ["lm_head"]) == {"embed"}  # tied: the head reads the embedding
    with pytest.raises(ValueError, match="choose among"):
        pktjax.sensitivity(model.params, model.config, batches, top=["lm_head"])


def test_pair_errors(pair):
    teacher, student = pair
    sens = _random_sens(teacher.params)
    with pytest.raises(PairError, match="narrower|fewer"):
        seeking.extract_lora(student, teacher.config, _random_sens(student.params), 4)
    with pytest.raises(ConfigError, match="rank 40 does not fit"):
        seeking.extract_lora(teacher, student.config, sens, 40)
    with pytest.raises(ConfigError, match="unknown LoRA target"):
        seeking.extract_lora(teacher, student.config, sens, 4, targets=["qkv_proj"])
    other = student.config.__class__(**{**student.config.__dict__, "vocab_size": 300})
    with pytest.raises(PairError, match="vocabulary"):
        seeking.plan(sens, teacher.config, other)

