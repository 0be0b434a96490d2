"""The batched attribution route against the per-example route, the per-example scores of locate_each, and the
attribution cache.

The per-example route (:func:`pktjax.attribution._per_example`) pays every ``[chunk, d] x [d, V]`` product for
each example and is itself checked against an independent float64 NumPy computation in ``test_attribution.py``;
the batched route forms each block of ``W_U diag(gamma) W_out`` once per batch and rescales it per example, so the
two differ only by float32 rounding in the order of the products. Tolerance: 1e-5 of the largest |score| of each
array (float32 carries ~6e-8 relative per operation; a score is a difference of sums over V ~ 260 terms whose
rounding stays several times below 1e-5 of the largest score, measured ~5e-7 here).
"""

from __future__ import annotations

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pktjax
from pktjax.attribution import _per_example, attribution_batch, attribution_target, locate, locate_each
from pktjax.attribution_cache import entry_path, model_fingerprint, read_entry
from pktjax.errors import ConfigError, DataError
from pktjax.losses import mean_token_ce
from pktjax.select import select
from tests.tiny import VOCAB, build_tokenizer

attribution_module = importlib.import_module("pktjax.attribution")
FIELDS = ("layer_attn", "layer_ffn", "ffn", "attn")
LENGTHS = (5, 13, 9)  # mixed lengths, left-padded into one batch
EXAMPLES = [
    {"messages": [{"role": "user", "content": f"Add {a} and {b}."}, {"role": "assistant", "content": f"{a + b}."}]}
    for a, b in ((3, 4), (12, 30), (7, 700), (1, 1))
]


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(4, VOCAB, n).astype(np.int32) for n in LENGTHS]
    t = max(LENGTHS) + 3  # some padding on every row
    ids, mask = np.full((len(seqs), t), 2, np.int32), np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):], mask[i, t - len(s):] = s, 1
    return seqs, ids, mask, rng.integers(0, VOCAB, len(seqs)).astype(np.int32)


def _assert_close(got, want, name):
    got, want = np.asarray(got), np.asarray(want)
    finite = np.isfinite(want)
    np.testing.assert_array_equal(np.isfinite(got), finite, err_msg=name)  # the same rows left unscored (-inf)
    scale = np.abs(want[finite]).max()
    assert scale > 1e-3, name  # the comparison is not vacuous
    err = np.abs(got[finite] - want[finite]).max()
    assert err <= 1e-5 * scale, f"{name}: max |difference| {err:.3g} > 1e-5 * {scale:.3g}"


def _same_selection(a, b, k, n_f, n_a):
    sa, sb = select(a, k, n_f, n_a), select(b, k, n_f, n_a)
    for field in ("attn_layers", "ffn_layers", "ffn_neurons", "attn_neurons"):
        np.testing.assert_array_equal(np.asarray(getattr(sa, field)), np.asarray(getattr(sb, field)), err_msg=field)


def _check_against_per_example(params, cfg, seed, mode, attention, **layers):
    seqs, ids, mask, targets = _batch(seed)
    got = attribution_batch(params, cfg, ids, targets, mask, mode=mode, attention=attention, chunk=7, **layers)
    assert got.ffn.shape == (len(seqs), cfg.num_layers, cfg.intermediate_size)
    for i, seq in enumerate(seqs):
        want = _per_example(params, cfg, seq, int(targets[i]), mode, attention, chunk=7, **layers)
        mine = jax.tree.map(lambda x: x[i], got)
        for name in FIELDS:
            _assert_close(getattr(mine, name), getattr(want, name), f"{mode}/{attention} example {i} {name}")
        k = len(layers.get("ffn_layers", range(cfg.num_layers)))
        _same_selection(mine, want, k, 5, 3)


@pytest.mark.parametrize("family", ["llama2", "qwen2"])
@pytest.mark.parametrize("mode", ["reference", "rmsnorm"])
@pytest.mark.parametrize("attention", ["last_key", "all_keys"])
def test_batch_equals_per_example_route(tiny_dir, family, mode, attention):
    model = pktjax.load_model(tiny_dir(family))
    _check_against_per_example(model.params, model.config, 0, mode, attention)


def test_batch_equals_per_example_route_on_some_layers(tiny_dir):
    model = pktjax.load_model(tiny_dir("llama2", layers=3))
    _check_against_per_example(model.params, model.config, 1, "rmsnorm", "last_key", ffn_layers=[2, 0],
                               attn_layers=[1, 2])


@pytest.fixture(scope="module")
def trained_model(tiny_dir):
    """A tiny model trained for 60 Adam steps on one repeated phrase, so that its predictions are peaked (the
    regime of real checkpoints, where a few neurons move most of the probability mass)."""
    model = pktjax.load_model(tiny_dir("qwen2", seed=3))
    tok = build_tokenizer()
    ids = jnp.asarray([tok("the cat sat on the mat. " * 3, add_special_tokens=False)["input_ids"]], jnp.int32)
    labels = jnp.concatenate([ids[:, 1:], jnp.full((1, 1), -100, jnp.int32)], axis=1)
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(lambda p: mean_token_ce(pktjax.forward(p, model.config, ids), labels)[0])(
            params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state, loss

    params, state = model.params, opt.init(model.params)
    first = None
    for _ in range(60):
        params, state, loss = step(params, state)
        first = float(loss) if first is None else first
    assert float(loss) < 0.5 * first  # it did learn
    return model.replace(params=params), tok


@pytest.mark.parametrize("mode", ["reference", "rmsnorm"])
def test_batch_equals_per_example_route_on_a_trained_model(trained_model, mode):
    model, _ = trained_model
    _check_against_per_example(model.params, model.config, 2, mode, "all_keys")


@pytest.mark.parametrize("mode", ["reference", "rmsnorm"])
def test_one_example_batch_equals_per_example_route(trained_model, mode):
    """E = 1 (what :func:`pktjax.attribution` runs): the batched route compiles differently for a single row (its
    per-example map has one step), so it is checked on its own, with left padding."""
    model, _ = trained_model
    params, cfg = model.params, model.config
    seqs, ids, mask, targets = _batch(3)
    got = attribution_batch(params, cfg, ids[1:2], targets[1:2], mask[1:2], mode=mode, chunk=7)
    want = _per_example(params, cfg, seqs[1], int(targets[1]), mode, chunk=7)
    for name in FIELDS:
        _assert_close(getattr(got, name)[0], getattr(want, name), f"{mode} E=1 {name}")
    _same_selection(jax.tree.map(lambda x: x[0], got), want, cfg.num_layers, 5, 3)


def test_locate_each_gives_each_examples_scores_and_selection(trained_model, tiny_dir, capsys):
    model, tok = trained_model
    params, cfg = model.params, model.config
    full = locate_each(params, cfg, tok, EXAMPLES, batch=3, progress="locate tiny")  # two batches: 3 + 1 examples
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("locate tiny:")]
    assert [x.split(",")[0] for x in lines] == ["locate tiny: 3/4 ex (75%)", "locate tiny: 4/4 ex (100%)"]
    k = cfg.num_layers - 1
    part = locate_each(params, cfg, tok, EXAMPLES, batch=3, layers=k)
    for i, ex in enumerate(EXAMPLES):
        ids, target = attribution_target(tok, ex)
        want = _per_example(params, cfg, ids, target)
        for name in FIELDS:
            _assert_close(getattr(full[i], name), getattr(want, name), f"example {i} {name}")
        _same_selection(part[i], want, k, 5, 3)
        alone = locate(params, cfg, tok, [ex], layers=k)  # what one step used to locate
        _same_selection(part[i], alone, k, 5, 3)
    summed = locate(params, cfg, tok, EXAMPLES, batch=3)
    for name in FIELDS:
        _assert_close(getattr(summed, name), sum(np.asarray(getattr(a, name), np.float64) for a in full), name)


def test_bad_batches_are_refused(tiny_dir):
    model = pktjax.load_model(tiny_dir("qwen2"))
    params, cfg = model.params, model.config
    _, ids, mask, targets = _batch(0)
    with pytest.raises(DataError, match="one target token per example"):
        attribution_batch(params, cfg, ids, targets[:2], mask)
    with pytest.raises(DataError, match="vocabulary"):
        attribution_batch(params, cfg, ids, np.array([1, VOCAB, 2]), mask)
    with pytest.raises(DataError, match="vocabulary"):
        attribution_batch(params, cfg, ids, np.array([1, -1, 2]), mask)
    with pytest.raises(DataError, match="empty"):
        attribution_batch(params, cfg, np.zeros((0, 4), np.int32), np.zeros(0, np.int32))
    with pytest.raises(DataError, match="attention_mask"):
        attribution_batch(params, cfg, ids, targets, mask[:, 1:])
    with pytest.raises(DataError, match=r"\[E, T\]"):
        attribution_batch(params, cfg, ids[0], targets[:1])
    with pytest.raises(ConfigError, match="mode"):
        attribution_batch(params, cfg, ids, targets, mask, mode="softmax")
    with pytest.raises(DataError, match="empty"):
        locate_each(params, cfg, build_tokenizer(), [])


# ------------------------------------------------------------------------------------------ the cache


def _count_batches(monkeypatch) -> list[int]:
    """The batch size of every ``attribution_batch`` call from now on (appended as they happen)."""
    calls = []
    real = attribution_module.attribution_batch
    monkeypatch.setattr(attribution_module, "attribution_batch",
                        lambda *a, **k: calls.append(a[2].shape[0]) or real(*a, **k))
    return calls


def test_cache_reads_back_instead_of_recomputing(trained_model, tmp_path, monkeypatch):
    model, tok = trained_model
    params, cfg = model.params, model.config
    calls = _count_batches(monkeypatch)
    k = 1
    first = locate_each(params, cfg, tok, EXAMPLES[:2], layers=k, cache=tmp_path)
    assert calls == [2]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.endswith(".npz") for f in files)  # no temporary file left behind
    again = locate_each(params, cfg, tok, EXAMPLES[:2], layers=k, cache=tmp_path)
    assert calls == [2]  # read back, nothing scored
    for a, b in zip(first, again):
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    # a larger K needs rows that were not scored: only those examples are scored again, then the entry covers it
    full = locate_each(params, cfg, tok, EXAMPLES[:3], layers=cfg.num_layers, cache=tmp_path)
    assert calls == [2, 3]
    assert locate_each(params, cfg, tok, EXAMPLES[:3], layers=1, cache=tmp_path) and calls == [2, 3]
    # any K and rate cut from the cached full scores selects what the example's own scores select
    for i, ex in enumerate(EXAMPLES[:3]):
        ids, target = attribution_target(tok, ex)
        want = _per_example(params, cfg, ids, target)
        for kk, n_f, n_a in ((1, 2, 1), (cfg.num_layers, 9, 4)):
            _same_selection(full[i], want, kk, n_f, n_a)


def test_damaged_cache_entry_is_scored_again(trained_model, tmp_path, monkeypatch, capsys):
    model, tok = trained_model
    params, cfg = model.params, model.config
    calls = _count_batches(monkeypatch)
    first = locate_each(params, cfg, tok, EXAMPLES[:2], layers=1, cache=tmp_path)
    ids, target = attribution_target(tok, EXAMPLES[1])
    path = entry_path(tmp_path, ids, target, "reference", "last_key")
    with np.load(path) as z:
        fields = {name: z[name] for name in z.files}
    ffn = fields["ffn"].copy()
    finite = np.flatnonzero(np.isfinite(ffn))
    # an edited score in a valid archive: only the entry's sha256 tells
    ffn.flat[finite[0]] = 2 * ffn.flat[finite[0]] + 1
    with open(path, "wb") as fh:
        np.savez(fh, **{**fields, "ffn": ffn})
    again = locate_each(params, cfg, tok, EXAMPLES[:2], layers=1, cache=tmp_path)
    assert calls == [2, 1]  # only the damaged entry is scored again
    assert "does not match its sha256" in capsys.readouterr().err
    raw = bytearray(path.read_bytes())
    at = bytes(raw).find(np.ascontiguousarray(read_entry(tmp_path, model_fingerprint(params, cfg), ids, target,
                                                         "reference", "last_key").attr.ffn).tobytes())
    assert at > 0
    raw[at + 3] ^= 0xFF  # one flipped byte inside the stored FFN scores
    path.write_bytes(bytes(raw))
    again = locate_each(params, cfg, tok, EXAMPLES[:2], layers=1, cache=tmp_path)
    assert calls == [2, 1, 1] and "is damaged" in capsys.readouterr().err
    for name in FIELDS:  # scored alone now, in a batch of two before: equal up to float32 rounding
        _assert_close(getattr(again[1], name), getattr(first[1], name), name)
    assert read_entry(tmp_path, model_fingerprint(params, cfg), ids, target, "reference", "last_key") is not None


def test_cache_keeps_options_apart_and_refuses_another_models_entry(trained_model, tiny_dir, tmp_path):
    model, tok = trained_model
    params, cfg = model.params, model.config
    ref = locate_each(params, cfg, tok, EXAMPLES[:1], cache=tmp_path)[0]
    rms = locate_each(params, cfg, tok, EXAMPLES[:1], mode="rmsnorm", cache=tmp_path)[0]
    keys = locate_each(params, cfg, tok, EXAMPLES[:1], attention="all_keys", cache=tmp_path)[0]
    assert len(list(tmp_path.iterdir())) == 3  # one entry per option, none read for another
    ids, target = attribution_target(tok, EXAMPLES[0])
    for got, mode, attention in ((rms, "rmsnorm", "last_key"), (keys, "reference", "all_keys")):
        want = _per_example(params, cfg, ids, target, mode, attention)
        for name in FIELDS:
            _assert_close(getattr(got, name), getattr(want, name), f"{mode}/{attention} {name}")
    assert not np.allclose(ref.ffn, rms.ffn) and not np.allclose(ref.attn, keys.attn)

    # the same architecture with other weights: another fingerprint, and its entry is refused
    other = pktjax.load_model(tiny_dir("qwen2"))
    assert other.config == cfg and model_fingerprint(other.params, cfg) != model_fingerprint(params, cfg)
    with pytest.raises(ConfigError, match="another model"):
        locate_each(other.params, cfg, tok, EXAMPLES[:1], cache=tmp_path)
    # one changed weight is enough
    changed = jax.tree.map(lambda x: x, params)
    changed["final_norm"] = params["final_norm"].at[0].add(1e-6)
    assert model_fingerprint(changed, cfg) != model_fingerprint(params, cfg)
    path = entry_path(tmp_path, ids, target, "reference", "last_key")
    assert read_entry(tmp_path, model_fingerprint(params, cfg), ids, target, "reference", "last_key") is not None
    assert path.is_file() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert os.path.getsize(path) > 0


def _numpy_checksum(x: np.ndarray) -> list[int]:
    """The fingerprint's two sums over a leaf's flat bit patterns, in NumPy (uint64, reduced mod 2^32)."""
    bits = np.ascontiguousarray(x).view({4: np.uint32, 2: np.uint16, 1: np.uint8}[x.dtype.itemsize])
    bits = bits.reshape(-1).astype(np.uint64)
    i = np.arange(bits.size, dtype=np.uint64)
    m = np.uint64(0xFFFFFFFF)
    first = (bits * ((i * np.uint64(2654435761) + np.uint64(1)) & m)) & m
    second = ((bits ^ ((i * np.uint64(0x9E3779B9)) & m)) * np.uint64(0x85EBCA6B)) & m
    return [int(first.sum() & m), int(second.sum() & m)]


@pytest.mark.parametrize("shape,dtype", [((7, 5, 3), jnp.float32), ((64, 33), jnp.bfloat16), ((4096,), jnp.float32),
                                         ((), jnp.float32)])
def test_fingerprint_checksum_blocks_match_numpy(monkeypatch, shape, dtype):
    """The per-block checksum (blocks of the leading axis, one call each) equals the formula over the flat leaf,
    whatever the block size: a leaf's fingerprint does not depend on how it is cut."""
    from pktjax import attribution_cache as ac

    x = jax.random.normal(jax.random.key(3), shape, jnp.float32).astype(dtype)
    want = _numpy_checksum(np.asarray(x))
    for block in (1, 5, 16, 1 << 23):  # one row each, uneven, several rows, the whole leaf
        monkeypatch.setattr(ac, "_CPU_BLOCK", block)
        assert np.asarray(ac._leaf_checksum(x)).tolist() == want, block
