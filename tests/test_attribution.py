"""LaTen locate (SPEC §3.1) against an independent float64 NumPy computation, plus select (§3.2).

The NumPy side reads the safetensors weights and config.json itself and runs its own small forward pass; it
never looks at pktjax's trace.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import pktjax
from pktjax.attribution import _attribution_batch_jit, attribution, attribution_target, locate
from pktjax.errors import ConfigError, DataError
from pktjax.select import Attribution, select
from tests.tiny import VOCAB, build_tokenizer

IDS = np.array([17, 90, 33, 200, 5, 61, 128, 77, 12, 250, 44], np.int32)
TARGET = 101
EXAMPLES = [
    {"messages": [{"role": "user", "content": "What is 6*7?"}, {"role": "assistant", "content": "It is 42."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour"},
                  {"role": "assistant", "content": 'I pick "blue" ]) ,\n'}]},
]


# ---------------------------------------------------------------- independent NumPy reference


def _np_model(folder):
    raw = json.loads((folder / "config.json").read_text())
    w = {k: v.astype(np.float64) for k, v in load_file(str(folder / "model.safetensors")).items()}
    rope = raw.get("rope_parameters") or {}
    raw["theta"] = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
    return w, raw


def _rms(x, g, eps):
    return g * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)


def _rope(x, theta):
    """``x [T, n, hd]`` rotated (rotate-half convention)."""
    t, _, hd = x.shape
    ang = np.arange(t)[:, None] * theta ** (-np.arange(0, hd, 2) / hd)[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1))[:, None], np.sin(np.concatenate([ang, ang], -1))[:, None]
    return x * cos + np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1) * sin


def _np_attention(w, p, cfg, x):
    """Returns ``a [T, d]``, ``ctx [T, H, hd]``, ``probs [H, T, T]``, ``v [T, H, hd]`` (v repeated per head)."""
    t = x.shape[0]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // nh

    def proj(name, heads):
        y = x @ w[p + f"self_attn.{name}.weight"].T + w.get(p + f"self_attn.{name}.bias", 0.0)
        return y.reshape(t, heads, hd)

    q, k, v = _rope(proj("q_proj", nh), cfg["theta"]), _rope(proj("k_proj", nkv), cfg["theta"]), proj("v_proj", nkv)
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd) + np.triu(np.full((t, t), -np.inf), 1)
    probs = np.exp(s - s.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    ctx = np.einsum("hts,shd->thd", probs, v)
    return ctx.reshape(t, -1) @ w[p + "self_attn.o_proj.weight"].T, ctx, probs, v


def _np_forward(w, cfg, ids):
    """Per-layer last-position records and the last layer's output ``o [d]``."""
    eps, x, recs = cfg["rms_norm_eps"], w["model.embed_tokens.weight"][ids], []
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        a, ctx, probs, v = _np_attention(w, p, cfg, _rms(x, w[p + "input_layernorm.weight"], eps))
        r = x + a
        n2 = _rms(r, w[p + "post_attention_layernorm.weight"], eps)
        gate = n2 @ w[p + "mlp.gate_proj.weight"].T
        m = gate / (1 + np.exp(-gate)) * (n2 @ w[p + "mlp.up_proj.weight"].T)
        f = m @ w[p + "mlp.down_proj.weight"].T
        recs.append({"h": x[-1], "a": a[-1], "r": r[-1], "f": f[-1], "m": m[-1],
                     "last_key": (probs[:, -1, -1, None] * v[-1]).reshape(-1), "all_keys": ctx[-1].reshape(-1)})
        x = r + f
    return recs, x[-1]


def _np_attribution(folder, ids, target, mode, attention):
    w, cfg = _np_model(folder)
    recs, o = _np_forward(w, cfg, ids)
    w_u = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    gamma = w["model.norm.weight"]
    scale = (np.sqrt(o.var() + 1e-5) + 1e-6) ** -0.5

    def logp(x):
        y = gamma * x * scale if mode == "reference" else _rms(x, gamma, cfg["rms_norm_eps"])
        z = y @ w_u.T
        mx = z.max(-1, keepdims=True)
        return z[..., target] - (mx[..., 0] + np.log(np.exp(z - mx).sum(-1)))

    out = {k: [] for k in ("layer_attn", "layer_ffn", "ffn", "attn")}
    for layer, rec in enumerate(recs):
        p = f"model.layers.{layer}."
        h, r = rec["h"], rec["r"]
        out["layer_attn"].append(logp(h + rec["a"]) - logp(h))
        out["layer_ffn"].append(logp(r + rec["f"]) - logp(r))
        out["ffn"].append(logp(r + rec["m"][:, None] * w[p + "mlp.down_proj.weight"].T) - logp(r))
        out["attn"].append(logp(h + rec[attention][:, None] * w[p + "self_attn.o_proj.weight"].T) - logp(h))
    return {k: np.stack(v) for k, v in out.items()}


# ---------------------------------------------------------------- helpers


def _load(tiny_dir, family):
    folder = tiny_dir(family)
    model = pktjax.load_model(folder)
    return folder, model.params, model.config


# Two float32 evaluations of the same scores that differ only in how XLA orders their reductions (another chunk
# size or batch shape, another CPU's kernels) agree to about sqrt(n) eps of the scores' magnitude, n the longest
# reduction (the vocabulary's log-softmax, V = 260 here); 8 sqrt(V) eps ~ 1.5e-5 leaves room for a few chained ones.
REORDERED = 8 * np.sqrt(VOCAB) * np.finfo(np.float32).eps


def _close(got: Attribution, want, atol=5e-6, rtol=2e-5, scaled=None):
    """Every field of ``got`` against ``want``; ``scaled``: also allow ``scaled * max|want|`` absolute error per
    field (rounding relative to the field's magnitude)."""
    for name in ("layer_attn", "layer_ffn", "ffn", "attn"):
        w = np.asarray(want[name] if isinstance(want, dict) else getattr(want, name))
        tol = atol if scaled is None else max(atol, scaled * float(np.abs(w[np.isfinite(w)]).max()))
        np.testing.assert_allclose(np.asarray(getattr(got, name)), w, atol=tol, rtol=rtol, err_msg=name)


def _desc(x):
    """Indices in descending order of ``x``, ties to the lower index."""
    return np.argsort(-np.asarray(x), axis=-1, kind="stable")


# ---------------------------------------------------------------- attribution


@pytest.mark.parametrize("family", ["llama2", "qwen2"])
@pytest.mark.parametrize("mode", ["reference", "rmsnorm"])
@pytest.mark.parametrize("attention", ["last_key", "all_keys"])
def test_scores_match_numpy(tiny_dir, family, mode, attention):
    folder, params, cfg = _load(tiny_dir, family)
    got = pktjax.attribution(params, cfg, IDS, TARGET, mode=mode, attention=attention)  # the public name
    want = _np_attribution(folder, IDS, TARGET, mode, attention)
    assert got.ffn.shape == (cfg.num_layers, cfg.intermediate_size)
    assert got.attn.shape == (cfg.num_layers, cfg.q_dim)
    assert got.ffn.dtype == jnp.float32
    assert np.abs(want["ffn"]).max() > 1e-2 and np.abs(want["attn"]).max() > 1e-2  # the check is not vacuous
    _close(got, want)


def test_options_give_different_scores(tiny_dir):
    _, params, cfg = _load(tiny_dir, "qwen2")
    ref = attribution(params, cfg, IDS, TARGET)
    assert not np.allclose(ref.ffn, attribution(params, cfg, IDS, TARGET, mode="rmsnorm").ffn)
    assert not np.allclose(ref.attn, attribution(params, cfg, IDS, TARGET, attention="all_keys").attn)


def test_padding_does_not_change_scores(tiny_dir):
    _, params, cfg = _load(tiny_dir, "qwen2")
    plain = attribution(params, cfg, IDS[None], TARGET)
    pad = np.random.RandomState(0).randint(0, VOCAB, size=7).astype(np.int32)  # arbitrary tokens, masked out
    ids = np.concatenate([pad, IDS])[None]
    mask = (np.arange(ids.shape[1]) >= len(pad)).astype(np.int32)[None]
    _close(attribution(params, cfg, ids, TARGET, attention_mask=mask), plain, atol=1e-6, rtol=1e-5, scaled=REORDERED)


def test_chunk_size_does_not_change_scores(tiny_dir):
    _, params, cfg = _load(tiny_dir, "qwen2")
    base = attribution(params, cfg, IDS, TARGET)  # one block per layer (chunk > f)
    for chunk in (1, 7):  # 7 divides neither f = 48 nor H*hd = 32: the last block overlaps
        _close(attribution(params, cfg, IDS, TARGET, chunk=chunk), base, atol=0, rtol=REORDERED, scaled=REORDERED)


def test_scores_over_examples_add_up(tiny_dir):
    _, params, cfg = _load(tiny_dir, "llama2")
    tok = build_tokenizer()
    lengths = [len(attribution_target(tok, ex)[0]) for ex in EXAMPLES]
    assert lengths[0] != lengths[1] and max(lengths) <= 128
    parts = [locate(params, cfg, tok, [ex], bucket=128) for ex in EXAMPLES]
    compiled = _attribution_batch_jit._cache_size()
    total = pktjax.locate(params, cfg, tok, EXAMPLES, bucket=128)
    assert _attribution_batch_jit._cache_size() == compiled + 1  # one bucket, both examples in one batch
    _close(total, jax.tree.map(np.add, parts[0], parts[1]), atol=0, rtol=REORDERED, scaled=REORDERED)
    ids, target = attribution_target(tok, EXAMPLES[0])
    _close(parts[0], _np_attribution(tiny_dir("llama2"), ids, target, "reference", "last_key"))


def test_bad_arguments_are_refused(tiny_dir):
    _, params, cfg = _load(tiny_dir, "qwen2")
    with pytest.raises(ConfigError, match="mode"):
        attribution(params, cfg, IDS, TARGET, mode="softmax")
    with pytest.raises(ConfigError, match="attention"):
        attribution(params, cfg, IDS, TARGET, attention="first_key")
    with pytest.raises(ConfigError, match="chunk"):
        attribution(params, cfg, IDS, TARGET, chunk=0)
    with pytest.raises(DataError, match="one example"):
        attribution(params, cfg, np.stack([IDS, IDS]), TARGET)
    with pytest.raises(DataError, match="vocabulary"):
        attribution(params, cfg, IDS, VOCAB)
    with pytest.raises(DataError, match="empty"):
        locate(params, cfg, build_tokenizer(), [])


# ---------------------------------------------------------------- attribution_target


class _BosTokenizer:
    """Wraps the byte tokenizer and prepends BOS (id 1) when special tokens are asked for, as Llama's does."""

    def __init__(self):
        self.inner = build_tokenizer()

    def __call__(self, text, add_special_tokens=True):
        ids = self.inner(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": ([1] if add_special_tokens else []) + list(ids)}


def test_target_strips_trailing_characters_and_has_no_bos():
    tok = _BosTokenizer()
    ids, target = attribution_target(tok, EXAMPLES[1])
    text = "<|system|>\nBe brief.\n\n<|user|>\nName a colour\n\n<|assistant|>\nI pick \"blue"
    want = tok(text, add_special_tokens=False)["input_ids"]
    assert ids.tolist() == want[:-1] and target == want[-1]
    assert target == tok.inner.convert_tokens_to_ids("e") and ids[0] != 1
    ids, target = attribution_target(tok, EXAMPLES[0])
    assert tok.inner.decode(ids.tolist() + [target]).endswith("<|assistant|>\nIt is 42")


# ---------------------------------------------------------------- select


def test_select_on_hand_made_scores_breaks_ties_to_lower_index():
    attr = Attribution(
        layer_attn=jnp.array([1.0, 3.0, 3.0, 0.0]),
        layer_ffn=jnp.array([2.0, 2.0, 2.0, 5.0]),
        ffn=jnp.array([[0.5, 0.9, 0.9, 0.1, 0.9]] * 2 + [[0.0] * 5] + [[1.0, 2.0, 2.0, 3.0, -1.0]]),
        attn=jnp.array([[0.0, 1.0, 1.0], [4.0, 4.0, 1.0], [2.0, 7.0, 2.0], [9.0, 9.0, 9.0]]),
    )
    sel = select(attr, 2, 3, 2)
    assert sel.attn_layers.tolist() == [1, 2] and sel.ffn_layers.tolist() == [0, 3]
    assert sel.ffn_neurons.tolist() == [[1, 2, 4], [3, 1, 2]]
    assert sel.attn_neurons.tolist() == [[0, 1], [1, 0]]
    with pytest.raises(ConfigError, match="layer_attn"):
        select(attr.replace(layer_attn=jnp.zeros(3)), 2, 3, 2)


@pytest.mark.parametrize("family", ["llama2", "qwen2"])
def test_select_on_attribution_picks_top_scores(tiny_dir, family):
    _, params, cfg = _load(tiny_dir, family)
    attr = attribution(params, cfg, IDS, TARGET)
    sel = pktjax.select(attr, 1, 5, 4)
    la, lf = int(_desc(attr.layer_attn)[0]), int(_desc(attr.layer_ffn)[0])
    assert sel.attn_layers.tolist() == [la] and sel.ffn_layers.tolist() == [lf]
    assert sel.ffn_neurons.tolist() == [_desc(attr.ffn[lf])[:5].tolist()]
    assert sel.attn_neurons.tolist() == [_desc(attr.attn[la])[:4].tolist()]
    full = select(attr, cfg.num_layers, 5, 4)
    assert full.ffn_layers.tolist() == list(range(cfg.num_layers))
    np.testing.assert_array_equal(full.ffn_neurons, _desc(attr.ffn)[:, :5])


@pytest.mark.parametrize("family", ["llama2", "qwen2"])
def test_locate_in_top_layers_only_gives_the_same_selection(tiny_dir, family):
    """``layers=K`` scores neurons in the top-K layers (by the summed layer scores) only: those rows equal the full
    scores, the others are -inf, and select(n_layers=K) picks exactly what it picks from the full scores."""
    _, params, cfg = _load(tiny_dir, family)
    tok = build_tokenizer()
    full = locate(params, cfg, tok, EXAMPLES, bucket=128)
    k = cfg.num_layers - 1
    part = locate(params, cfg, tok, EXAMPLES, bucket=128, layers=k)
    np.testing.assert_array_equal(np.asarray(part.layer_ffn), np.asarray(full.layer_ffn))
    for kind, layer_scores in (("ffn", full.layer_ffn), ("attn", full.layer_attn)):
        top = np.sort(np.argsort(-np.asarray(layer_scores), kind="stable")[:k])
        got, want = np.asarray(getattr(part, kind)), np.asarray(getattr(full, kind))
        np.testing.assert_allclose(got[top], want[top], rtol=REORDERED, atol=REORDERED * np.abs(want[top]).max())
        rest = np.setdiff1d(np.arange(cfg.num_layers), top)
        assert np.all(np.isneginf(got[rest])), kind
    n_f, n_a = 5, 3
    a, b = select(full, k, n_f, n_a), select(part, k, n_f, n_a)
    for field in ("attn_layers", "ffn_layers", "ffn_neurons", "attn_neurons"):
        np.testing.assert_array_equal(np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), err_msg=field)
    with pytest.raises(ConfigError, match="layers=0"):
        locate(params, cfg, tok, EXAMPLES, layers=0)


def test_gain_matches_float64_for_small_and_mass_moving_changes():
    """The log-probability gain in both of its regimes: small changes (``log1p`` of a small sum), and a change that
    moves most of the mass to a token the base gave little or one whose ``exp`` overflows float32 (the block falls
    back to ``logsumexp``)."""
    from pktjax.attribution import _gain

    rng = np.random.default_rng(0)
    v, d, target = 64, 8, 3
    w_u = rng.normal(size=(v, d)).astype(np.float32)
    base = rng.normal(size=v) * 3
    base[7] = 12.0  # token 7 holds most of the base mass
    base_logp = (base - np.log(np.sum(np.exp(base - base.max()))) - base.max()).astype(np.float32)[None]
    small_shift = 1e-3 * rng.normal(size=(2, d))
    away_shift = -2.0 * w_u[7][None] / np.linalg.norm(w_u[7])  # takes most of the mass from token 7
    big_shift = 4.0 * (w_u[11] - w_u[7])[None] / np.linalg.norm(w_u[11] - w_u[7])  # a large sum, still log1p

    def want(shift):
        z = shift.astype(np.float64) @ w_u.T.astype(np.float64)
        lse = np.log(np.sum(np.exp(base_logp[0].astype(np.float64) + z), axis=1))
        return z[:, target] - lse

    huge_shift = 100.0 * w_u[11][None] / np.sum(w_u[11] ** 2)  # z_11 = 100: e^100 overflows float32

    for shift, far in ((small_shift, False), (np.concatenate([small_shift, away_shift]), True),
                       (np.concatenate([small_shift, big_shift]), False),
                       (np.concatenate([small_shift, huge_shift]), True)):
        shift = shift.astype(np.float32)
        z = shift.astype(np.float64) @ w_u.T.astype(np.float64)
        s = np.sum(np.expm1(z) * np.exp(base_logp[0].astype(np.float64)), axis=1)
        assert ((s < -0.5) | (np.abs(z).max(1) > 88)).any() == far
        got = np.asarray(jax.jit(_gain)(jnp.asarray(w_u), jnp.int32(target), jnp.asarray(shift), jnp.asarray(base_logp)))
        ref = want(shift)
        assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref)) + 1e-9, (got, ref)
